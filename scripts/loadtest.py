#!/usr/bin/env python3
"""Load test: N users with T terminal tabs each, typing like people, plus file API traffic.

    python scripts/loadtest.py --url http://127.0.0.1:5555 --users 20 --tabs 2 --duration 60
    python scripts/loadtest.py --spawn docker --users 20 --tabs 2      # starts its own server

Each user signs in through `/auth/dev-login` (the server must run with `--dev`), opens T
terminal sockets and, in every tab, types commands at a human rate (one keystroke every
~150 ms, each timed until its echo comes back), pastes a long line now and then (a burst),
and now and then runs a command with a large output (`seq`), timed until a marker after
it arrives. Meanwhile each user's "browser" polls `GET /list-files` every 300 ms like the
frontend does, reads and writes a file, and uploads a small one. Users start spread over
the ramp-up, everything runs for the duration, then stops cleanly (sockets closed, the
spawned server stopped and its containers removed).

Reported on the terminal (a progress line every few seconds, a table at the end) and as
JSON (`--out`, default results/loadtest.json) with a PNG chart beside it: attach time
(socket open to first output), keystroke echo round trip (p50/p95/p99/max), paste echo,
output throughput, file API latency per endpoint, errors by kind, and the server's CPU
and memory over time, with its PTY children (`docker exec` clients) counted apart
(psutil on the server's pid, found from its listening port, or `--server-pid`).

Bounded: at most 200 users, 10 tabs each, 400 terminals and one hour; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import string
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    HostCpu,
    HttpConnection,
    OurTerminal,
    TermClient,
    TerminalClosed,
    dev_login,
    echo_once,
    machine_info,
    mib,
    percentile,
    request_head,
    require_loopback,
    running_server,
    sigterm_as_interrupt,
    summarize,
    visible,
    wait_first_output,
)

MAX_USERS, MAX_TABS, MAX_TERMINALS, MAX_DURATION = 200, 10, 400, 3600
COMMANDS = ["echo hello world", "ls -la", "pwd", "date", "whoami", "cat notes.txt", "uname -a",
            "python3 -c 'print(sum(range(1000)))'", "wc -l notes.txt", "echo $HOME"]
ATTACH_TIMEOUT = 60.0
ECHO_TIMEOUT = 5.0
OUTPUT_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0
PROGRESS_EVERY = 2.0
SAMPLE_EVERY = 1.0
STOP_GRACE = 20.0


# -- what is measured ----------------------------------------------------------------------


@dataclass
class Recorder:
    """Every sample, with the time it was taken (seconds since the start)."""

    started: float = field(default_factory=time.monotonic)
    attach: list[float] = field(default_factory=list)
    echo: list[tuple[float, float]] = field(default_factory=list)
    paste: list[float] = field(default_factory=list)
    outputs: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    files: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter = field(default_factory=Counter)
    resources: list[dict[str, float]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    open_terminals: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


# -- the server's processes ----------------------------------------------------------------


def seq_bytes(lines: int) -> int:
    """Bytes that `seq 1 lines` writes."""
    total, width, low = 0, 1, 1
    while low <= lines:
        high = min(lines, low * 10 - 1)
        total += (high - low + 1) * (width + 1)
        width, low = width + 1, low * 10
    return total


def find_server_pid(url: str) -> int | None:
    """The pid listening on the URL's port (needs to see other processes' sockets: root)."""
    port = urllib.parse.urlsplit(url).port or 80
    with contextlib.suppress(psutil.AccessDenied, PermissionError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    return None


class ResourceSampler:
    """CPU and memory of the server process and, apart, of its direct (PTY) children."""

    def __init__(self, pid: int, recorder: Recorder) -> None:
        self.server = psutil.Process(pid)
        self.recorder = recorder
        self.children: dict[int, psutil.Process] = {}
        self.me = psutil.Process()
        self.server.cpu_percent(None)
        self.me.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> None:
        try:
            cpu = self.server.cpu_percent(None)
            rss = self.server.memory_info().rss
            kids = self.server.children(recursive=False)
        except psutil.NoSuchProcess:
            return
        kid_cpu, kid_rss = self._children(kids)
        self.recorder.resources.append({
            "t": round(self.recorder.now(), 2), "server_cpu": cpu, "server_rss": rss,
            "children": len(kids), "children_cpu": kid_cpu, "children_rss": kid_rss,
            # the whole host (all cores: 100 = one core busy) and this load generator, to tell
            # a slow server from a busy machine or a saturated client
            "host_cpu": psutil.cpu_percent(None) * (psutil.cpu_count() or 1), "loadgen_cpu": self.me.cpu_percent(None),
        })

    def _children(self, kids: list[psutil.Process]) -> tuple[float, int]:
        seen: dict[int, psutil.Process] = {}
        cpu, rss = 0.0, 0
        for kid in kids:
            proc = self.children.get(kid.pid, kid)
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
                seen[kid.pid] = proc
        self.children = seen
        return cpu, rss

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
        self.sample()


# -- a user --------------------------------------------------------------------------------


@dataclass
class Plan:
    """What users do and how often (from the command line)."""

    base_url: str
    tabs: int
    keys_per_second: float
    burst_every: float
    big_every: float
    big_lines: int
    files: bool
    list_interval: float


class TabWorker:
    """One terminal tab: attach, then type commands, paste bursts and big outputs until stopped."""

    def __init__(self, plan: Plan, rec: Recorder, cookie: str, tab: str, stop: asyncio.Event) -> None:
        self.plan, self.rec, self.cookie, self.tab, self.stop = plan, rec, cookie, tab, stop
        self.rng = random.Random(hash((cookie, tab)))
        self.term: TermClient | None = None
        self.next_burst = self.rng.uniform(0.3, 1.0) * plan.burst_every
        self.next_big = self.rng.uniform(0.3, 1.0) * plan.big_every
        self.started = 0.0

    async def run(self) -> None:
        if not await self.attach():
            return
        self.rec.open_terminals += 1
        try:
            while not self.stop.is_set() and not self.term.closed:
                await self.one_action()
                await self.think(self.rng.uniform(0.3, 1.5))
        except TerminalClosed:
            self.rec.error("terminal_closed")
        finally:
            self.rec.open_terminals -= 1
            self.term.close()

    async def attach(self) -> bool:
        ws_url = self.plan.base_url.replace("http", "ws", 1)
        started = time.perf_counter()
        try:
            self.term = await OurTerminal.open(ws_url, self.cookie, self.tab, ATTACH_TIMEOUT)
            await wait_first_output(self.term, ATTACH_TIMEOUT)
        except (TimeoutError, TerminalClosed, OSError, Exception) as exc:
            errors = self.term.errors if self.term else []
            self.rec.error("attach_error_frame" if errors else f"attach_{type(exc).__name__}")
            if self.term:
                self.term.close()
            return False
        self.rec.attach.append(time.perf_counter() - started)
        self.rec.counts["terminals_opened"] += 1
        self.started = time.monotonic()
        await self.term.settle(0.3)
        return True

    async def think(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def one_action(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed >= self.next_big:
            self.next_big = elapsed + self.plan.big_every * self.rng.uniform(0.7, 1.3)
            await self.big_output()
        elif elapsed >= self.next_burst:
            self.next_burst = elapsed + self.plan.burst_every * self.rng.uniform(0.7, 1.3)
            await self.paste()
        else:
            await self.type_command(self.rng.choice(COMMANDS))

    async def type_command(self, command: str) -> None:
        for char in command:
            if self.stop.is_set():
                break
            try:
                rtt = await echo_once(self.term, char, ECHO_TIMEOUT)
                self.rec.echo.append((self.rec.now(), rtt))
                self.rec.counts["keystrokes"] += 1
            except TimeoutError:
                self.rec.error("echo_timeout")
            await asyncio.sleep(max(0.02, self.rng.expovariate(self.plan.keys_per_second)))
        await self.term.send("\x15" if self.stop.is_set() else "\r")
        self.rec.counts["commands"] += 1
        await self.term.settle(0.2, 5.0)
        self.term.mark()
        self.term.trim()

    async def paste(self) -> None:
        """A pasted line (one frame of ~200 characters): time until its end is echoed."""
        tail = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(12))
        line = "echo " + "".join(self.rng.choice(string.ascii_letters) for _ in range(190)) + tail
        await self.timed(line, tail, self.rec.paste, "paste_timeout", ECHO_TIMEOUT)
        await self.term.send("\x15")  # not run: only the echo of the burst matters
        await self.term.settle(0.2, 5.0)
        self.rec.counts["pastes"] += 1

    async def big_output(self) -> None:
        tag = "".join(self.rng.choice(string.ascii_uppercase) for _ in range(6))
        before = self.term.bytes_in
        samples: list[float] = []
        await self.timed(f"seq 1 {self.plan.big_lines}; echo {tag[:3]}''{tag[3:]}\r", tag, samples,
                         "output_timeout", OUTPUT_TIMEOUT)
        if samples:
            self.rec.outputs.append((self.term.bytes_in - before, samples[0]))
            self.rec.counts["big_outputs"] += 1
        await self.term.settle(0.2, 5.0)

    async def timed(self, text: str, marker: str, into: list[float], timeout_kind: str, timeout: float) -> None:
        self.term.mark()
        self.term.trim()
        future = self.term.expect(lambda out: marker in visible(out[-4096:]))
        started = time.perf_counter()
        await self.term.send(text)
        try:
            into.append(await asyncio.wait_for(future, timeout) - started)
        except TimeoutError:
            self.rec.error(timeout_kind)
        self.term.mark()
        self.term.trim()


class FileWorker:
    """A user's browser tab: `/list-files` every 300 ms, a read, a write, an upload now and then."""

    def __init__(self, plan: Plan, rec: Recorder, cookie: str, stop: asyncio.Event) -> None:
        self.plan, self.rec, self.cookie, self.stop = plan, rec, cookie, stop
        self.port = urllib.parse.urlsplit(plan.base_url).port or 80
        self.conn: HttpConnection | None = None
        self.rng = random.Random(cookie)

    async def run(self) -> None:
        await self.call("PUT /file", "PUT", "/file/notes.txt", self.note())
        tick = 0
        while not self.stop.is_set():
            await self.call("GET /list-files", "GET", "/list-files")
            tick += 1
            if tick % 15 == 0:
                await self.call("GET /file", "GET", "/file/notes.txt")
            if tick % 25 == 0:
                await self.call("PUT /file", "PUT", "/file/notes.txt", self.note())
            if tick % 60 == 0:
                await self.upload()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.plan.list_interval)
        if self.conn:
            self.conn.close()

    def note(self) -> bytes:
        lines = self.rng.randint(20, 200)
        return "".join(f"line {i} {self.rng.random()}\n" for i in range(lines)).encode()

    async def upload(self) -> None:
        boundary = "loadtest" + "".join(self.rng.choice(string.ascii_lowercase) for _ in range(12))
        payload = os.urandom(64 * 1024)
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"upload.bin\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        body = head + payload + f"\r\n--{boundary}--\r\n".encode()
        await self.call("POST /upload", "POST", "/upload", body, f"multipart/form-data; boundary={boundary}")

    async def call(self, name: str, method: str, path: str, body: bytes | None = None,
                   content_type: str | None = None) -> None:
        head = request_head(method, path, self.cookie, None if body is None else len(body), content_type)
        started = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = await HttpConnection.open(self.port)
            status, _ = await asyncio.wait_for(self.conn.request(head, body or b""), HTTP_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.rec.error(f"http_connection {name}")
            if self.conn:
                self.conn.close()
            self.conn = None
            return
        if status >= 400:
            self.rec.error(f"http_{status} {name}")
            return
        self.rec.files[name].append((self.rec.now(), time.perf_counter() - started))


async def run_user(plan: Plan, rec: Recorder, index: int, delay: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    if stop.is_set():
        return
    try:
        cookie = await dev_login(plan.base_url, f"load{index}@example.com")
    except Exception:
        rec.error("login")
        return
    rec.counts["users_signed_in"] += 1
    jobs = [TabWorker(plan, rec, cookie, f"L{t + 1}", stop).run() for t in range(plan.tabs)]
    if plan.files:
        jobs.append(FileWorker(plan, rec, cookie, stop).run())
    await asyncio.gather(*jobs)


# -- progress and the report ---------------------------------------------------------------


def recent(samples: list[tuple[float, float]], since: float) -> list[float]:
    return [v for t, v in samples if t >= since]


async def progress(rec: Recorder, stop: asyncio.Event, total: float, quiet: bool) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_EVERY)
        if quiet:
            continue
        now = rec.now()
        echo = sorted(recent(rec.echo, now - 10))
        files = sorted(v for s in rec.files.values() for v in recent(s, now - 10))
        res = rec.resources[-1] if rec.resources else None
        line = (f"[{now:6.1f}/{total:.0f}s] users {rec.counts['users_signed_in']} terminals {rec.open_terminals} | "
                f"echo(10s) p50 {percentile(echo, 50) * 1000:.1f} p95 {percentile(echo, 95) * 1000:.1f} ms "
                f"n={len(echo)} | files p50 {percentile(files, 50) * 1000:.1f} ms | errors {sum(rec.errors.values())}")
        if res:
            line += (f" | server {res['server_cpu']:.0f}% {mib(res['server_rss'])} MiB, {res['children']} children "
                     f"{mib(res['children_rss'])} MiB")
        print(line.replace("nan", "-"), file=sys.stderr, flush=True)


def timeline(rec: Recorder, bucket: float) -> list[dict[str, Any]]:
    """Per `bucket` seconds: echo p50/p95, file API p50, and samples counted."""
    rows: dict[int, dict[str, list[float]]] = defaultdict(lambda: {"echo": [], "files": []})
    for t, v in rec.echo:
        rows[int(t // bucket)]["echo"].append(v)
    for samples in rec.files.values():
        for t, v in samples:
            rows[int(t // bucket)]["files"].append(v)
    out = []
    for key in sorted(rows):
        echo, files = sorted(rows[key]["echo"]), sorted(rows[key]["files"])
        out.append({"t": key * bucket, "echo_n": len(echo),
                    "echo_p50_ms": round(percentile(echo, 50) * 1000, 2) if echo else None,
                    "echo_p95_ms": round(percentile(echo, 95) * 1000, 2) if echo else None,
                    "files_n": len(files), "files_p50_ms": round(percentile(files, 50) * 1000, 2) if files else None})
    return out


def resource_summary(rec: Recorder) -> dict[str, Any]:
    rows = rec.resources
    if not rows:
        return {"available": False}

    def stats(key: str, scale: float = 1.0) -> dict[str, float]:
        values = [r[key] / scale for r in rows]
        return {"start": round(values[0], 1), "mean": round(sum(values) / len(values), 1),
                "max": round(max(values), 1), "end": round(values[-1], 1)}

    return {"available": True, "server_cpu_percent": stats("server_cpu"), "server_rss_mib": stats("server_rss", 2**20),
            "children_count": stats("children"), "children_cpu_percent": stats("children_cpu"),
            "children_rss_mib": stats("children_rss", 2**20), "host_cpu_percent": stats("host_cpu"),
            "loadgen_cpu_percent": stats("loadgen_cpu"), "samples": rows}


def build_report(rec: Recorder, args: argparse.Namespace, wall: float, pid: int | None) -> dict[str, Any]:
    out_bytes = sum(b for b, _ in rec.outputs)
    out_seconds = sum(s for _, s in rec.outputs)
    program_bytes = seq_bytes(args.big_lines) * len(rec.outputs)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": machine_info(),
        "server": {"url": args.url, "pid": pid},
        "wall_seconds": round(wall, 1),
        "counts": dict(rec.counts),
        "attach_ms": summarize(rec.attach, digits=1),
        "echo_ms": summarize([v for _, v in rec.echo]),
        "paste_echo_ms": summarize(rec.paste),
        # `bytes` is what reached the client (tmux redraws the screen, so far less than the
        # program wrote); `program_mb_per_second` is the program's output rate end to end.
        "output": {"runs": len(rec.outputs), "bytes": out_bytes, "seconds": round(out_seconds, 2),
                   "mb_per_second": round(out_bytes / out_seconds / 1e6, 2) if out_seconds else None,
                   "program_bytes": program_bytes,
                   "program_mb_per_second": round(program_bytes / out_seconds / 1e6, 2) if out_seconds else None,
                   "run_seconds": summarize([s for _, s in rec.outputs], scale=1.0)},
        "files_ms": {name: summarize([v for _, v in samples]) for name, samples in sorted(rec.files.items())},
        "errors": dict(rec.errors),
        "resources": resource_summary(rec),
        "timeline": timeline(rec, max(1.0, round(wall / 60))),
    }


def print_table(report: dict[str, Any]) -> None:
    def row(label: str, s: dict[str, Any], unit: str = "ms") -> None:
        if s.get("n"):
            print(f"  {label:<26} n={s['n']:<7} p50 {s['p50']:>8.2f}  p95 {s['p95']:>8.2f}  "
                  f"p99 {s['p99']:>8.2f}  max {s['max']:>8.2f} {unit}")
        else:
            print(f"  {label:<26} no samples")

    print(f"load test: {report['config']['users']} users x {report['config']['tabs']} tabs, "
          f"{report['wall_seconds']} s against {report['server']['url']}")
    row("attach (open -> output)", report["attach_ms"])
    row("keystroke echo", report["echo_ms"])
    row("paste echo (200 chars)", report["paste_echo_ms"])
    out = report["output"]
    print(f"  {'large output (seq)':<26} runs={out['runs']} in {out['seconds']} s: program output "
          f"{out['program_mb_per_second']} MB/s; {out['bytes'] / 1e6:.2f} MB reached the client "
          f"({out['mb_per_second']} MB/s)")
    for name, s in report["files_ms"].items():
        row(name, s)
    print(f"  errors: {report['errors'] or 'none'}")
    res = report["resources"]
    if res["available"]:
        print(f"  server CPU mean {res['server_cpu_percent']['mean']}% max {res['server_cpu_percent']['max']}%; "
              f"RSS {res['server_rss_mib']['start']} -> max {res['server_rss_mib']['max']} MiB")
        print(f"  PTY children (docker exec; tmux clients locally): max {res['children_count']['max']:.0f}, "
              f"RSS max {res['children_rss_mib']['max']} MiB, CPU mean {res['children_cpu_percent']['mean']}%")
        print(f"  whole host CPU mean {res['host_cpu_percent']['mean']}% (100% = one core); "
              f"load generator CPU mean {res['loadgen_cpu_percent']['mean']}%")
    host = report.get("host_cpu") or {}
    if host.get("top_percent_by_name"):
        top = ", ".join(f"{name} {pct}%" for name, pct in list(host["top_percent_by_name"].items())[:8])
        print(f"  host CPU by process name: {top}; all containers {host.get('all_containers_percent')}%")


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None (said once) where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: chart skipped (pip install -r requirements-bench.txt)", file=sys.stderr)
        return None
    return plt


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Echo latency and file API latency, memory, and CPU over time, as a PNG."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (lat, mem, cpu) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    rows = report["timeline"]
    for key, label in (("echo_p50_ms", "echo p50"), ("echo_p95_ms", "echo p95"), ("files_p50_ms", "file API p50")):
        points = [(r["t"], r[key]) for r in rows if r[key] is not None]
        if points:
            lat.plot(*zip(*points, strict=True), label=label)
    lat.set_ylabel("latency (ms)")
    lat.legend(loc="upper left")
    samples = report["resources"].get("samples", [])
    if samples:
        t = [s["t"] for s in samples]
        mem.plot(t, [s["server_rss"] / 2**20 for s in samples], label="server RSS")
        mem.plot(t, [s["children_rss"] / 2**20 for s in samples], label="PTY children RSS (sum)")
        cpu.plot(t, [s["server_cpu"] for s in samples], label="server CPU")
        cpu.plot(t, [s["children_cpu"] for s in samples], label="PTY children CPU (sum)")
        cpu.plot(t, [s["host_cpu"] for s in samples], label="whole host", linestyle=":")
        cpu.plot(t, [s["loadgen_cpu"] for s in samples], label="load generator", linestyle="--")
    mem.set_ylabel("MiB")
    mem.legend(loc="upper left")
    cpu.set_ylabel("CPU %")
    cpu.set_xlabel("seconds")
    cpu.legend(loc="upper left")
    fig.suptitle(f"3Compute load test: {report['config']['users']} users x {report['config']['tabs']} tabs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- the run -------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    rec = Recorder()
    stop = asyncio.Event()
    plan = Plan(base_url=args.url, tabs=args.tabs, keys_per_second=args.keys_per_second,
                burst_every=args.burst_every, big_every=args.big_every, big_lines=args.big_lines,
                files=args.files, list_interval=args.list_interval)
    total = args.ramp + args.duration
    background = [asyncio.ensure_future(progress(rec, stop, total, args.quiet))]
    host = HostCpu()
    background.append(asyncio.ensure_future(host.run(stop)))
    if pid is not None:
        background.append(asyncio.ensure_future(ResourceSampler(pid, rec).run(stop)))
    users = [asyncio.ensure_future(run_user(plan, rec, i, args.ramp * i / args.users, stop))
             for i in range(args.users)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.gather(*users)), total)
    stop.set()
    done, pending = await asyncio.wait(users, timeout=STOP_GRACE)
    for task in pending:
        task.cancel()
        rec.error("stop_timeout")
    await asyncio.gather(*background, return_exceptions=True)
    report = build_report(rec, args, rec.now(), pid)
    report["host_cpu"] = host.summary()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:5555", help="a running server (--dev), loopback only")
    target.add_argument("--spawn", choices=("docker", "local"), help="start a server with this backend instead")
    p.add_argument("--server-pid", type=int, help="the server's pid (found from its port when omitted)")
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--tabs", type=int, default=2, help="terminal tabs per user")
    p.add_argument("--duration", type=float, default=60.0, help="seconds, after the ramp-up")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds over which users arrive")
    p.add_argument("--keys-per-second", type=float, default=6.0, help="typing rate of each tab")
    p.add_argument("--burst-every", type=float, default=20.0, help="seconds between pastes, per tab")
    p.add_argument("--big-every", type=float, default=30.0, help="seconds between large outputs, per tab")
    p.add_argument("--big-lines", type=int, default=100000, help="lines of `seq` in a large output")
    p.add_argument("--list-interval", type=float, default=0.3, help="seconds between /list-files polls")
    p.add_argument("--no-files", dest="files", action="store_false", help="terminals only, no file API traffic")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest.json", help="JSON report path")
    p.add_argument("--no-chart", dest="chart", action="store_false", help="skip the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    check_bounds(p, args)
    return args


def check_bounds(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.users <= MAX_USERS:
        p.error(f"--users must be 1..{MAX_USERS}")
    if not 1 <= args.tabs <= MAX_TABS:
        p.error(f"--tabs must be 1..{MAX_TABS}")
    if args.users * args.tabs > MAX_TERMINALS:
        p.error(f"at most {MAX_TERMINALS} terminals (users x tabs)")
    if not 0 < args.duration <= MAX_DURATION or not 0 <= args.ramp <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION}] and --ramp in [0, {MAX_DURATION}]")
    if args.keys_per_second <= 0 or args.list_interval < 0.05 or not 1 <= args.big_lines <= 10**7:
        p.error("--keys-per-second must be > 0, --list-interval >= 0.05, --big-lines 1..10000000")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.spawn:
        with running_server(args.spawn, port_block=max(300, args.users * 10 + 100), limits_off=False) as server:
            args.url = server.base_url
            return asyncio.run(drive(args, server.pid))
    require_loopback(args.url)
    pid = args.server_pid or find_server_pid(args.url)
    if pid is None:
        print("server pid not found (not root?): CPU and memory not sampled; pass --server-pid", file=sys.stderr)
    return asyncio.run(drive(args, pid))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart = args.out.with_suffix(".png")
    if args.chart and write_chart(report, chart):
        report["chart"] = str(chart)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out}" + (f" and {chart}" if report.get("chart") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
