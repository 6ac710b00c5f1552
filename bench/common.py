"""What every benchmark and the load test share: a server process, sign-in, terminal clients,
percentiles, process memory and the results folder.

A `ServerProcess` is `server.py --dev` on loopback with a temporary DATA_DIR and a free
PORT_BASE. `running_server()` starts one and, whatever happens (an exception, Ctrl-C,
SIGTERM), stops it and removes everything its deployment made on the Docker engine: the
containers and networks labelled `3compute.deployment=<hash>` and its firewall chains.

Terminal clients share one interface (`send`, `expect`, `settle`, `close`) over four
transports: this server's JSON frames (`OurTerminal`, and `FloorTerminal` for
bench/floor_server.py), terminado's arrays (`TerminadoTerminal`), ttyd's type-byte frames
(`TtydTerminal`) and a bare PTY in this process (`RawTerminal`, the raw floor).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from threecompute.containers import deployment_id  # noqa: E402
from threecompute.handlers.auth import dev_user_id  # noqa: E402
from threecompute.scheduling import AUTOGROUP, session_group_nice  # noqa: E402
from threecompute.settings import Settings  # noqa: E402

COOKIE = "3compute_session"
PORT_LOW, PORT_HIGH = 20000, 40000
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# Escape sequences (CSI, OSC, charset selection, two-byte ESC x) hidden when looking for text.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()*+][0-~]|\x1b[@-_=>78]")
Predicate = Callable[[str], bool]


# -- ports, time, results ------------------------------------------------------------------


def normal_priority() -> None:
    """For a child that stands for the server's machine (the server, its engine): the nice value
    of 0 even when the harness lowered its own (the soak's load stands for other machines)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


# Every server measured here starts as a service manager starts one: in a session of its own
# (start_new_session), so it shares no scheduling group with the harness or the load. Ours then
# sets its group's nice itself (SERVER_NICE); a peer is given the same one (`as_a_peer_service`).
PEER_NICE = Settings().server_nice


@contextlib.contextmanager
def session_group_at(nice: int) -> Iterator[None]:
    """This process's session group at `nice` for a while, then as it was: how a load that
    stands for other machines yields the CPU (Linux shares it between sessions first, so a
    process's own nice value ranks it only within its session)."""
    before = session_group_nice()
    try:
        AUTOGROUP.write_text(f"{nice}\n")
    except OSError:  # no autogroup, or no right to change it
        before = None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):
                AUTOGROUP.write_text(f"{before}\n")


def as_a_peer_service() -> None:
    """preexec_fn (after setsid) of a peer server: normal priority, and the session group's
    nice value that ours gives itself, so both compete for the CPU on the same terms."""
    normal_priority()
    with contextlib.suppress(OSError):
        AUTOGROUP.write_text(f"{PEER_NICE}\n")


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports for PORT_BASE: in 20000-40000, and below the
    kernel's ephemeral range, so that no client socket takes a port a container publishes."""
    high = min(PORT_HIGH, ephemeral_low())
    for _ in range(300):
        start = random.randrange(PORT_LOW, high - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start
    raise RuntimeError(f"no block of {size} free ports in {PORT_LOW}-{PORT_HIGH}")


def ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def require_loopback(url: str) -> None:
    """Refuse any target but this machine: load is only ever sent to loopback."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing {url}: load is only sent to loopback addresses (127.0.0.0/8, ::1)")


def write_json(name: str, data: Any, folder: Path = RESULTS_DIR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def machine_info() -> dict[str, Any]:
    """Where a figure was measured: cores, memory, CPU, kernel, Docker, Python, date."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker_engine": docker_version(),
    }


def docker_version() -> str | None:
    if shutil.which("docker") is None:
        return None
    try:
        out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def sigterm_as_interrupt() -> None:
    """SIGTERM (make being stopped, a CI timeout) unwinds like Ctrl-C, so cleanups run."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run_main(main: Callable[[], Any]) -> None:
    """Run a benchmark's main; Ctrl-C or SIGTERM end it (after its cleanups) with status 130."""
    sigterm_as_interrupt()
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the server was stopped and its containers removed", file=sys.stderr)
        sys.exit(130)


# -- statistics ----------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples (q in 0..100)."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summarize(samples: Sequence[float], scale: float = 1000.0, digits: int = 3) -> dict[str, float | int]:
    """n, mean, p50, p95, p99, max (in ms by default) of samples given in seconds."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "mean": round(sum(ordered) / len(ordered) * scale, digits),
        "p50": round(percentile(ordered, 50) * scale, digits),
        "p95": round(percentile(ordered, 95) * scale, digits),
        "p99": round(percentile(ordered, 99) * scale, digits),
        "max": round(ordered[-1] * scale, digits),
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return round(a / b, digits)


# -- process memory ------------------------------------------------------------------------


def process_memory(pid: int) -> dict[str, int]:
    """RSS and USS (bytes) of one process; zeros if it is gone."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"rss": 0, "uss": 0}
    return {"rss": info.rss, "uss": info.uss}


def children_memory(pid: int) -> dict[str, Any]:
    """The direct children of `pid` (the PTY children: `docker exec`, or tmux clients locally)."""
    try:
        kids = psutil.Process(pid).children(recursive=False)
    except psutil.NoSuchProcess:
        kids = []
    rows = []
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = kid.memory_full_info()
            rows.append((info.rss, info.uss))
    count = len(rows)
    return {
        "count": count,
        "rss_total": sum(r for r, _ in rows),
        "uss_total": sum(u for _, u in rows),
        "rss_each": round(sum(r for r, _ in rows) / count) if count else 0,
        "uss_each": round(sum(u for _, u in rows) / count) if count else 0,
    }


def mib(n: float) -> float:
    return round(n / 2**20, 1)


CGROUP_DOCKER = Path("/sys/fs/cgroup/cpuacct/docker")


class HostCpu:
    """Where the whole machine's CPU goes, by process name, and in all containers together.

    Per name from psutil over every process (processes that both start and end between two
    samples, like a short `seq`, are missed there), and the containers' total from their
    cgroups (cgroup v1 `cpuacct`, which misses nothing). Sampled in a thread every few seconds.
    """

    EVERY = 5.0

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, float]] = {}
        self.by_name: Counter = Counter()
        self.containers_start = self.containers_seconds()
        self.started = time.monotonic()
        self.scan()

    @staticmethod
    def containers_seconds() -> float | None:
        if not CGROUP_DOCKER.is_dir():
            return None
        total = 0
        for usage in CGROUP_DOCKER.glob("*/cpuacct.usage"):
            with contextlib.suppress(OSError, ValueError):
                total += int(usage.read_text())
        return total / 1e9

    def scan(self) -> None:
        current: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None:
                continue
            used = times.user + times.system
            current[proc.pid] = (proc.info["name"] or "?", used)
            before = self.seen.get(proc.pid)
            self.by_name[proc.info["name"] or "?"] += used - before[1] if before else 0.0
        self.seen = current

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.EVERY)
            await asyncio.to_thread(self.scan)

    def summary(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        top = {name: round(100 * cpu / wall, 1) for name, cpu in self.by_name.most_common(10) if cpu > 0}
        out: dict[str, Any] = {"seconds": round(wall, 1), "top_percent_by_name": top}
        end = self.containers_seconds()
        if end is not None and self.containers_start is not None:
            out["all_containers_percent"] = round(100 * (end - self.containers_start) / wall, 1)
        return out


# -- the server under test -----------------------------------------------------------------


# Benchmarks measure raw capacity (50 terminals a user, a file API hammered from one
# account), so the per-user and per-IP limits are off for them; the load test keeps them.
LIMITS_OFF = {"MAX_TERMINALS_PER_USER": "100000", "MAX_TERMINALS": "100000", "TERMINAL_OPEN_RATE_LIMIT": "off",
              "FILE_RATE_LIMIT": "off", "TABS_RATE_LIMIT": "off", "SIGNIN_RATE_LIMIT": "off"}


@dataclass
class ServerProcess:
    """`server.py --dev` in its own process on loopback, with its own DATA_DIR."""

    backend: str
    root: Path
    port: int
    port_base: int
    proc: subprocess.Popen | None = None
    limits_off: bool = True
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "server.log"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def deployment(self) -> str:
        return deployment_id(self.data_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("FLASK_", "GOOGLE_", "OAUTH_", "DATA_DIR", "PORT_BASE", "CONTAINER_"))}
        return base | {
            "DATA_DIR": str(self.data_dir),
            "PORT_BASE": str(self.port_base),
            "MAX_CONTAINERS": "1000",
            "CONTAINER_PIDS": "1024",
            "IDLE_TIMEOUT_SECONDS": "3600",
            "IDLE_POLL_SECONDS": "3600",
            "PYTHONUNBUFFERED": "1",
        } | (LIMITS_OFF if self.limits_off else {}) | extra

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        args = [sys.executable, str(ROOT / "server.py"), "--dev", "--host", "127.0.0.1",
                "--port", str(self.port), "--backend", self.backend]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=self.root, env=self.environment(extra_env or {}),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=normal_priority, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not port_is_free(self.port, "127.0.0.1"):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server did not listen within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def remove_deployment(deployment: str) -> int:
    """Remove every container and network labelled with this deployment, and its firewall chains."""
    if shutil.which("docker") is None:
        return 0
    label = f"label=3compute.deployment={deployment}"
    ids = _docker_lines(["ps", "-aq", "--filter", label])
    if ids:
        _docker(["rm", "-f", *ids], timeout=120)
    networks = _docker_lines(["network", "ls", "-q", "--filter", label])
    if networks:
        _docker(["network", "rm", *networks], timeout=60)
    _remove_firewall(deployment)
    return len(ids)


def _docker(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _docker_lines(args: list[str]) -> list[str]:
    try:
        return _docker(args).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []


def _remove_firewall(deployment: str) -> None:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return
    from threecompute.containers.firewall import Firewall

    with contextlib.suppress(Exception):
        Firewall(f"3c-{deployment[:10]}", deployment[:10]).uninstall()


def remove_tmux_sockets(deployment: str) -> None:
    """The local backend's tmux servers outlive the server on purpose; a benchmark's must not."""
    folder = Path(f"/tmp/tmux-{os.geteuid()}")
    for sock in folder.glob(f"3c-{deployment}-*"):
        subprocess.run(["tmux", "-L", sock.name, "kill-server"], capture_output=True, timeout=10, check=False)
        sock.unlink(missing_ok=True)


@contextlib.contextmanager
def running_server(backend: str = "docker", port_block: int = 300,
                   extra_env: dict[str, str] | None = None, keep: bool = False,
                   limits_off: bool = True) -> Iterator[ServerProcess]:
    """A fresh server; on the way out (even on failure) it is stopped and its deployment removed."""
    port, port_base = free_port(), free_port_block(port_block)
    root = Path(tempfile.mkdtemp(prefix="3compute-bench-"))
    server = ServerProcess(backend=backend, root=root, port=port, port_base=port_base, limits_off=limits_off)
    try:
        server.start(extra_env)
        print(f"server {server.base_url} (pid {server.pid}, backend {backend}, deployment {server.deployment}, "
              f"DATA_DIR {server.data_dir})", file=sys.stderr, flush=True)
        yield server
    finally:
        server.stop()
        if backend == "docker":
            removed = remove_deployment(server.deployment)
            print(f"cleanup: removed {removed} container(s) of deployment {server.deployment}", file=sys.stderr)
        else:
            remove_tmux_sockets(server.deployment)
        if not keep:
            remove_tree(root)


def remove_tree(root: Path, tries: int = 5) -> None:
    """rm -rf, again a moment later if a shell that was just hung up wrote its history meanwhile."""
    for _ in range(tries):
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            return
        time.sleep(0.2)


def container_of(deployment: str, email: str) -> str | None:
    """The running container of a dev-login user, found by its labels."""
    ids = _docker_lines(["ps", "-q", "--no-trunc", "--filter", f"label=3compute.deployment={deployment}",
                         "--filter", f"label=3compute.user={dev_user_id(email)}"])
    return ids[0] if ids else None


# -- HTTP ----------------------------------------------------------------------------------


async def dev_login(base_url: str, email: str) -> str:
    """Sign in through /auth/dev-login; the Cookie header value to send from now on."""
    url = f"{base_url}/auth/dev-login?" + urllib.parse.urlencode({"email": email})
    response = await AsyncHTTPClient().fetch(url, follow_redirects=False, raise_error=False, request_timeout=30)
    if response.code != 302:
        raise RuntimeError(f"dev-login answered {response.code}: {response.body[:200]!r} (is the server --dev?)")
    for header in response.headers.get_list("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == COOKIE:
            return f"{COOKIE}={rest.split(';', 1)[0]}"
    raise RuntimeError("dev-login set no session cookie")


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: send a request, read a Content-Length answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> HttpConnection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(head + body)
        await self.writer.drain()
        return await self.read_response()

    async def read_response(self) -> tuple[int, bytes]:
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("the server closed the connection")
        status = int(line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, cookie: str, length: int | None = None,
                 content_type: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Cookie: {cookie}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- terminal clients ----------------------------------------------------------------------


def visible(text: str) -> str:
    """Terminal output without its escape sequences."""
    return ANSI.sub("", text)


class TerminalClosed(Exception):
    """The terminal's connection ended while output was awaited."""


class TermClient:
    """Output arrives in `self.text`; `expect(pred)` resolves, with the arrival time, when
    the output since `mark()` satisfies `pred`."""

    kind = "?"

    def __init__(self) -> None:
        self.text = ""
        self.start = 0
        self.bytes_in = 0
        self.frames = 0
        self.errors: list[str] = []
        self.closed = False
        self.first_output_at: float | None = None
        self.last_output_at = time.perf_counter()
        self._waiter: tuple[Predicate, asyncio.Future] | None = None

    def mark(self) -> None:
        self.start = len(self.text)

    def since_mark(self) -> str:
        return self.text[self.start:]

    def expect(self, pred: Predicate) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiter = (pred, future)
        return future

    def received(self, text: str) -> None:
        now = time.perf_counter()
        if self.first_output_at is None:
            self.first_output_at = now
        self.last_output_at = now
        self.frames += 1
        self.bytes_in += len(text.encode("utf-8", "replace"))
        self.text += text
        self._check(now)

    def _check(self, now: float) -> None:
        if self._waiter is None:
            return
        pred, future = self._waiter
        if future.done():
            self._waiter = None
        elif pred(self.since_mark()):
            self._waiter = None
            future.set_result(now)

    def gone(self, reason: str) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter[1].done():
            self._waiter[1].set_exception(TerminalClosed(reason))
            self._waiter[1].exception()  # a waiter still gets it; one that left is no error to log
        self._waiter = None

    async def wait_for(self, pred: Predicate, timeout: float) -> float:
        """Arrival time of the output (since mark) that satisfies `pred`."""
        future = self.expect(pred)
        self._check(time.perf_counter())
        return await asyncio.wait_for(future, timeout)

    async def settle(self, quiet: float = 0.15, limit: float = 5.0) -> None:
        """Wait until no output has arrived for `quiet` seconds (at most `limit`)."""
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline and not self.closed:
            idle = time.perf_counter() - self.last_output_at
            if idle >= quiet:
                return
            await asyncio.sleep(quiet - idle)

    def trim(self) -> None:
        """Forget old output (a long run would otherwise keep it all)."""
        self.text, self.start = self.text[self.start:], 0

    async def send(self, text: str) -> None:
        raise NotImplementedError

    async def resize(self, rows: int, cols: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WebSocketTerminal(TermClient):
    """A terminal over a WebSocket, read by a background task."""

    def __init__(self, connection: WebSocketClientConnection) -> None:
        super().__init__()
        self.connection = connection
        self.close_code: int | None = None
        self._reader = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, url: str, timeout: float = 60, **request: Any) -> Self:
        http = HTTPRequest(url, connect_timeout=timeout, request_timeout=timeout, **request)
        return cls(await websocket_connect(http, max_message_size=64 * 2**20))

    async def _read_loop(self) -> None:
        while True:
            message = await self.connection.read_message()
            if message is None:
                self.close_code = self.connection.close_code
                self.gone(f"socket closed ({self.close_code})")
                return
            self.handle(message)

    def handle(self, message: str | bytes) -> None:
        raise NotImplementedError

    async def write(self, payload: str) -> None:
        if self.closed:
            raise TerminalClosed("socket closed")
        try:
            await self.connection.write_message(payload)
        except Exception as exc:  # WebSocketClosedError, StreamClosedError
            self.gone(str(exc))
            raise TerminalClosed(str(exc)) from exc

    def close(self) -> None:
        self.closed = True
        self.connection.close()
        self._reader.cancel()


class OurTerminal(WebSocketTerminal):
    """This server's `/terminal/ws`: `pty-input`/`resize` in, `pty-output`/`error` out."""

    kind = "3compute"

    @classmethod
    async def open(cls, ws_url: str, cookie: str, tab: str, timeout: float = 60) -> OurTerminal:
        return await cls.connect(f"{ws_url}/terminal/ws?tabId={tab}", timeout, headers={"Cookie": cookie})

    def handle(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if frame.get("type") == "pty-output":
            self.received(frame["data"]["output"])
        elif frame.get("type") == "error":
            self.errors.append(frame["data"]["message"])

    async def send(self, text: str) -> None:
        await self.write(json.dumps({"type": "pty-input", "data": {"input": text}}))

    async def resize(self, rows: int, cols: int) -> None:
        await self.write(json.dumps({"type": "resize", "data": {"rows": rows, "cols": cols}}))


class TerminadoTerminal(WebSocketTerminal):
    """terminado's protocol: `["stdin", text]`, `["set_size", r, c]` in; `["stdout", text]` out."""

    kind = "terminado"

    def handle(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if frame[0] == "stdout":
            self.received(frame[1])

    async def send(self, text: str) -> None:
        await self.write(json.dumps(["stdin", text]))

    async def resize(self, rows: int, cols: int) -> None:
        await self.write(json.dumps(["set_size", rows, cols, rows, cols]))


class FloorTerminal(OurTerminal):
    """bench/floor_server.py: this server's frames from the least a Python relay can do."""

    kind = "python-floor"


class RawTerminal(TermClient):
    """The floor: the same argv under a PTY in this process, read on this loop, no WebSocket."""

    kind = "raw"

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__()
        from ptyprocess import PtyProcess

        self.proc = PtyProcess.spawn(argv, env=env, dimensions=(24, 80))
        self.fd = self.proc.fd
        os.set_blocking(self.fd, False)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.gone("pty closed")
            return
        text = self._decoder.decode(data)
        if text:
            self.received(text)

    async def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    async def resize(self, rows: int, cols: int) -> None:
        self.proc.setwinsize(rows, cols)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
        self.closed = True
        with contextlib.suppress(Exception):
            self.proc.terminate(force=True)


async def echo_once(term: TermClient, char: str, timeout: float = 5.0) -> float:
    """Type one character; seconds until its echo arrives.

    A letter or digit must show in the output (escape sequences ignored); for anything
    else (a space may come back as a cursor movement) the first output counts, which is
    sound because the terminal is quiet when a keystroke is measured.
    """
    term.mark()
    term.trim()
    seen: Predicate = (lambda out: char in visible(out)) if char.isalnum() else bool
    future = term.expect(seen)
    started = time.perf_counter()
    await term.send(char)
    arrived = await asyncio.wait_for(future, timeout)
    return arrived - started


async def wait_first_output(term: TermClient, timeout: float) -> float:
    """Time at which the first output arrived."""
    await term.wait_for(lambda s: bool(s), timeout)
    assert term.first_output_at is not None
    return term.first_output_at


# -- the same attach command, for terminado and the raw floor ------------------------------


@dataclass
class AttachSpec:
    """argv, env and cwd of one tmux attachment, exactly as the server would run it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None

    def as_json(self) -> dict[str, Any]:
        return {"argv": self.argv, "env": self.env, "cwd": self.cwd}


def attach_spec(server: ServerProcess, email: str, tab: str, ref: str | None = None) -> AttachSpec:
    """The backend's own `attach_command` for a dev-login user's tab (their box must exist;
    `ref` is its container id when known)."""
    import secrets

    from threecompute.containers import make_backend
    from threecompute.containers.backend import Box, UserRef
    from threecompute.pty.terminal import attach_env
    from threecompute.settings import load_settings

    settings = load_settings(["--dev", "--host", "127.0.0.1", "--backend", server.backend],
                             server.environment({}), dotenv=server.root / "no.env")
    user_id = dev_user_id(email)
    user = UserRef(user_id=user_id, port_start=server.port_base,
                   workspace=settings.data_dir / "workspaces" / user_id)
    if server.backend == "docker":
        ref = ref or container_of(server.deployment, email)
        if ref is None:
            raise RuntimeError(f"no running container for {email}")
    else:
        ref = str(user.workspace)
    command = make_backend(settings).attach_command(Box(user=user, ref=ref), tab, secrets.token_hex(8))
    return AttachSpec(argv=command.argv, env=attach_env(command), cwd=command.cwd)


@dataclass
class SpecServerProcess:
    """A bench server module in its own process (like our server is) serving, at
    `/ws/<name>`, the command the benchmark wrote to `<spec_dir>/<name>.json`."""

    port: int
    spec_dir: Path
    proc: subprocess.Popen
    client: type[WebSocketTerminal]

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def open(self, name: str, spec: AttachSpec) -> WebSocketTerminal:
        (self.spec_dir / f"{name}.json").write_text(json.dumps(spec.as_json()))
        return await self.client.connect(f"ws://127.0.0.1:{self.port}/ws/{name}")


@contextlib.contextmanager
def running_spec_server(module: str, client: type[WebSocketTerminal], root: Path) -> Iterator[SpecServerProcess]:
    """`python -m <module> --port P --spec-dir DIR` (bench.terminado_server, bench.floor_server)."""
    spec_dir = root / f"{client.kind}-specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), "--spec-dir", str(spec_dir)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=as_a_peer_service)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while port_is_free(port, "127.0.0.1"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not start")
            time.sleep(0.05)
        yield SpecServerProcess(port=port, spec_dir=spec_dir, proc=proc, client=client)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- ttyd, the C peer (libwebsockets), serving the same argv -------------------------------

TTYD_DEFAULT = ROOT.parent / "shared" / "peers" / "ttyd"


def ttyd_path() -> Path | None:
    """The ttyd binary from TTYD (default ../shared/peers/ttyd), or None when it cannot run."""
    path = Path(os.environ.get("TTYD") or TTYD_DEFAULT)
    try:
        ok = subprocess.run([str(path), "--version"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return path if ok else None


def ttyd_missing_message() -> str:
    where = os.environ.get("TTYD") or TTYD_DEFAULT
    return (f"ttyd not found or not runnable at {where}: set TTYD=path to a ttyd binary "
            "(and run scripts/ttyd-deps.sh for its libraries); benchmarking without it")


class TtydTerminal(WebSocketTerminal):
    """ttyd's protocol: subprotocol `tty`, a JSON hello, then type-byte frames ('0' = data)."""

    kind = "ttyd"

    def __init__(self, connection: WebSocketClientConnection) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        super().__init__(connection)

    @classmethod
    async def open(cls, url: str, rows: int = 24, cols: int = 80, timeout: float = 60) -> TtydTerminal:
        request = HTTPRequest(url, connect_timeout=timeout, request_timeout=timeout)
        connection = await websocket_connect(request, max_message_size=64 * 2**20, subprotocols=["tty"])
        term = cls(connection)
        await term.write(json.dumps({"AuthToken": "", "columns": cols, "rows": rows}))
        return term

    def handle(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        if data[:1] == b"0":
            text = self._decoder.decode(data[1:])
            if text:
                self.received(text)

    async def send(self, text: str) -> None:
        await self.write("0" + text)

    async def resize(self, rows: int, cols: int) -> None:
        await self.write("1" + json.dumps({"columns": cols, "rows": rows}))


@dataclass
class TtydProcess:
    """One ttyd on loopback; each connection runs argv[0] with the rest of the argv sent as
    `?arg=` (`--url-arg`), so every tab gets exactly the command our server would run."""

    port: int
    program: str
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def open(self, spec: AttachSpec) -> TtydTerminal:
        if spec.argv[0] != self.program:
            raise RuntimeError(f"ttyd runs {self.program}, not {spec.argv[0]}")
        query = urllib.parse.urlencode([("arg", a) for a in spec.argv[1:]])
        return await TtydTerminal.open(f"ws://127.0.0.1:{self.port}/ws?{query}")


@contextlib.contextmanager
def running_ttyd(binary: Path, spec: AttachSpec) -> Iterator[TtydProcess]:
    """ttyd for the program of `spec`, with its environment and folder."""
    port = free_port()
    argv = [str(binary), "--port", str(port), "--interface", "127.0.0.1", "--writable", "--url-arg",
            spec.argv[0]]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / "ttyd.log").open("wb") as log:  # its own account of a closed socket
        proc = subprocess.Popen(argv, env=spec.env, cwd=spec.cwd or ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=as_a_peer_service)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while port_is_free(port, "127.0.0.1"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ttyd did not start (exit {proc.poll()})")
            time.sleep(0.05)
        yield TtydProcess(port=port, program=spec.argv[0], proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
