"""Cold start and warm attach: from opening the terminal socket to the first output.

    python -m bench.attach [--backend docker|local] [--cold 5] [--warm 15]

Cold: a user with no container (a new dev-login user each time), so the time includes
creating and starting the container. Warm: the user's container runs; `new tab` attaches
a tab that has no tmux session yet (tmux starts a shell), `reattach` one whose session
exists (a page reload). The clock starts before the WebSocket handshake and stops at the
first `pty-output` frame.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from typing import Any

from bench.common import (
    OurTerminal,
    ServerProcess,
    TerminalClosed,
    dev_login,
    machine_info,
    run_main,
    running_server,
    summarize,
    wait_first_output,
    write_json,
)

TIMEOUT = 60.0
PAUSE = 0.3  # between samples, so the previous terminal's detach is out of the way


def log(message: str) -> None:
    print(f"[attach] {message}", file=sys.stderr, flush=True)


async def attach_once(server: ServerProcess, cookie: str, tab: str) -> dict[str, float]:
    """Seconds to the handshake and to the first output of one new socket."""
    started = time.perf_counter()
    term = await OurTerminal.open(server.ws_url, cookie, tab, TIMEOUT)
    handshake = time.perf_counter() - started
    try:
        first = await wait_first_output(term, TIMEOUT) - started
    except (TerminalClosed, TimeoutError) as exc:
        raise RuntimeError(f"attach of tab {tab} failed: {term.errors or exc}") from None
    finally:
        term.close()
    return {"handshake": handshake, "first_output": first}


async def cold_starts(server: ServerProcess, count: int) -> list[dict[str, float]]:
    runs = []
    tag = secrets.token_hex(3)
    for i in range(count):
        cookie = await dev_login(server.base_url, f"cold{tag}{i}@example.com")
        runs.append(await attach_once(server, cookie, "1"))
        await asyncio.sleep(PAUSE)
    return runs


async def warm_attaches(server: ServerProcess, count: int) -> dict[str, list[dict[str, float]]]:
    cookie = await dev_login(server.base_url, "warm@example.com")
    await attach_once(server, cookie, "home")  # the container exists from here on
    await asyncio.sleep(PAUSE)
    new_tab, reattach = [], []
    for i in range(count):
        new_tab.append(await attach_once(server, cookie, f"w{i}"))
        await asyncio.sleep(PAUSE)
        reattach.append(await attach_once(server, cookie, "home"))
        await asyncio.sleep(PAUSE)
    return {"new_tab": new_tab, "reattach": reattach}


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {"first_output_ms": summarize([r["first_output"] for r in runs], digits=1),
            "handshake_ms": summarize([r["handshake"] for r in runs], digits=1)}


async def run_attach(server: ServerProcess, cold: int, warm: int) -> dict[str, Any]:
    # One unrecorded cold start first: the deployment's network is made on the very first.
    first = await cold_starts(server, 1)
    log(f"first container of the deployment: {first[0]['first_output'] * 1000:.0f} ms (not counted)")
    cold_runs = await cold_starts(server, cold)
    warm_runs = await warm_attaches(server, warm)
    data = {"cold": summary(cold_runs), "warm_new_tab": summary(warm_runs["new_tab"]),
            "warm_reattach": summary(warm_runs["reattach"]),
            "first_deployment_container_ms": round(first[0]["first_output"] * 1000, 1)}
    for key in ("cold", "warm_new_tab", "warm_reattach"):
        log(f"{key}: first output p50 {data[key]['first_output_ms']['p50']} ms, "
            f"max {data[key]['first_output_ms']['max']} ms")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--warm", type=int, default=15)
    args = parser.parse_args(argv)
    with running_server(args.backend) as server:
        data = asyncio.run(run_attach(server, min(args.cold, 50), min(args.warm, 200)))
    data |= {"backend": args.backend, "machine": machine_info()}
    print(f"wrote {write_json('attach', data)}")


if __name__ == "__main__":
    run_main(main)
