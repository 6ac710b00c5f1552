"""Every benchmark in one run, on one server, with the targets checked: `make bench`.

    python -m bench.run_all [--backend docker|local] [--levels 1,50,200] [--quick]

Writes results/bench.json (everything, with the machine and date), results/bench.md (the
side-by-side tables that docs/PERFORMANCE.md quotes), and prints the same. Targets are
reported, not asserted: the exit status is 0 unless a benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.attach import run_attach
from bench.common import HostCpu, ServerProcess, machine_info, run_main, running_server, write_json
from bench.echo import KINDS, run_levels
from bench.files import run_files
from bench.memory import memory_report

MAX_TERMINALS_TARGET_LEVEL = 200


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def attempt(name: str, run: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """One benchmark; a failure is recorded (and the others still run)."""
    try:
        return await run
    except Exception as exc:
        log(f"{name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


async def run_everything(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    host, stop = HostCpu(), asyncio.Event()
    watching = asyncio.ensure_future(host.run(stop))
    try:
        data = await run_benchmarks(server, args)
    finally:
        stop.set()
        await watching
    return data | {"host_cpu": host.summary()}


async def run_benchmarks(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    log("attach: cold start and warm attach")
    attach = await attempt("attach", run_attach(server, args.cold, args.warm))
    log("files: /list-files, GET /file, upload")
    files = await attempt("files", run_files(server, args.seconds, args.connections, args.upload_mb))
    log(f"echo and seq at {args.levels} open terminals, vs ttyd, terminado and the raw PTY")
    echo = await attempt("echo", run_levels(server, args.levels, args.keystrokes, args.seq_reps))
    memory = {"error": "no echo run"} if "error" in echo else memory_report(echo)
    return {"attach": attach, "files": files, "echo": echo, "memory": memory}


def target(name: str, value: float | None, limit: float, unit: str, below: bool = True) -> dict[str, Any]:
    met = None if value is None else (value < limit if below else value <= limit)
    return {"target": name, "measured": value, "limit": limit, "unit": unit, "met": met,
            "by": None if value is None or met else round(value / limit, 2)}


def level(data: dict[str, Any], n: int) -> dict[str, Any] | None:
    return next((lv for lv in data["echo"]["levels"] if lv["level"] == n), None)


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[tuple[str, Callable[[], float | None], float, str, bool]] = []
    for n in [lv["level"] for lv in data["echo"].get("levels", [])]:
        checks += [
            (f"echo p50 vs ttyd ({n} terminals)", lambda n=n: level(data, n)["ratios"]["echo_p50_vs_ttyd"], 1.0,
             "x", False),
            (f"echo p99 vs raw floor ({n} terminals)", lambda n=n: level(data, n)["ratios"]["echo_p99_vs_raw"],
             1.2, "x", False),
            (f"seq 1 300000 vs ttyd ({n} terminals)", lambda n=n: level(data, n)["ratios"]["seq_vs_ttyd"], 1.0,
             "x", False),
        ]
    checks += [
        ("echo p50 vs terminado (1 terminal)", lambda: first(data)["ratios"]["echo_p50_vs_terminado"], 1.0, "x", False),
        ("echo p50 vs raw floor (1 terminal)", lambda: first(data)["ratios"]["echo_p50_vs_raw"], 1.5, "x", False),
        (f"echo p99 with {MAX_TERMINALS_TARGET_LEVEL} terminals open",
         lambda: top(data)["echo_ms"]["3compute"]["p99"], 5.0, "ms", True),
        ("seq 1 300000 vs terminado (1 terminal)", lambda: first(data)["ratios"]["seq_vs_terminado"], 1.0, "x", False),
        ("warm attach p50 (re-attach)", lambda: attach_p50(data, "warm_reattach"), 80, "ms", True),
        ("warm attach p50 (new tab)", lambda: attach_p50(data, "warm_new_tab"), 80, "ms", True),
        ("cold start p50", lambda: attach_p50(data, "cold"), 600, "ms", True),
        ("server RSS per added terminal", lambda: data["memory"]["3compute"]["server_rss_kib_per_terminal"], 16,
         "KiB", False),
    ]
    out = []
    for name, measured, limit, unit, below in checks:
        try:
            value = measured()
        except (KeyError, IndexError, TypeError):
            value = None  # that benchmark failed or did not run at this level
        out.append(target(name, value, limit, unit, below))
    return out


def attach_p50(data: dict[str, Any], key: str) -> float:
    return data["attach"][key]["first_output_ms"]["p50"]


def first(data: dict[str, Any]) -> dict[str, Any]:
    return data["echo"]["levels"][0]


def top(data: dict[str, Any]) -> dict[str, Any]:
    found = level(data, MAX_TERMINALS_TARGET_LEVEL)
    if found is None:
        raise KeyError(MAX_TERMINALS_TARGET_LEVEL)
    return found


def markdown(data: dict[str, Any]) -> str:
    """The side-by-side tables of docs/PERFORMANCE.md."""
    m = data["machine"]
    lines = [f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel "
             f"{m['kernel']}, Docker engine {m['docker_engine']}, Python {m['python']}; backend "
             f"`{data['backend']}`; {data['wall_seconds']} s in all; host load average (1/5/15 min) "
             f"{data['load_average']['before']} before, {data['load_average']['after']} after.", ""]
    host = data.get("host_cpu") or {}
    if host.get("top_percent_by_name"):
        top = ", ".join(f"{name} {pct}%" for name, pct in list(host["top_percent_by_name"].items())[:8])
        lines += [f"Host CPU over the run by process name (100% = one core): {top}; all containers "
                  f"{host.get('all_containers_percent')}%.", ""]
    for name, section in (("echo", markdown_echo), ("attach", markdown_attach), ("files", markdown_files),
                          ("memory", markdown_memory)):
        lines += [f"{name}: **failed**: {data[name]['error']}"] if "error" in data[name] else section(data)
        lines.append("")
    return "\n".join([*lines, *markdown_targets(data)]) + "\n"


def markdown_echo(data: dict[str, Any]) -> list[str]:
    lines = ["| open terminals | client | echo p50 | p95 | p99 | max | `seq 1 300000` (median) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for lv in data["echo"]["levels"]:
        for kind in [k for k in KINDS if k in lv["echo_ms"]]:
            e, s = lv["echo_ms"][kind], lv["seq"][kind]
            lines.append(f"| {lv['level']} | {kind} | {e['p50']:.2f} ms | {e['p95']:.2f} | {e['p99']:.2f} | "
                         f"{e['max']:.2f} | {s['median_s']:.2f} s |")
    lines += ["", "| open terminals | echo p50 ÷ ttyd | echo p50 ÷ terminado | echo p50 ÷ raw | echo p99 ÷ raw | "
              "ttyd p50 ÷ raw | seq ÷ ttyd | seq ÷ terminado | seq ÷ raw |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in data["echo"]["levels"]:
        r = lv["ratios"]
        lines.append(f"| {lv['level']} | {r.get('echo_p50_vs_ttyd')} | {r['echo_p50_vs_terminado']} | "
                     f"{r['echo_p50_vs_raw']} | {r.get('echo_p99_vs_raw')} | {r.get('ttyd_p50_vs_raw')} | "
                     f"{r.get('seq_vs_ttyd')} | {r['seq_vs_terminado']} | {r['seq_vs_raw']} |")
    lines += ["", "The Python floor (bench/floor_server.py) beside ttyd and the raw PTY:", "",
              "| open terminals | floor echo p50 ÷ ttyd | ours ÷ floor | floor p99 ÷ raw | ttyd p99 ÷ raw | "
              "floor seq ÷ ttyd |", "|---:|---:|---:|---:|---:|---:|"]
    for lv in data["echo"]["levels"]:
        r = lv["ratios"]
        lines.append(f"| {lv['level']} | {r.get('floor_p50_vs_ttyd')} | {r.get('echo_p50_vs_floor')} | "
                     f"{r.get('floor_p99_vs_raw')} | {r.get('ttyd_p99_vs_raw')} | {r.get('floor_seq_vs_ttyd')} |")
    if data["echo"].get("failed_level"):
        f = data["echo"]["failed_level"]
        lines += ["", f"Level {f['level']} **failed**: {f['error']}"]
    return lines


def markdown_attach(data: dict[str, Any]) -> list[str]:
    a = data["attach"]
    lines = ["| attach (socket open → first output) | p50 | p95 | max | n |", "|---|---:|---:|---:|---:|"]
    for key, label in (("cold", "cold start (no container)"), ("warm_new_tab", "warm, new tab"),
                       ("warm_reattach", "warm, re-attach")):
        s = a[key]["first_output_ms"]
        lines.append(f"| {label} | {s['p50']:.0f} ms | {s['p95']:.0f} | {s['max']:.0f} | {s['n']} |")
    return lines


def markdown_files(data: dict[str, Any]) -> list[str]:
    f = data["files"]
    lines = ["| file API | requests/s | p50 | p99 |", "|---|---:|---:|---:|"]
    for key, label in (("list_files", "GET /list-files (100 files)"), ("get_file_4k", "GET /file (4 KB)")):
        s = f[key]
        lines.append(f"| {label} | {s['requests_per_second']:.0f} | {s['latency_ms']['p50']:.1f} ms | "
                     f"{s['latency_ms']['p99']:.1f} ms |")
    u = f["upload"]
    lines += ["", "| upload (one multipart POST /upload) | time | rate | server RSS before → peak |",
              "|---|---:|---:|---:|",
              f"| {u['megabytes']} MB | {u['seconds']} s | {u['mb_per_second']} MB/s | "
              f"{u['server_rss_before_mib']} → {u['server_rss_peak_mib']} MiB (+{u['server_rss_growth_mib']}) |"]
    return lines


def markdown_memory(data: dict[str, Any]) -> list[str]:
    lines = ["| memory | server RSS (MiB) | per added terminal RSS / USS | PTY children | each child RSS / USS |",
             "|---|---|---:|---:|---:|"]
    for who, r in data["memory"].items():
        lines.append(f"| {who} | {r['server_rss_mib'][0]} → {r['server_rss_mib'][1]} "
                     f"({r['terminals'][0]} → {r['terminals'][1]} terminals) | "
                     f"{r.get('server_rss_kib_per_terminal')} / {r.get('server_uss_kib_per_terminal')} KiB | "
                     f"{r['children']} | {r['child_rss_kib_each']} / {r['child_uss_kib_each']} KiB |")
    return lines


def markdown_targets(data: dict[str, Any]) -> list[str]:
    lines = ["| target | limit | measured | met |", "|---|---:|---:|---|"]
    for t in data["targets"]:
        verdict = {True: "yes", None: "not measured"}.get(t["met"], f"**no** ({t['by']}× the limit)")
        lines.append(f"| {t['target']} | {t['limit']} {t['unit']} | {t['measured']} {t['unit']} | {verdict} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--levels", default="1,50,200")
    parser.add_argument("--keystrokes", type=int, default=400, help="echo samples per client and level")
    parser.add_argument("--seq-reps", type=int, default=5)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--warm", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=5.0, help="per file API endpoint")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--upload-mb", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small figures in about a minute (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.keystrokes, args.seq_reps = "1,10", 40, 1
        args.cold, args.warm, args.seconds, args.upload_mb = 2, 3, 2.0, 50
    args.levels = sorted({min(400, max(1, int(x))) for x in args.levels.split(",")})
    args.keystrokes, args.seq_reps = min(args.keystrokes, 5000), min(args.seq_reps, 20)
    args.cold, args.warm, args.upload_mb = min(args.cold, 50), min(args.warm, 200), min(args.upload_mb, 2048)
    args.seconds, args.connections = min(args.seconds, 60.0), min(args.connections, 64)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    with running_server(args.backend, port_block=500) as server:
        data = asyncio.run(run_everything(server, args))
    # The host's load average around the run: other work on the machine shows in the tails.
    data = {"machine": machine_info(), "backend": args.backend, **data,
            "wall_seconds": round(time.monotonic() - started, 1),
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]}}
    data["targets"] = targets(data)
    write_json("bench", data)
    table = markdown(data)
    (write_json("bench", data).parent / "bench.md").write_text(table)
    print(table)
    log(f"done in {data['wall_seconds']} s; wrote results/bench.json and results/bench.md")


if __name__ == "__main__":
    run_main(main)
