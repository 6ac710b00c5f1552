"""Replicas: the store's cost on PostgreSQL vs SQLite, and throughput and echo through HAProxy
with 1 and with 2 replicas, in one run on one machine.

    python -m bench.cluster [--seconds 8] [--connections 16] [--terminals 4] [--echoes 60] [--store-ops 200]

* Store: `record_login` of new users and `save_tabs`, p50/p99, each engine on a folder of
  its own (SQLite with `synchronous=FULL`; a private PostgreSQL with its default durability,
  over loopback TCP), through the `Store` interface as the handlers call it.
* Cluster: `scripts/cluster.sh up` (local backend, so no container costs blur it) with
  REPLICAS=1, then 2; `GET /list-files` (a workspace of 100 files of 4 KB) over keep-alive
  connections through HAProxy, then keystroke echo through HAProxy on `--terminals` tabs.
  The client runs on the same cores as the servers: on a small machine it takes its share.

Results: results/cluster.json, and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    HttpConnection,
    OurTerminal,
    dev_login,
    echo_once,
    free_port,
    free_port_block,
    machine_info,
    request_head,
    run_main,
    summarize,
    write_json,
)
from bench.echo import clear_line
from bench.files import fill_workspace, hammer
from threecompute.store import SqliteStore, Store
from threecompute.store_pg import PostgresStore

CLUSTER = ROOT / "scripts" / "cluster.sh"
POSTGRES = ROOT / "scripts" / "postgres.sh"
LETTERS = "abcdefgijknopqrstuvwxyz"


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# -- the store -----------------------------------------------------------------------------

async def store_costs(store: Store, ops: int) -> dict[str, Any]:
    logins, saves = [], []
    for i in range(ops):
        started = time.perf_counter()
        await store.record_login(f"bench{i}", f"bench{i}@example.com", "127.0.0.1")
        logins.append(time.perf_counter() - started)
    for i in range(ops):
        started = time.perf_counter()
        await store.save_tabs(f"bench{i}", ["1", str(i)], str(i))
        saves.append(time.perf_counter() - started)
    return {"sign_in_ms": summarize(logins), "tab_save_ms": summarize(saves)}


def measure_store(ops: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(Path(folder) / "db.sqlite3", 8000)
        try:
            results["sqlite"] = asyncio.run(store_costs(store, ops))
        finally:
            store.close()
    folder, port = tempfile.mkdtemp(prefix="3compute-pg-"), free_port()
    try:
        subprocess.run([str(POSTGRES), "start", folder, str(port)], check=True, timeout=120)
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", 8000)
        try:
            results["postgres"] = asyncio.run(store_costs(store, ops))
        finally:
            store.close()
    finally:
        subprocess.run([str(POSTGRES), "stop", folder], timeout=60)
    return results


# -- the cluster ---------------------------------------------------------------------------

def cluster_up(replicas: int) -> tuple[dict[str, str], int]:
    base = free_port_block(replicas + 2)
    env = os.environ | {"CLUSTER_DIR": tempfile.mkdtemp(prefix="3compute-bench-cluster-") + "/c",
                        "CLUSTER_PORT": str(base), "PG_PORT": str(base + replicas + 1),
                        "REPLICAS": str(replicas), "CLUSTER_BACKEND": "local", "CLUSTER_FLAGS": "--dev",
                        "PORT_BASE": str(free_port_block(10 * 10))}
    subprocess.run([str(CLUSTER), "up"], env=env, check=True, timeout=300, stdout=subprocess.DEVNULL)
    return env, base


def cluster_down(env: dict[str, str]) -> None:
    subprocess.run([str(CLUSTER), "down"], env=env, timeout=120)
    Path(env["CLUSTER_DIR"]).parent.rmdir()


async def echoes(port: int, cookie: str, terminals: int, count: int) -> dict[str, Any]:
    terms = [await OurTerminal.open(f"ws://127.0.0.1:{port}", cookie, f"e{i}") for i in range(terminals)]
    samples: list[float] = []
    try:
        for term in terms:
            await term.settle(0.3, 10.0)
        for i in range(count):
            if i % 40 == 0:
                for term in terms:
                    await clear_line(term)
            for term in terms:
                samples.append(await echo_once(term, LETTERS[i % len(LETTERS)]))
    finally:
        for term in terms:
            term.close()
    return summarize(samples)


async def measure_cluster(port: int, seconds: float, connections: int, terminals: int, count: int) -> dict:
    cookie = await dev_login(f"http://127.0.0.1:{port}", "bench-cluster@example.com")
    await fill_workspace(port, cookie)
    conn = await HttpConnection.open(port)
    await conn.request(request_head("GET", "/list-files", cookie))  # warm up
    conn.close()
    listing = await hammer(port, request_head("GET", "/list-files", cookie), seconds, connections)
    return {"list_files": listing, "echo_ms": await echoes(port, cookie, terminals, count)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="of /list-files traffic per cluster size")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--terminals", type=int, default=4)
    p.add_argument("--echoes", type=int, default=60, help="keystrokes per terminal")
    p.add_argument("--store-ops", type=int, default=200)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    log("store: SQLite vs PostgreSQL")
    report["store"] = measure_store(args.store_ops)
    report["cluster"] = {}
    for replicas in (1, 2):
        log(f"{replicas} replica(s) behind HAProxy")
        env, port = cluster_up(replicas)
        try:
            report["cluster"][str(replicas)] = asyncio.run(
                measure_cluster(port, args.seconds, args.connections, args.terminals, args.echoes))
        finally:
            cluster_down(env)
    one, two = (report["cluster"][k]["list_files"]["requests_per_second"] for k in ("1", "2"))
    report["list_files_speedup"] = round(two / one, 2) if one else None
    path = write_json("cluster", report)
    store = report["store"]
    print("| store | sign-in p50 ms | tab save p50 ms |\n|---|---|---|")
    for engine in ("sqlite", "postgres"):
        print(f"| {engine} | {store[engine]['sign_in_ms']['p50']} | {store[engine]['tab_save_ms']['p50']} |")
    print("\n| replicas | /list-files req/s | echo p50 ms | echo p99 ms |\n|---|---|---|---|")
    for replicas, result in report["cluster"].items():
        print(f"| {replicas} | {result['list_files']['requests_per_second']} | {result['echo_ms']['p50']} |"
              f" {result['echo_ms']['p99']} |")
    print(f"\n2 replicas / 1: {report['list_files_speedup']}x  ({path})")


if __name__ == "__main__":
    run_main(main)
