"""Swarm vs Docker: cold start, warm attach, echo, many terminals, recovery after a node dies.

    python -m bench.swarm [--users 8] [--terminals 200] [--no-docker] [--no-failover]

Brings up `scripts/swarm-lab.sh` (3 nodes, its own LAB folder) and removes it at the end; the
Docker figures use the default engine. Both backends are driven directly (ensure, then the
attach argv under a PTY, as the terminal hub does), each on its own temporary DATA_DIR, and
everything they made is removed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import select
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import ptyprocess

from threecompute.containers.backend import ContainerBackend, UserRef
from threecompute.containers.docker import DockerBackend
from threecompute.containers.swarm import NoFirewall, SwarmBackend
from threecompute.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LAB_ENV = {"LAB": "/tmp/3compute-swarm-bench", "PREFIX": "3cb", "NET": "192.168.80", "NODES": "3"}
MANAGER = f"unix://{LAB_ENV['LAB']}/n1/docker.sock"


def lab(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "swarm-lab.sh"), *args], env=os.environ | LAB_ENV, check=True,
                   timeout=300, capture_output=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": pct(values, 0.5), "p95_ms": pct(values, 0.95), "p99_ms": pct(values, 0.99),
            "mean_ms": round(statistics.mean(values) * 1000, 1)}


def wait_for(proc: ptyprocess.PtyProcess, needle: bytes, timeout: float = 30) -> None:
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        if not select.select([proc.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"{needle!r} not seen: {seen[-200:]!r}")
        seen += proc.read(65536)


def users(backend: ContainerBackend, count: int, base: int) -> list[UserRef]:
    made = []
    for i in range(count):
        workspace = backend.settings.data_dir / "workspaces" / f"b{i}"  # type: ignore[attr-defined]
        workspace.mkdir(parents=True, exist_ok=True)
        made.append(UserRef(f"b{i}", base + 10 * i, workspace))
    return made


async def measure(backend: ContainerBackend, count: int, base: int) -> dict:
    people = users(backend, count, base)
    cold = []
    for person in people:
        started = time.monotonic()
        await backend.ensure(person)
        cold.append(time.monotonic() - started)
    attach, echo = [], []
    box = await backend.ensure(people[0])
    for i in range(20):
        started = time.monotonic()
        await backend.ensure(people[0])
        proc = ptyprocess.PtyProcess.spawn(backend.attach_command(box, "w", f"warmattach{i:04d}").argv)
        wait_for(proc, b"$ ")
        attach.append(time.monotonic() - started)
        if i == 19:
            for j in range(200):
                started = time.monotonic()
                proc.write(f"echo e{j}-$((6*7))\r".encode())
                wait_for(proc, f"e{j}-42".encode())
                echo.append(time.monotonic() - started)
        await backend.detach(box, f"warmattach{i:04d}")
        proc.close(force=True)
    return {"cold_start": summary(cold), "warm_attach": summary(attach), "echo": summary(echo)}


async def many_terminals(backend: SwarmBackend, total: int, base: int) -> dict:
    people = users(backend, 20, base + 1000)
    boxes = await asyncio.gather(*(backend.ensure(p) for p in people))
    per_node: dict[str, int] = {}
    started = time.monotonic()
    procs = []
    try:
        for i in range(total):
            box = boxes[i % len(boxes)]
            procs.append(ptyprocess.PtyProcess.spawn(backend.attach_command(box, f"m{i // len(boxes)}",
                                                                           f"manyterms{i:05d}").argv))
            url = backend._engines[box.ref]
            per_node[url] = per_node.get(url, 0) + 1
        for proc in procs:
            wait_for(proc, b"$ ", 120)
        opened = time.monotonic() - started
        echo = []
        for i, proc in enumerate(procs):
            t = time.monotonic()
            proc.write(f"echo z{i}-$((6*7))\r".encode())
            wait_for(proc, f"z{i}-42".encode())
            echo.append(time.monotonic() - t)
    finally:
        for i, proc in enumerate(procs):
            await backend.detach(boxes[i % len(boxes)], f"manyterms{i:05d}")
            proc.close(force=True)
    return {"terminals": total, "open_all_s": round(opened, 1), "per_node": sorted(per_node.values()),
            "echo_while_all_open": summary(echo)}


async def failover(backend: SwarmBackend, base: int) -> dict:
    person = users(backend, 1, base + 2000)[0]
    manager = backend._get_client()
    node1 = next(n for n in manager.api.nodes() if n["Description"]["Hostname"] == "node1")
    manager.api.update_node(node1["ID"], node1["Version"]["Index"], {**node1["Spec"], "Availability": "drain"})
    box = await backend.ensure(person)
    n = backend._engines[box.ref].split("/n")[-1].split("/")[0]
    proc = ptyprocess.PtyProcess.spawn(backend.attach_command(box, "f", "failover0001").argv)
    wait_for(proc, b"$ ")
    started = time.monotonic()
    lab("kill", n)
    while proc.isalive():
        time.sleep(0.05)
    lost = time.monotonic() - started
    proc.close(force=True)
    moved = await backend.ensure(person)
    fresh = ptyprocess.PtyProcess.spawn(backend.attach_command(moved, "f", "failover0002").argv)
    wait_for(fresh, b"$ ")
    recovered = time.monotonic() - started
    fresh.close(force=True)
    lab("start", n)
    return {"terminal_lost_s": round(lost, 2), "fresh_terminal_s": round(recovered, 2)}


def backend_for(kind: str, folder: Path) -> ContainerBackend:
    settings = dataclasses.replace(Settings(), data_dir=folder / kind, backend=kind, max_containers=1000)
    if kind == "swarm":
        return SwarmBackend(settings, MANAGER)
    backend = DockerBackend(settings)
    backend.firewall = NoFirewall()  # type: ignore[assignment]  # the host's firewall is left alone
    return backend


async def run(args: argparse.Namespace) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="3compute-swarm-bench-") as folder:
        kinds = ["swarm"] + ([] if args.no_docker else ["docker"])
        for kind in kinds:
            backend = backend_for(kind, Path(folder))
            try:
                results[kind] = await measure(backend, args.users, 21000 if kind == "swarm" else 24000)
                if kind == "swarm":
                    results[kind]["many"] = await many_terminals(backend, args.terminals, 21000)
                    if not args.no_failover:
                        results[kind]["failover"] = await failover(backend, 21000)
            finally:
                await backend.purge()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--terminals", type=int, default=200)
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--no-failover", action="store_true")
    args = parser.parse_args()
    lab("up")
    try:
        print(json.dumps(asyncio.run(run(args)), indent=1))
    finally:
        lab("down")


if __name__ == "__main__":
    main()
