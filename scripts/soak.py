#!/usr/bin/env python3
"""Soak test with faults: many users for a long time while things break, then the books.

    python scripts/soak.py                                  # 100 users x 2 tabs, 15 minutes, every fault
    python scripts/soak.py --duration 60 --users 6 --faults exec,container,disk,restart

It starts its own server (`--spawn docker`, the default, or `local`) on loopback with its
DATA_DIR on a tmpfs of `--disk-mb` made for the run (root needed; never the real disk) and
the server's default limits on. Users come and go: each of `--users` slots signs in (as one
of `--identities` accounts in turn), keeps `--tabs` terminals busy like the load test (typing, pasting,
large `seq` output; scripts/loadtest.py's TabWorker), polls `/list-files` every 300 ms,
writes files and uploads now and then, leaves after a while and comes back. A terminal
that is cut is reopened a second later, as the frontend does. A bystander user types a
key every 100 ms in a tab of its own, each timed until its echo, from a process of its own;
with the Docker backend it also types, in turn, into a second tab attached by the server's
own `docker exec` command run under a PTY of its own, without the server: the echo the
machine gives under the same load, the floor for the first figure.
The simulated users stand for other machines' browsers, so they run at a lower priority
(`--load-nice`, default 10) than the server, its engine and the bystander, which yields them
the CPU when they need it, as they would have it with the clients elsewhere. The server and
the bystander each run in a session of their own, as a service and another machine would:
Linux shares the CPU between sessions first (autogroup), so the load's lower priority is
given to the soak's session group for the run (and restored after), and the server's
SERVER_NICE applies to its own group alone.

Faults on a schedule (`--faults`, each kind once in a short run, the cheap ones repeated in
a long one): `exec` kill -9 of random `docker exec` children of the server, `container`
a user container killed from outside, `disk` DATA_DIR filled to ENOSPC for a while then
freed, `restart` the server stopped with SIGTERM and started again, `dockerd` the engine
stopped for 20 s and started again (scripts/docker-engine.sh; this stops every container
on the engine, so it is never in the default of a shared machine's test run).

At the end, checked: every file write the server acknowledged (200) is on disk with its
content (a write whose answer was lost may or may not have landed; a refused one must not
have changed anything), no temporary file is left, no terminal, PTY child, descriptor or
container is leaked (counted after a warm-up and at the end, when every user has gone), the
server's memory is back within 10 % of the figure taken `--settle` seconds after the warm-up
(waited for up to `--memory-wait` seconds: the server lets idle users' records go 30 to 60 s
after their last use), and the bystander's echo p99 outside the fault windows is under 50 ms
(`--echo-limit-ms`). Report: results/soak.json and a PNG with the fault windows marked.
Exit status 0 only if every check passed.

Bounded: at most 200 users, 4 tabs each, two hours; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from docker.constants import DEFAULT_MAX_POOL_SIZE

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from loadtest import Plan, Recorder, TabWorker, pyplot  # noqa: E402

from bench.common import (  # noqa: E402
    HttpConnection,
    OurTerminal,
    RawTerminal,
    ServerProcess,
    TermClient,
    attach_spec,
    container_of,
    dev_login,
    echo_once,
    free_port,
    free_port_block,
    machine_info,
    normal_priority,
    percentile,
    remove_deployment,
    remove_tmux_sockets,
    remove_tree,
    request_head,
    session_group_at,
    sigterm_as_interrupt,
    summarize,
    wait_first_output,
)
from server import HOUSEKEEPING_SECONDS  # noqa: E402
from threecompute.handlers.auth import dev_user_id  # noqa: E402

MAX_USERS, MAX_TABS, MAX_DURATION = 200, 4, 7200
FAULT_KINDS = ("exec", "container", "disk", "restart", "dockerd")
DEFAULT_FAULTS = "exec,container,disk,restart,dockerd"
ECHO_LIMIT_MS = 50.0
MEMORY_TOLERANCE = 0.10
ENGINE_POOL_BOUND = DEFAULT_MAX_POOL_SIZE  # the docker SDK's connections per engine, kept for reuse
HTTP_TIMEOUT = 15.0
DOCKERD_DOWN_SECONDS = 20.0
SETTLE_AFTER_FAULT = 10.0  # seconds after a fault's end still counted inside its window
BYSTANDER_EVERY = 0.1  # seconds between the bystander's keystrokes
REF = "@container@"  # in the raw tab's argv, where the bystander's container id goes


# -- the bystander, in a process of its own --------------------------------------------------


def bystander_process(ws_url: str, cookie: str, raw: RawAttach | None, started: float, stop: Any, out: Any) -> None:
    """A key every BYSTANDER_EVERY seconds in a tab of its own, each timed until its echo, sent
    to `out` as ("echo", t, seconds), ("timeout", t) or ("reconnect", t), t on the soak's clock.
    With `raw`, the same bystander also types into the server's own attach command run here
    under a PTY, without the server ("raw_echo", ...): the machine's floor under the same load.

    A process of its own at normal priority, in a session of its own (the kernel's scheduling
    group), as a student's browser is a machine of its own: the load's event loop and its CPU
    time never sit in the bystander's figures."""
    os.setsid()
    normal_priority()
    now = lambda: time.monotonic() - started  # noqa: E731
    loops = [_bystander(lambda: OurTerminal.open(ws_url, cookie, "B", 60), "", now, stop, out)]
    if raw is not None:
        loops.append(_bystander(raw.open, "raw_", now, stop, out, offset=BYSTANDER_EVERY / 2))

    async def both() -> None:
        await asyncio.gather(*loops)
    asyncio.run(both())


@dataclass
class RawAttach:
    """The server's attach command for the bystander's raw tab, its container id left as REF."""

    argv: list[str]
    env: dict[str, str]
    deployment: str
    email: str

    async def open(self) -> RawTerminal:
        ref = await asyncio.to_thread(container_of, self.deployment, self.email)
        if ref is None:
            raise RuntimeError("the bystander has no container yet")
        return RawTerminal([ref if arg == REF else arg for arg in self.argv], self.env)


async def _bystander(open_terminal: Callable[[], Awaitable[TermClient]], kind: str, now: Any, stop: Any,
                     out: Any, offset: float = 0.0) -> None:
    rng = random.Random(f"bystander {kind}")
    await asyncio.sleep(offset)
    while not stop.is_set():
        term = None
        try:
            term = await open_terminal()
            await wait_first_output(term, 60)
            await term.settle(0.5)
            typed = 0
            while not stop.is_set() and not term.closed:
                try:
                    out.send((f"{kind}echo", now(), await echo_once(term, rng.choice(string.ascii_lowercase), 5.0)))
                except TimeoutError:
                    out.send((f"{kind}timeout", now()))
                typed += 1
                if typed % 40 == 0:
                    await term.send("\x15")  # clear the line
                    await term.settle(0.2, 2.0)
                await asyncio.sleep(BYSTANDER_EVERY)
        except Exception:  # a cut terminal, the server restarting: come back as the frontend does
            out.send((f"{kind}reconnect", now()))
        finally:
            if term is not None:
                term.close()
        await asyncio.sleep(1.0)


# -- what is recorded ----------------------------------------------------------------------


class SoakRecorder(Recorder):
    """The load test's recorder, with the time of each error (to tell fault windows apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.error_times: list[tuple[float, str]] = []
        self.bystander: list[tuple[float, float]] = []
        self.bystander_timeouts: list[float] = []
        self.bystander_raw: list[tuple[float, float]] = []  # the same keys without the server
        self.samples: list[dict[str, float]] = []
        self.faults: list[dict[str, Any]] = []

    def error(self, kind: str) -> None:
        super().error(kind)
        self.error_times.append((self.now(), kind))


@dataclass
class Ledger:
    """What each file may contain: the last acknowledged write, plus writes whose answer was lost."""

    possible: dict[tuple[str, str], set[bytes | None]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def outcome(self, email: str, path: str, content: bytes, status: int | None) -> None:
        key = (email, path)
        states = self.possible.setdefault(key, {None})
        if status == 200:
            self.possible[key] = {content}
            self.counts["acknowledged"] += 1
        elif status is None:  # sent, no answer: it may have landed
            states.add(content)
            self.counts["unknown"] += 1
        else:  # refused (507 while the disk is full, 429, ...): must have changed nothing
            self.counts[f"refused_{status}"] += 1

    def verify(self, workspaces: Path) -> dict[str, Any]:
        lost = []
        for (email, path), states in sorted(self.possible.items()):
            file = workspaces / dev_user_id(email) / path
            try:
                actual: bytes | None = file.read_bytes()
            except FileNotFoundError:
                actual = None
            if actual not in states:
                lost.append({"user": email, "path": path,
                             "found": None if actual is None else len(actual), "expected": len(states)})
        return {"files": len(self.possible), "lost": lost, **self.counts}


# -- the server on its own tmpfs -----------------------------------------------------------


@contextlib.contextmanager
def soak_server(backend: str, users: int, disk_mb: int,  # users: every identity
                log_copy: Path) -> Iterator[ServerProcess]:
    """bench.common's ServerProcess (limits on), with DATA_DIR on a tmpfs made here; all undone
    after, except the server's log, copied to `log_copy`."""
    if os.geteuid() != 0:
        raise SystemExit("soak: needs root, to put DATA_DIR on a tmpfs of its own")
    root = Path(tempfile.mkdtemp(prefix="3compute-soak-"))
    server = ServerProcess(backend=backend, root=root, port=free_port(),
                           port_base=free_port_block(max(300, users * 10 + 100)),
                           limits_off=False)
    server.data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_mb}m", "tmpfs", str(server.data_dir)], check=True)
    try:
        server.start(server_env())
        print(f"soak: server {server.base_url} pid {server.pid}, deployment {server.deployment}, "
              f"DATA_DIR {server.data_dir} (tmpfs {disk_mb} MiB)", file=sys.stderr, flush=True)
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.copyfile(server.log_path, log_copy)
        if backend == "docker":
            remove_containers(server.deployment)
        else:
            remove_tmux_sockets(server.deployment)
        if subprocess.run(["umount", str(server.data_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(server.data_dir)], check=False)
        remove_tree(root)


def remove_containers(deployment: str, tries: int = 5) -> None:
    """bench.common's clean-up, again while a busy engine times out (a hundred containers)."""
    for _ in range(tries):
        try:
            removed = remove_deployment(deployment)
        except subprocess.SubprocessError as exc:
            print(f"soak: cleanup: {exc}; again", file=sys.stderr)
            continue
        print(f"soak: cleanup removed {removed} container(s)", file=sys.stderr)
        return
    print(f"soak: cleanup gave up; remove the containers labelled 3compute.deployment={deployment}",
          file=sys.stderr)


_SECRET = os.urandom(24).hex()


def server_env() -> dict[str, str]:
    # One signing key for both lives of the server: sessions survive its restart, as in production.
    return {"IDLE_TIMEOUT_SECONDS": "3600", "FLASK_SECRET": _SECRET}


def deployment_containers(deployment: str, all_states: bool = True) -> list[tuple[str, str]]:
    """(id, user label) of the deployment's containers."""
    args = ["docker", "ps", "--no-trunc", "--format", '{{.ID}} {{.Label "3compute.user"}}',
            "--filter", f"label=3compute.deployment={deployment}"] + (["-a"] if all_states else [])
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if " " in line]  # type: ignore[misc]


# -- the run -------------------------------------------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    server: ServerProcess
    rec: SoakRecorder = field(default_factory=SoakRecorder)
    ledger: Ledger = field(default_factory=Ledger)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    restarting: bool = False
    emails: set[str] = field(default_factory=set)
    t0: float = 0.0  # when the soak proper starts (after the warm-up and the baseline)

    @property
    def plan(self) -> Plan:
        a = self.args
        return Plan(base_url=self.server.base_url, tabs=a.tabs, keys_per_second=a.keys_per_second,
                    burst_every=a.burst_every, big_every=a.big_every, big_lines=a.big_lines, files=True,
                    list_interval=0.3)

    # -- users ---------------------------------------------------------------------------

    async def sign_in(self, email: str, stop: asyncio.Event) -> str | None:
        for attempt in range(30):
            try:
                cookie = await dev_login(self.server.base_url, email)
                self.emails.add(email)
                self.rec.counts["sign_ins"] += 1
                return cookie
            except Exception:
                self.rec.error("sign_in")
            if await self.pause(stop, min(5.0, 0.5 * (attempt + 1))):
                return None
        return None

    async def pause(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep unless `stop` is set first; whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    async def user_slot(self, slot: int) -> None:
        rng = random.Random(slot)
        if await self.pause(self.stop, self.args.ramp * slot / self.args.users):
            return
        generation = 0
        while not self.stop.is_set():
            email = f"soak{slot}-{generation % self.args.identities}@example.com"
            generation += 1
            session = asyncio.Event()
            cookie = await self.sign_in(email, self.stop)
            if cookie is None:
                return
            self.rec.counts["sessions"] += 1
            jobs = [asyncio.ensure_future(self.tab_loop(cookie, f"S{t + 1}", session)) for t in range(self.args.tabs)]
            jobs.append(asyncio.ensure_future(self.file_loop(email, cookie, session, rng)))
            await self.pause(self.stop, rng.uniform(*self.args.session_seconds))
            session.set()
            await asyncio.gather(*jobs, return_exceptions=True)
            if await self.pause(self.stop, rng.uniform(2.0, 8.0)):  # gone for a while
                return

    async def tab_loop(self, cookie: str, tab: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await TabWorker(self.plan, self.rec, cookie, tab, stop).run()
            if await self.pause(stop, 1.0):  # cut off: reopen a second later, as the frontend does
                return
            self.rec.counts["terminal_reopens"] += 1

    async def file_loop(self, email: str, cookie: str, stop: asyncio.Event, rng: random.Random) -> None:
        conn: HttpConnection | None = None

        async def call(method: str, path: str, body: bytes | None = None,
                       content_type: str | None = None) -> int | None:
            nonlocal conn
            head = request_head(method, path, cookie, None if body is None else len(body), content_type)
            try:
                if conn is None:
                    conn = await HttpConnection.open(self.server.port)
                status, _ = await asyncio.wait_for(conn.request(head, body or b""), HTTP_TIMEOUT)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                self.rec.error(f"http_connection {method} {path.split('/')[1]}")
                if conn is not None:
                    conn.close()
                conn = None
                return None
            self.rec.counts[f"http_{method}"] += 1
            if status >= 400:
                self.rec.error(f"http_{status} {method} {path.split('/')[1]}")
            return status

        tick = 0
        try:
            while not stop.is_set():
                await call("GET", "/list-files")
                tick += 1
                if tick % 10 == 0:
                    name = f"soak-{tick // 10 % 4}.txt"
                    content = f"{email} {tick} {rng.random()}\n".encode() * rng.randint(1, 200)
                    self.ledger.outcome(email, name, content, await call("PUT", f"/file/{name}", content))
                if tick % 45 == 0:
                    name = f"up-{tick // 45 % 2}.bin"
                    content = os.urandom(rng.randint(1, 64) * 1024)
                    body, kind = multipart(name, content)
                    self.ledger.outcome(email, name, content, await call("POST", "/upload", body, kind))
                if tick % 30 == 0:
                    await call("GET", f"/file/soak-{tick // 10 % 4}.txt")
                if tick % 100 == 0:  # the frontend saves its tab list when tabs change
                    tabs = json.dumps({"tabs": ["S1", "S2"], "active_tab": f"S{tick // 100 % 2 + 1}"}).encode()
                    await call("POST", "/tabs", tabs, "application/json")
                await self.pause(stop, 0.3)
        finally:
            if conn is not None:
                conn.close()

    async def bystander(self) -> None:
        """The bystander (`bystander_process`) in a process of its own; its figures recorded here."""
        cookie = await self.sign_in("bystander@example.com", self.stop)
        if cookie is None:
            return
        context = multiprocessing.get_context("spawn")
        received, sending = context.Pipe(duplex=False)
        stop = context.Event()
        child = context.Process(target=bystander_process, daemon=True,
                                args=(self.server.ws_url, cookie, self.raw_attach(), self.rec.started, stop, sending))
        child.start()
        sending.close()
        loop = asyncio.get_running_loop()

        def drain() -> None:
            try:
                while received.poll():
                    self.record_bystander(received.recv())
            except (EOFError, OSError):
                loop.remove_reader(received.fileno())

        loop.add_reader(received.fileno(), drain)
        try:
            await self.stop.wait()
        finally:
            stop.set()
            await asyncio.to_thread(child.join, 15)
            if child.is_alive():
                child.kill()
            drain()
            loop.remove_reader(received.fileno())
            received.close()

    def raw_attach(self) -> RawAttach | None:
        if self.server.backend != "docker":
            return None
        email = "bystander@example.com"
        spec = attach_spec(self.server, email, "R", ref=REF)
        return RawAttach(spec.argv, spec.env, self.server.deployment, email)

    def record_bystander(self, event: tuple) -> None:
        kind, at, *rtt = event
        if kind == "echo":
            self.rec.bystander.append((at, rtt[0]))
        elif kind == "raw_echo":
            self.rec.bystander_raw.append((at, rtt[0]))
        elif kind == "timeout":
            self.rec.bystander_timeouts.append(at)
        else:  # a reconnect, or a timeout of the raw tab
            self.rec.error(f"bystander_{kind}")

    def measure(self) -> dict[str, float] | None:
        try:
            proc = psutil.Process(self.server.pid)
            with proc.oneshot():
                cpu = proc.cpu_times()
                return {"t": round(self.rec.now(), 2), "rss": proc.memory_info().rss, "fds": proc.num_fds(),
                        "children": len(proc.children(recursive=True)), "threads": proc.num_threads(),
                        "terminals": self.rec.open_terminals, "server_cpu_s": round(cpu.user + cpu.system, 2),
                        "soak_cpu_s": round(sum(psutil.Process().cpu_times()[:2]), 2),
                        "machine_busy_percent": psutil.cpu_percent(None)}
        except (psutil.NoSuchProcess, AssertionError):
            return None

    async def sampler(self) -> None:
        while not self.stop.is_set():
            sample = None if self.restarting else self.measure()
            if sample:
                self.rec.samples.append(sample)
            await self.pause(self.stop, 1.0)

    def descriptor_kinds(self) -> dict[str, int]:
        """The server's descriptors by kind (socket, pipe, anon_inode, file): where a leak would show.

        Connections to the Docker engine are counted apart ("engine"): the SDK keeps them in a
        pool of at most ENGINE_POOL_BOUND, so they grow with the busiest moment, not with time."""
        kinds: Counter = Counter()
        engine = engine_socket_inodes()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.server.pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{self.server.pid}/fd/{fd}")
                    kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
                    kinds["engine" if kind == "socket" and target[8:-1] in engine else kind] += 1
        return dict(kinds)

    async def quiet_point(self, settle: float = 3.0, timeout: float = 60.0) -> dict[str, float]:
        """Every terminal of the server closed and its children reaped (spare attachments
        too, within 5 s); `settle` seconds later, a measurement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sample = self.measure()
            if sample and sample["children"] == 0 and await self.open_terminals() == 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(max(3.0, settle))  # closes in flight finish their detach
        # Counted after a full collection (SIGUSR1): what only waits for the collector is not held.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.server.pid, signal.SIGUSR1)
        await asyncio.sleep(0.5)
        return {**(self.measure() or {}), "server_terminals": await self.open_terminals(),
                "descriptor_kinds": self.descriptor_kinds()}

    async def memory_returned(self, baseline: dict, end: dict, within: float) -> dict:
        """`end`, its memory measured again every 5 s until it is back within the tolerance of
        the baseline or `within` seconds have passed: the server lets go of idle users' records
        one to two housekeeping periods (30 s) after their last use."""
        started, limit = time.monotonic(), baseline.get("rss", 0) * (1 + MEMORY_TOLERANCE)
        settled = {**end, "rss_when_quiet": end.get("rss", 0)}
        while settled.get("rss", 0) > limit and time.monotonic() - started < within:
            await asyncio.sleep(4.5)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server.pid, signal.SIGUSR1)  # a full collection first, as at the baseline
            await asyncio.sleep(0.5)
            settled["rss"] = (self.measure() or settled)["rss"]
        return settled | {"memory_wait_seconds": round(time.monotonic() - started, 1)}

    async def open_terminals(self) -> float:
        try:
            conn = await HttpConnection.open(self.server.port)
            try:
                _, body = await asyncio.wait_for(conn.request(request_head("GET", "/metrics", "")), HTTP_TIMEOUT)
            finally:
                conn.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return -1
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("threecompute_open_terminals "):
                return float(line.split()[1])
        return -1

    # -- faults ---------------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        kinds = [k for k in self.args.faults if k in FAULT_KINDS]
        repeated = [k for k in kinds if k in ("exec", "container", "disk")]
        rounds = max(1, int(self.args.duration // 300))
        order = repeated * rounds
        for once in ("restart", "dockerd"):
            if once in kinds:
                order.insert(len(order) // 2 if once == "restart" else len(order), once)
        if not order:
            return []
        start, end = self.args.duration * 0.15, self.args.duration * 0.85
        step = (end - start) / max(1, len(order))
        return [(self.t0 + start + step * i, kind) for i, kind in enumerate(order)]

    async def faults(self) -> None:
        for at, kind in self.schedule():
            if await self.pause(self.stop, at - self.rec.now()):
                return
            started = self.rec.now()
            try:
                detail = await getattr(self, f"fault_{kind}")()
            except Exception as exc:  # a fault that could not be injected is reported, not fatal
                detail = {"failed": repr(exc)}
            self.rec.faults.append({"kind": kind, "start": round(started, 2), "end": round(self.rec.now(), 2),
                                    **detail})
            print(f"soak: fault {kind} at {started:.0f}s: {detail}", file=sys.stderr, flush=True)

    async def fault_exec(self) -> dict[str, Any]:
        kids = psutil.Process(self.server.pid).children()  # the server's only children: PTY clients
        chosen = random.sample(kids, min(3, len(kids)))
        for kid in chosen:
            with contextlib.suppress(psutil.NoSuchProcess):
                kid.send_signal(signal.SIGKILL)
        await asyncio.sleep(5.0)
        return {"killed": len(chosen), "of": len(kids)}

    async def fault_container(self) -> dict[str, Any]:
        if self.server.backend != "docker":
            return {"skipped": "local backend"}
        spare = dev_user_id("bystander@example.com")
        running = [c for c, user in deployment_containers(self.server.deployment, all_states=False) if user != spare]
        if not running:
            return {"skipped": "no container"}
        victim = random.choice(running)
        await asyncio.to_thread(subprocess.run, ["docker", "kill", victim], capture_output=True, timeout=60)
        await asyncio.sleep(15.0)
        return {"container": victim[:12]}

    async def fault_disk(self) -> dict[str, Any]:
        filler = self.server.data_dir / "filler"
        filled = await asyncio.to_thread(fill_disk, filler)
        await asyncio.sleep(self.args.disk_hold)
        filler.unlink(missing_ok=True)
        await asyncio.sleep(5.0)
        return {"filled_mib": round(filled / 2**20, 1), "held_seconds": self.args.disk_hold}

    async def fault_restart(self) -> dict[str, Any]:
        self.restarting = True
        try:
            code = await asyncio.to_thread(self.server.stop)
            await asyncio.to_thread(self.server.start, server_env())
        finally:
            self.restarting = False
        await asyncio.sleep(10.0)
        return {"exit_code": code, "new_pid": self.server.pid}

    async def fault_dockerd(self) -> dict[str, Any]:
        pids = default_engine()
        if not pids:
            return {"skipped": "no dockerd process for the default socket"}
        for proc in pids:
            proc.send_signal(signal.SIGTERM)
        gone: list[psutil.Process] = []
        # When the engine was gone and when it answered again: the rest of the fault's window
        # is the server's (and its users') recovery.
        times: dict[str, float] = {}
        try:
            gone, _ = await asyncio.to_thread(psutil.wait_procs, pids, 120)
            times["engine_gone_at"] = round(self.rec.now(), 2)
            await asyncio.sleep(DOCKERD_DOWN_SECONDS)
        finally:  # whatever happens (even a cancel), the engine is started again
            code = await asyncio.shield(asyncio.to_thread(start_engine))
            times["engine_back_at"] = round(self.rec.now(), 2)
        await asyncio.sleep(20.0)
        return {"stopped": len(gone), "restart_rc": code, "down_seconds": DOCKERD_DOWN_SECONDS, **times}


def default_engine() -> list[psutil.Process]:
    """The dockerd behind the default socket: its pidfile, else a plain `dockerd` (as
    scripts/docker-engine.sh starts it). Never another engine on the machine (one with its
    own -H socket or --pidfile is someone else's)."""
    with contextlib.suppress(OSError, ValueError, psutil.NoSuchProcess):
        proc = psutil.Process(int(Path("/var/run/docker.pid").read_text().strip()))
        if proc.name() == "dockerd":
            return [proc]
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "dockerd" and p.info["cmdline"] == ["dockerd"]]


def start_engine() -> int:
    """scripts/docker-engine.sh: starts dockerd the way the project does, if it is not answering."""
    return subprocess.run([str(ROOT / "scripts" / "docker-engine.sh")], capture_output=True, timeout=300,
                          preexec_fn=normal_priority).returncode


def fill_disk(filler: Path) -> int:
    """Write zeros until the filesystem is full; the bytes written."""
    written = 0
    block = b"\0" * (1 << 20)
    with filler.open("wb") as out:
        while True:
            try:
                out.write(block)
                out.flush()
                written += len(block)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                with contextlib.suppress(OSError):
                    out.truncate(written)
                try:
                    while True:  # the last partial megabyte, in small pieces
                        os.write(out.fileno(), b"\0" * 4096)
                        written += 4096
                except OSError:
                    return written


def multipart(name: str, content: bytes) -> tuple[bytes, str]:
    boundary = "soak" + os.urandom(8).hex()
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- the books -----------------------------------------------------------------------------


def engine_socket_inodes() -> set[str]:
    """Inodes of the unix sockets whose peer is a Docker engine's API socket (from `ss`), or
    whose peer is gone: an idle pooled connection to an engine that was stopped stays open
    until the pool hands it out again."""
    try:
        lines = subprocess.run(["ss", "-xn"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return set()
    engine_side, peers = set(), {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 8:
            local, inode, peer_inode = fields[4], fields[5], fields[7]
            peers[inode] = peer_inode
            if local.endswith("docker.sock"):
                engine_side.add(inode)
    return {inode for inode, peer in peers.items() if peer in engine_side or peer == "0"}


def in_windows(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= t <= end + SETTLE_AFTER_FAULT for start, end in windows)


def temp_files(workspaces: Path) -> list[str]:
    return [str(p.relative_to(workspaces)) for p in workspaces.rglob(".3compute-*.tmp")]


def container_books(soak: Soak, before: list[tuple[str, str]]) -> dict[str, Any]:
    if soak.server.backend != "docker":
        return {"checked": False}
    now = deployment_containers(soak.server.deployment)
    per_user = Counter(user for _, user in now)
    known = {dev_user_id(e) for e in soak.emails}
    return {"checked": True, "before": len(before), "after": len(now), "users_signed_in": len(known),
            "duplicates": sum(n - 1 for n in per_user.values() if n > 1),
            "unknown_owner": sum(n for user, n in per_user.items() if user not in known)}


def not_engine(point: dict) -> int:
    return point.get("fds", 0) - point.get("descriptor_kinds", {}).get("engine", 0)


def cpu_shares(samples: list[dict[str, Any]], windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Who kept the cores busy while terminals were open, outside the fault windows: the
    server (in cores), this load generator (in cores) and the machine as a whole (percent)."""
    server, soak_own, busy = [], [], []
    for a, b in zip(samples, samples[1:], strict=False):
        span = b["t"] - a["t"]
        if span <= 0 or not b.get("terminals") or in_windows(b["t"], windows) or "server_cpu_s" not in a:
            continue
        if b["server_cpu_s"] >= a["server_cpu_s"]:  # a restart starts the count again
            server.append((b["server_cpu_s"] - a["server_cpu_s"]) / span)
        soak_own.append((b["soak_cpu_s"] - a["soak_cpu_s"]) / span)
        busy.append(b["machine_busy_percent"])
    return {"server_cores": summarize(server, scale=1, digits=2),
            "soak_client_cores": summarize(soak_own, scale=1, digits=2),
            "machine_busy_percent": summarize(busy, scale=1, digits=1), "cores": os.cpu_count()}


def build_report(soak: Soak, baseline: dict, end: dict, files: dict, containers: dict, wall: float) -> dict[str, Any]:
    rec = soak.rec
    windows = [(f["start"], f["end"]) for f in rec.faults]
    outside = [v for t, v in rec.bystander if not in_windows(t, windows)]
    inside = [v for t, v in rec.bystander if in_windows(t, windows)]
    raw_outside = [v for t, v in rec.bystander_raw if not in_windows(t, windows)]
    errors_outside = Counter(k for t, k in rec.error_times if not in_windows(t, windows))
    leaks = {
        "pty_children": end.get("children", -1) - baseline.get("children", 0),
        "terminals": end.get("server_terminals", -1),  # still open at the server (-1: unread)
        "descriptors": max(0, not_engine(end) - not_engine(baseline)),
        "engine_connections_over_pool": max(0, end.get("descriptor_kinds", {}).get("engine", 0) - ENGINE_POOL_BOUND),
        "containers": containers.get("duplicates", 0) + containers.get("unknown_owner", 0),
        "temp_files": len(files["temp_files"]),
    }
    memory_ratio = end["rss"] / baseline["rss"] if baseline.get("rss") and end.get("rss") else None
    p99 = percentile(sorted(outside), 99) * 1000 if outside else None
    checks = {
        "nothing_lost": not files["lost"],
        "no_leaks": all(v == 0 for v in leaks.values()),
        "memory_within_10_percent": memory_ratio is not None and memory_ratio <= 1 + MEMORY_TOLERANCE,
        f"bystander_p99_under_{soak.args.echo_limit_ms:g}ms": p99 is not None and p99 < soak.args.echo_limit_ms,
        "every_fault_injected": all("failed" not in f for f in rec.faults) and len(rec.faults) == len(soak.schedule()),
    }
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(soak.args).items() if k != "out"},
        "machine": machine_info(),
        "wall_seconds": round(wall, 1),
        "passed": all(checks.values()),
        "checks": checks,
        "counts": dict(rec.counts),
        "faults": rec.faults,
        "files": files,
        "leaks": leaks,
        "containers": containers,
        "memory": {"baseline_mib": round(baseline.get("rss", 0) / 2**20, 1),
                   "when_quiet_mib": round(end.get("rss_when_quiet", 0) / 2**20, 1),
                   "end_mib": round(end.get("rss", 0) / 2**20, 1),
                   "waited_seconds": end.get("memory_wait_seconds"),
                   "ratio": None if memory_ratio is None else round(memory_ratio, 3)},
        "baseline": baseline, "end": end,
        "bystander_echo_ms": {"outside_faults": summarize(outside), "inside_faults": summarize(inside),
                              "timeouts": len(rec.bystander_timeouts)},
        # The same keys typed into the same attach command without the server: what the
        # machine alone gives under this load, the floor for the figures above.
        "bystander_raw_echo_ms": {"outside_faults": summarize(raw_outside)},
        "echo_ms": summarize([v for _, v in rec.echo]),
        "attach_ms": summarize(rec.attach, digits=1),
        "cpu": cpu_shares(rec.samples, windows),
        "errors": dict(rec.errors),
        "errors_outside_faults": dict(errors_outside),
        "samples": rec.samples,
        "bystander_samples": [(round(t, 2), round(v * 1000, 2)) for t, v in rec.bystander],
        "bystander_raw_samples": [(round(t, 2), round(v * 1000, 2)) for t, v in rec.bystander_raw],
    }


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Bystander echo, server memory and descriptors, open terminals; fault windows shaded."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (echo, mem, terms) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for key, label in (("bystander_samples", "bystander echo"), ("bystander_raw_samples", "same, without the server")):
        points = report[key]
        if points:
            echo.scatter([t for t, _ in points], [v for _, v in points], s=2, label=label)
    limit = report["config"]["echo_limit_ms"]
    echo.axhline(limit, color="red", linestyle=":", label=f"{limit:g} ms")
    echo.set_yscale("log")
    echo.set_ylabel("echo (ms)")
    samples = report["samples"]
    if samples:
        t = [s["t"] for s in samples]
        mem.plot(t, [s["rss"] / 2**20 for s in samples], label="server RSS (MiB)")
        mem.plot(t, [s["fds"] for s in samples], label="server descriptors")
        terms.plot(t, [s["terminals"] for s in samples], label="users' terminals open")
        terms.plot(t, [s["children"] for s in samples], label="server's child processes")
    colors = {"exec": "orange", "container": "purple", "disk": "brown", "restart": "red", "dockerd": "gray"}
    for axis in (echo, mem, terms):
        for fault in report["faults"]:
            axis.axvspan(fault["start"], fault["end"] + SETTLE_AFTER_FAULT, alpha=0.15,
                         color=colors.get(fault["kind"], "gray"))
        axis.legend(loc="upper left", fontsize=8)
    for fault in report["faults"]:
        echo.text(fault["start"], 0.98, fault["kind"], transform=echo.get_xaxis_transform(), fontsize=7,
                  rotation=90, va="top")
    terms.set_xlabel("seconds")
    verdict = "passed" if report["passed"] else "FAILED"
    fig.suptitle(f"3Compute soak: {report['config']['users']} users x {report['config']['tabs']} tabs, "
                 f"{report['wall_seconds']:.0f} s, {len(report['faults'])} faults: {verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


async def drive(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    # The simulated users stand for other machines' browsers: on this one they yield the CPU to
    # the server, its engine and the bystander (each started at normal priority).
    os.setpriority(os.PRIO_PROCESS, 0, args.load_nice)
    soak = Soak(args, server)
    sampler = asyncio.ensure_future(soak.sampler())
    # Warm-up: a few users come, work and go, so that pools and caches exist before the baseline.
    warm = Soak(argparse.Namespace(**{**vars(args), "users": min(5, args.users), "ramp": 0.0,
                                      "session_seconds": (args.warmup, args.warmup)}),
                server, rec=soak.rec, ledger=soak.ledger, emails=soak.emails)
    warm_jobs = [asyncio.ensure_future(warm.user_slot(1000 + i)) for i in range(warm.args.users)]
    await asyncio.sleep(args.warmup + 1)
    warm.stop.set()
    await asyncio.gather(*warm_jobs, return_exceptions=True)
    baseline = await soak.quiet_point(settle=args.settle)
    containers_before = deployment_containers(server.deployment) if server.backend == "docker" else []
    print(f"soak: baseline {baseline}", file=sys.stderr, flush=True)

    soak.t0 = soak.rec.now()
    jobs = [asyncio.ensure_future(soak.user_slot(i)) for i in range(args.users)]
    jobs.append(asyncio.ensure_future(soak.bystander()))
    faults = asyncio.ensure_future(soak.faults())
    progress = asyncio.ensure_future(report_progress(soak))
    await asyncio.sleep(max(0.0, soak.t0 + args.duration - soak.rec.now()))
    # A fault still under way (the engine coming back, say) finishes, with the users still there.
    await asyncio.wait([faults], timeout=300)
    soak.stop.set()
    await asyncio.gather(faults, return_exceptions=True)
    done, pending = await asyncio.wait(jobs, timeout=60)
    for task in pending:
        task.cancel()
        soak.rec.error("stop_timeout")
    await asyncio.gather(sampler, progress, return_exceptions=True)
    end = await soak.memory_returned(baseline, await soak.quiet_point(), args.memory_wait)
    files = soak.ledger.verify(server.data_dir / "workspaces")
    files["temp_files"] = temp_files(server.data_dir / "workspaces")
    return build_report(soak, baseline, end, files, container_books(soak, containers_before), soak.rec.now())


async def report_progress(soak: Soak) -> None:
    while not soak.stop.is_set():
        if await soak.pause(soak.stop, 10.0):
            return
        now = soak.rec.now()
        recent = sorted(v for t, v in soak.rec.bystander if t >= now - 10)
        sample = soak.rec.samples[-1] if soak.rec.samples else {}
        print(f"[{now:6.0f}s] terminals {soak.rec.open_terminals} | bystander p99(10s) "
              f"{percentile(recent, 99) * 1000 if recent else float('nan'):.1f} ms | server "
              f"{sample.get('rss', 0) / 2**20:.0f} MiB {sample.get('fds', 0):.0f} fds | acked writes "
              f"{soak.ledger.counts['acknowledged']} | errors {sum(soak.rec.errors.values())}",
              file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spawn", choices=("docker", "local"), default="docker", help="the server's backend")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--tabs", type=int, default=2)
    p.add_argument("--duration", type=float, default=900.0, help="seconds of soak, after the warm-up")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of a few users before the baseline")
    p.add_argument("--settle", type=float, default=2 * HOUSEKEEPING_SECONDS,
                   help="seconds between the warm-up's end and the baseline: the server lets idle users' "
                        "records go one to two housekeeping periods after their last use")
    p.add_argument("--memory-wait", type=float, default=75.0,
                   help="at most this many seconds, once everyone has gone, for the memory to come back")
    p.add_argument("--ramp", type=float, default=120.0, help="seconds over which the users arrive")
    p.add_argument("--identities", type=int, default=1,
                   help="accounts each user slot signs in as, in turn (more: more containers made)")
    p.add_argument("--session-seconds", type=float, nargs=2, default=(60.0, 240.0), metavar=("MIN", "MAX"),
                   help="how long a user stays before leaving (and coming back)")
    p.add_argument("--faults", type=lambda s: tuple(k for k in s.split(",") if k), default=DEFAULT_FAULTS,
                   help=f"comma-separated, of {','.join(FAULT_KINDS)} (empty: none)")
    p.add_argument("--disk-mb", type=int, default=256, help="size of the tmpfs DATA_DIR")
    p.add_argument("--disk-hold", type=float, default=15.0, help="seconds the disk stays full")
    p.add_argument("--keys-per-second", type=float, default=3.0)
    p.add_argument("--burst-every", type=float, default=30.0)
    p.add_argument("--big-every", type=float, default=60.0)
    p.add_argument("--big-lines", type=int, default=20000)
    p.add_argument("--load-nice", type=int, default=10, choices=range(20), metavar="0-19",
                   help="nice value of the simulated users (the server, engine and bystander keep 0)")
    p.add_argument("--echo-limit-ms", type=float, default=ECHO_LIMIT_MS,
                   help="the bystander's echo p99 outside fault windows must stay under this")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    args = p.parse_args(argv)
    if isinstance(args.faults, str):
        args.faults = tuple(k for k in args.faults.split(",") if k)
    unknown = set(args.faults) - set(FAULT_KINDS)
    if unknown:
        p.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    if not 1 <= args.users <= MAX_USERS or not 1 <= args.tabs <= MAX_TABS or not 1 <= args.identities <= 5:
        p.error(f"--users must be 1..{MAX_USERS}, --tabs 1..{MAX_TABS}, --identities 1..5")
    if not 10 <= args.duration <= MAX_DURATION or not 0 < args.warmup <= 300 or not 0 <= args.ramp <= 600:
        p.error(f"--duration must be 10..{MAX_DURATION} s, --warmup in (0, 300], --ramp in [0, 600]")
    if not 16 <= args.disk_mb <= 4096 or not 1 <= args.disk_hold <= 300 or not 0 <= args.memory_wait <= 600 \
            or not 0 <= args.settle <= 600:
        p.error("--disk-mb must be 16..4096, --disk-hold 1..300, --memory-wait and --settle 0..600")
    if args.spawn == "local" and ("container" in args.faults or "dockerd" in args.faults):
        p.error("the container and dockerd faults need --spawn docker")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    try:
        return run(args)
    finally:
        if "dockerd" in args.faults:
            start_engine()  # never leave the engine stopped, even after a crash or Ctrl-C


def run(args: argparse.Namespace) -> int:
    log_copy = args.out.with_name(args.out.stem + "-server.log")
    with soak_server(args.spawn, args.users * args.identities + 10, args.disk_mb, log_copy) as server:
        with session_group_at(args.load_nice):  # the server and bystander lead sessions of their own
            report = asyncio.run(drive(args, server))
        # Written before the clean-up, which can take minutes on a busy engine.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        chart = args.out.with_suffix(".png")
        if write_chart(report, chart):
            report["chart"] = str(chart)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    by, raw = report["bystander_echo_ms"]["outside_faults"], report["bystander_raw_echo_ms"]["outside_faults"]
    print(f"soak: {'PASSED' if report['passed'] else 'FAILED'} {report['checks']}\n"
          f"  {report['wall_seconds']} s, faults {[f['kind'] for f in report['faults']]}, counts {report['counts']}\n"
          f"  files {({k: v for k, v in report['files'].items() if k not in ('lost', 'temp_files')})}, "
          f"lost {len(report['files']['lost'])}, leaks {report['leaks']}, memory {report['memory']}\n"
          f"  bystander echo outside faults: n={by.get('n')} p50 {by.get('p50')} p99 {by.get('p99')} ms "
          f"(without the server: n={raw.get('n')} p50 {raw.get('p50')} p99 {raw.get('p99')} ms)\n"
          f"  cpu while terminals were open: {report['cpu']}\n"
          f"wrote {args.out}" + (f" and {chart}" if report.get("chart") else ""))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
