"""Server memory per open terminal, and the memory of each `docker exec` child.

    python -m bench.memory [--backend docker|local] [--levels 1,50,200]

Read from the snapshots bench/echo.py takes at each level (N-1 idle terminals plus the
measured one, on our server and on terminado alike): the server's RSS and USS growth from
the lowest level to the highest, divided by the terminals added, and the mean RSS/USS of
its direct children (the PTY children: `docker exec` clients, or tmux clients locally).
USS is what a process alone holds; RSS also counts pages it shares (the docker binary).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.common import machine_info, run_main, running_server, write_json
from bench.echo import run_levels

KB = 1024


def per_terminal(levels: list[dict[str, Any]], who: str) -> dict[str, Any]:
    """Growth per added terminal between the first and the last level, for one server.

    From the first level's snapshot after its measurements (every code path warm) to the
    last level's before them (only idle terminals added since)."""
    low, high = levels[0], levels[-1]
    added = high["level"] - low["level"]
    a, b = low["memory_after"][who], high["memory"][who]
    children = b["children"]
    out: dict[str, Any] = {
        "terminals": [low["level"], high["level"]],
        "server_rss_mib": [round(a["server"]["rss"] / 2**20, 1), round(b["server"]["rss"] / 2**20, 1)],
        "server_uss_mib": [round(a["server"]["uss"] / 2**20, 1), round(b["server"]["uss"] / 2**20, 1)],
        "children": children["count"],
        "child_rss_kib_each": round(children["rss_each"] / KB),
        "child_uss_kib_each": round(children["uss_each"] / KB),
    }
    if added > 0:
        out["server_rss_kib_per_terminal"] = round((b["server"]["rss"] - a["server"]["rss"]) / added / KB, 1)
        out["server_uss_kib_per_terminal"] = round((b["server"]["uss"] - a["server"]["uss"]) / added / KB, 1)
    return out


def memory_report(echo_data: dict[str, Any]) -> dict[str, Any]:
    levels = echo_data["levels"]
    return {who: per_terminal(levels, who) for who in ("3compute", "ttyd", "terminado") if who in levels[0]["memory"]}


def print_report(report: dict[str, Any]) -> None:
    for who, r in report.items():
        print(f"{who}: server RSS {r['server_rss_mib'][0]} -> {r['server_rss_mib'][1]} MiB for "
              f"{r['terminals'][0]} -> {r['terminals'][1]} terminals: "
              f"{r.get('server_rss_kib_per_terminal')} KiB RSS ({r.get('server_uss_kib_per_terminal')} KiB USS) "
              f"per terminal; each PTY child {r['child_rss_kib_each']} KiB RSS, {r['child_uss_kib_each']} KiB USS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--levels", default="1,50,200")
    args = parser.parse_args(argv)
    levels = sorted({min(400, max(1, int(x))) for x in args.levels.split(",")})
    with running_server(args.backend) as server:
        echo_data = asyncio.run(run_levels(server, levels, keystrokes=5, seq_reps=1))
    report = memory_report(echo_data) | {"backend": args.backend, "machine": machine_info()}
    print_report({k: v for k, v in report.items() if k in ("3compute", "ttyd", "terminado")})
    print(f"wrote {write_json('memory', report)}")


if __name__ == "__main__":
    run_main(main)
