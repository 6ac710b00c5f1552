"""Many open terminals on one host: do they all work, and where does the memory go?

    python -m bench.thousand [--backend docker|local] [--users 5] [--tabs 200]

Opens users × tabs terminals on one server (each its own WebSocket, tab and tmux client),
checks that every one answers a command, and reports the memory of the server (RSS and USS,
before and after, per added terminal), of its PTY children (`docker exec` clients, or tmux
clients on the local backend) and of the far side (each container's memory as the engine
counts it: the tmux server, its clients and the shells; locally the tmux servers' own RSS).
Writes results/thousand.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil

from bench.common import (
    OurTerminal,
    TerminalClosed,
    children_memory,
    container_of,
    dev_login,
    machine_info,
    process_memory,
    run_main,
    running_server,
    visible,
    wait_first_output,
    write_json,
)

OPEN_CONCURRENCY = 8
TIMEOUT = 120.0
MIB = 2**20


def log(message: str) -> None:
    print(f"[thousand] {message}", file=sys.stderr, flush=True)


def container_memory(deployment: str, emails: list[str]) -> dict[str, Any]:
    ids = [c for c in (container_of(deployment, e) for e in emails) if c]
    if not ids:
        return {"containers": 0, "bytes": 0}
    out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{json .}}", *ids],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    total = 0.0
    for line in out.splitlines():
        used = json.loads(line)["MemUsage"].split("/")[0].strip()
        number, unit = float(used.rstrip("KMGTiB")), used.lstrip("0123456789.")
        total += number * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    return {"containers": len(ids), "bytes": round(total)}


def tmux_servers_memory(deployment: str) -> dict[str, Any]:
    rss = count = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"3c-{deployment}-" in cmd and proc.info["memory_info"] is not None and proc.ppid() == 1:
            rss += proc.info["memory_info"].rss
            count += 1
    return {"servers": count, "bytes": rss}


def snapshot(server: Any, emails: list[str]) -> dict[str, Any]:
    far = (container_memory(server.deployment, emails) if server.backend == "docker"
           else tmux_servers_memory(server.deployment))
    return {"server": process_memory(server.pid), "children": children_memory(server.pid), "far_side": far,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


async def answers(term: OurTerminal, tag: str) -> bool:
    future = term.expect(lambda out: f"OK{tag}END" in visible(out[-4096:]))
    try:
        await term.send(f"echo OK{tag}''END\r")
        await asyncio.wait_for(future, TIMEOUT)
        return True
    except (TimeoutError, TerminalClosed):
        return False


async def run(server: Any, users: int, tabs: int) -> dict[str, Any]:
    emails = [f"many{i}@example.com" for i in range(users)]
    cookies = [await dev_login(server.base_url, e) for e in emails]
    boot = [await OurTerminal.open(server.ws_url, c, "boot", TIMEOUT) for c in cookies]  # the containers
    for term in boot:
        await wait_first_output(term, TIMEOUT)
        term.close()
    await asyncio.sleep(2.0)
    before = snapshot(server, emails)
    gate, terms, failures = asyncio.Semaphore(OPEN_CONCURRENCY), [], []
    started = time.perf_counter()

    async def one(user: int, tab: int) -> None:
        async with gate:
            try:
                term = await OurTerminal.open(server.ws_url, cookies[user], f"m{tab}", TIMEOUT)
                await wait_first_output(term, TIMEOUT)
                terms.append(term)
            except Exception as exc:
                failures.append(f"user {user} tab {tab}: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(u, t) for u in range(users) for t in range(tabs)))
    opened_in = time.perf_counter() - started
    log(f"{len(terms)} terminals open in {opened_in:.1f} s ({len(failures)} failed)")
    await asyncio.sleep(3.0)
    after = snapshot(server, emails)  # all open and drawn, before the check types into them
    ok = 0
    for i in range(0, len(terms), 50):
        ok += sum(await asyncio.gather(*(answers(t, str(i + j)) for j, t in enumerate(terms[i:i + 50]))))
    for term in terms:
        with contextlib.suppress(Exception):
            term.close()
    await asyncio.sleep(3.0)
    opened = len(terms)
    grow = {k: after["server"][k] - before["server"][k] for k in ("rss", "uss")}
    return {
        "users": users, "tabs": tabs, "requested": users * tabs, "opened": opened, "answered": ok,
        "failures": failures[:20], "open_seconds": round(opened_in, 1), "before": before, "after": after,
        "server_kib_per_terminal": {k: round(v / max(opened, 1) / 1024, 1) for k, v in grow.items()},
        "totals_mib": {
            "server_rss": round(after["server"]["rss"] / MIB, 1),
            "pty_children_rss": round(after["children"]["rss_total"] / MIB, 1),
            "pty_children_uss": round(after["children"]["uss_total"] / MIB, 1),
            "far_side": round(after["far_side"]["bytes"] / MIB, 1),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--tabs", type=int, default=200)
    args = parser.parse_args(argv)
    users, tabs = min(max(args.users, 1), 20), min(max(args.tabs, 1), 250)
    with running_server(args.backend, port_block=50 * users + 50,
                        extra_env={"MAX_CONTAINERS": str(users + 5)}) as server:
        data = asyncio.run(run(server, users, tabs))
    data |= {"backend": args.backend, "machine": machine_info()}
    print(json.dumps({k: data[k] for k in ("opened", "answered", "open_seconds", "server_kib_per_terminal",
                                           "totals_mib")}, indent=1))
    print(f"wrote {write_json(f'thousand-{args.backend}', data)}")


if __name__ == "__main__":
    run_main(main)
