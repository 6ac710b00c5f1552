"""Socket.IO at /socket.io/ with a real python-socketio client over loopback (local backend):
echo and resize, resuming a tab, refusals (cookie, Origin, tab id, container errors),
malformed events, both transports, many clients, flow control against a stalled client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import engineio
import psutil
import pytest
import socketio

from threecompute.containers.backend import AttachCommand, BackendError, Box
from threecompute.handlers.auth import dev_user_id
from threecompute.handlers.terminal import close_all_sockets
from threecompute.terminal_frames import LOST_TERMINAL_MESSAGE

from .conftest import FRONTEND, Client

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

INBOX = 8  # messages a client holds before it stops reading its socket
TAIL = 64 * 1024  # output kept per client: a `yes` flood must not grow the test process


class OrderedEngineIO(engineio.Client):
    """engineio.Client that hands messages on one at a time, in order, from one thread.

    The stock client starts a thread per message, so output could be seen out of order, and
    a disconnect handled before `connect()` has returned is ignored; the frontend's client
    has neither problem. So: one worker, which after each message waits for `connect()` to
    have returned (`settled`). The inbox is bounded: a handler that blocks fills it, and then
    the read loop stops reading the socket, like a stalled browser tab.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX)
        self.settled = threading.Event()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _trigger_event(self, event: str, *args: Any, run_async: bool = False, **kwargs: Any) -> Any:
        if event in ("message", "disconnect"):  # a close must not overtake the messages before it
            self.inbox.put((event, args))
            return None
        return super()._trigger_event(event, *args, run_async=run_async, **kwargs)

    def _work(self) -> None:
        while (item := self.inbox.get()) is not None:
            super()._trigger_event(item[0], *item[1], run_async=False)
            self.settled.wait()


class OrderedClient(socketio.Client):
    def _engineio_client_class(self) -> type:
        return OrderedEngineIO


class Term:
    """One Socket.IO terminal client; records what it saw, keeps the last TAIL of output."""

    def __init__(self, base_url: str, cookie: str | None = None, tab: str = "1",
                 transports: list[str] | None = None, origin: str | None = None, rcvbuf: int = 0) -> None:
        self.url = f"{base_url}?tabId={tab}"
        self.cookie = cookie
        self.headers = {"Cookie": cookie} if cookie else {}
        if origin is not None:  # websocket-client sends its own Origin unless told
            self.headers["Origin"] = origin
        self.transports = transports or ["websocket"]
        self.output = ""
        self.events: list[tuple] = []
        self.stall = threading.Event()  # set: the output handler blocks until cleared
        self.unstalled = threading.Event()
        self.lock = threading.Lock()
        ws_options: dict[str, Any] = {"origin": origin} if origin else {}
        if rcvbuf:  # a small window, so that a stalled reader fills the kernel's buffers quickly
            ws_options["sockopt"] = [(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)]
        self.sio = OrderedClient(reconnection=False, handle_sigint=False, websocket_extra_options=ws_options)
        self.sio.on("connect", lambda: self.events.append(("connect",)))
        self.sio.on("disconnect", lambda reason=None: self.events.append(("disconnect",)))
        self.sio.on("error", lambda data: self.events.append(("error", data)))
        self.sio.on("pty-output", self._on_output)

    def _on_output(self, data: dict) -> None:
        if self.stall.is_set():
            self.unstalled.wait()
        with self.lock:
            self.output = (self.output + data["output"])[-TAIL:]

    async def connect(self) -> None:
        try:
            await asyncio.to_thread(self.sio.connect, self.url, headers=self.headers,
                                    transports=self.transports, wait_timeout=10)
        finally:
            self.sio.eio.settled.set()

    async def close(self) -> None:
        self.unstalled.set()
        await asyncio.to_thread(self.sio.disconnect)
        self.sio.eio.settled.set()
        self.sio.eio.inbox.put(None)

    def type(self, text: str) -> None:
        self.sio.emit("pty-input", {"input": text})

    def errors(self) -> list[str]:
        return [e[1].get("message") for e in self.events if e[0] == "error"]

    def seen(self) -> str:
        with self.lock:
            return f"events={self.events[-6:]!r} output tail={self.output[-400:]!r}"


async def until(check: Callable[[], bool], what: str, term: Term | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout} s; {term.seen() if term else ''}")
        await asyncio.sleep(0.02)


async def run(term: Term, command: str, expect: str, timeout: float = 10) -> None:
    """Type `command` and wait for `expect` (computed by the shell, so the echo cannot match)."""
    term.type(command + "\r")
    await until(lambda: expect in term.output, repr(expect), term, timeout)


async def signed_in(make_client: Callable[[], Client], email: str) -> str:
    client = make_client()
    await client.dev_login(email)
    return client.cookie_header()


@pytest.fixture
def sio_url(base_url: str, http_server) -> str:
    return base_url + "/"


def zombie_children() -> list[psutil.Process]:
    zombies = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child)
    return zombies


@pytest.fixture
def tmux_servers(services, io_loop) -> Iterator[list[str]]:
    """Emails whose tmux servers are killed afterwards (local sessions outlive the server)."""
    emails: list[str] = []
    yield emails
    # Closes started by a client's disconnect may still be reaping their PTY child; one whose
    # loop stops first would stay a zombie. (The hub's close_all waits only for open ones.)
    with contextlib.suppress(AssertionError):
        io_loop.run_sync(lambda: until(lambda: not services.hub.terminals() and not zombie_children(),
                                       "every terminal closed and reaped", timeout=5))
    sockets = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
    for email in emails:
        name = services.backend.socket_name(dev_user_id(email))
        subprocess.run([services.backend.tmux, "-L", name, "kill-server"], capture_output=True, check=False)
        (sockets / name).unlink(missing_ok=True)  # tmux 3.3 leaves it behind


@pytest.fixture
def login(make_client, tmux_servers):
    async def sign_in(email: str = "ann@example.com") -> str:
        tmux_servers.append(email)
        return await signed_in(make_client, email)
    return sign_in


# -- the terminal ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_slow_container_start_shows_dim_progress_lines(sio_url, login, services, monkeypatch):
    real = services.backend.ensure

    async def slow_cold(user):  # noqa: ANN001, ANN202 - the backend's own signature
        await asyncio.sleep(0.6)
        return dataclasses.replace(await real(user), cold=True)

    monkeypatch.setattr(services.backend, "ensure", slow_cold)
    term = Term(sio_url, await login("slow@example.com"), tab="1")
    await term.connect()
    try:
        await run(term, "echo after-$((1+1))", "after-2")
        starting = "\x1b[2m[3compute] starting your workspace container…\x1b[0m\r\n"
        started = "\x1b[2m[3compute] workspace container started; attaching the terminal…\x1b[0m\r\n"
        assert term.output.startswith(starting + started), term.seen()
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=30)
async def test_resize_type_and_read_over_websocket(sio_url, login):
    term = Term(sio_url, await login(), tab="1")
    await term.connect()
    try:
        await run(term, "echo ready-$((40+2))", "ready-42")
        term.sio.emit("resize", {"cols": 101, "rows": 33})
        await run(term, "stty size", "33 101")
        await run(term, "printf 'caf\\303\\251-%s\\n' $((6*7))", "café-42")
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("transports", [["polling"], ["polling", "websocket"]], ids=["polling", "upgrade"])
async def test_polling_and_the_upgrade_from_it_work(sio_url, login, transports):
    term = Term(sio_url, await login(), tab="2", transports=transports)
    await term.connect()
    try:
        await run(term, "echo polled-$((40+2))", "polled-42")
        await until(lambda: term.sio.transport() == transports[-1], f"transport {transports[-1]}", term)
        await run(term, "echo then-$((40+2))", "then-42")
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=30)
async def test_reconnect_resumes_the_tab_and_disconnect_closes_the_terminal(sio_url, login, services):
    cookie = await login()
    first = Term(sio_url, cookie, tab="7")
    await first.connect()
    await run(first, "SIOVAR=kept-$((40+2)); echo set-$((1+1))", "set-2")
    user = dev_user_id("ann@example.com")
    [terminal] = services.hub.terminals_of(user)
    await first.close()
    await until(lambda: not services.hub.terminals_of(user), "the terminal closed after the disconnect")
    await asyncio.wait_for(terminal.session.wait_closed(), 5)
    assert not psutil.pid_exists(terminal.session.pid), "the PTY child was not reaped"

    second = Term(sio_url, cookie, tab="7")
    await second.connect()
    try:
        await run(second, "echo got-$SIOVAR", "got-kept-42")
    finally:
        await second.close()


@pytest.mark.gen_test(timeout=30)
async def test_exit_in_the_shell_disconnects_the_client(sio_url, login):
    term = Term(sio_url, await login(), tab="8")
    await term.connect()
    try:
        await run(term, "echo up-$((1+1))", "up-2")
        term.type("exit\r")
        await until(lambda: ("disconnect",) in term.events, "a disconnect", term)
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_terminal_that_lost_its_container_says_so_and_the_client_can_come_back(sio_url, login, services,
                                                                                       caplog):
    """The attach command killed (as when its engine or node dies): an `error` event that says
    to reconnect, then the connection drops; a new connection gets a working shell."""
    cookie = await login("lost@example.com")
    term = Term(sio_url, cookie, tab="1")
    await term.connect()
    try:
        await run(term, "echo up-$((1+1))", "up-2")
        (terminal,) = services.hub.terminals()
        os.kill(terminal.session.pid, signal.SIGKILL)
        await until(lambda: term.errors() == [LOST_TERMINAL_MESSAGE], "the lost-terminal error", term)
        await until(lambda: ("disconnect",) in term.events, "the dropped connection", term)
        assert f"tab 1 of {terminal.user_id}: its program ended with status -9" in caplog.text
    finally:
        await term.close()
    again = Term(sio_url, cookie, tab="1")
    await again.connect()
    try:
        await run(again, "echo back-$((40+2))", "back-42")
    finally:
        await again.close()


@pytest.mark.gen_test(timeout=30)
async def test_malformed_events_get_errors_and_the_session_stays_up(sio_url, login):
    term = Term(sio_url, await login(), tab="3")
    await term.connect()
    try:
        await run(term, "echo before-$((1+1))", "before-2")
        term.sio.emit("pty-input", {"input": 5})
        term.sio.emit("pty-input", "not an object")
        term.sio.emit("resize", {"cols": 0, "rows": 10})
        term.sio.emit("launch-missiles", {})
        await until(lambda: len(term.errors()) == 4, "four error events", term)
        assert "pty-input needs a string 'input'" in term.errors()[0], term.errors()
        assert "unknown frame type 'launch-missiles'" in term.errors()[3], term.errors()
        await run(term, "echo after-$((1+1))", "after-2")
        assert ("disconnect",) not in term.events, term.seen()
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=40)
async def test_twenty_clients_at_once_each_get_their_echo(sio_url, login):
    cookies = [await login(f"s{i}@example.com") for i in range(20)]
    mix = [["websocket"], ["polling"], ["polling", "websocket"]]
    terms = [Term(sio_url, cookie, tab="1", transports=mix[i % 3]) for i, cookie in enumerate(cookies)]
    try:
        await asyncio.gather(*(t.connect() for t in terms))
        for i, term in enumerate(terms):
            term.type(f"echo client-$((1000+{i}))\r")
        for i, term in enumerate(terms):
            await until(lambda t=term, i=i: f"client-{1000 + i}" in t.output, f"client {i}'s echo", term, 20)
    finally:
        await asyncio.gather(*(t.close() for t in terms))


@pytest.mark.gen_test(timeout=30)
async def test_shutdown_drops_the_connection_and_closes_the_terminal(sio_url, login, services):
    term = Term(sio_url, await login(), tab="4", transports=["polling"])
    await term.connect()
    try:
        await run(term, "echo up-$((1+1))", "up-2")
        await close_all_sockets(services)
        await until(lambda: term.sio.eio.state != "connected", "the connection dropped", term)
        assert services.hub.terminals() == []
        assert services.open_sockets == set()
    finally:
        await term.close()


# -- refusals ----------------------------------------------------------------------------


async def refused_with(term: Term) -> list[tuple]:
    """Connect (a refusal is an event after the connect, as the frontend expects) and return
    what the client saw until the server disconnected it."""
    await term.connect()
    await until(lambda: ("disconnect",) in term.events, "a disconnect", term)
    await term.close()
    return term.events


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("cookie", [None, "3compute_session=not.a.jwt"])
async def test_no_valid_cookie_gets_unauthorized_before_the_disconnect(sio_url, services, cookie):
    events = await refused_with(Term(sio_url, cookie))
    assert events == [("connect",), ("error", {"message": "Unauthorized"}), ("disconnect",)], events
    assert services.hub.terminals() == []


@pytest.mark.gen_test(timeout=30)
async def test_logged_out_cookie_is_unauthorized(sio_url, make_client, services):
    client = make_client()
    await client.dev_login("gone@example.com")
    cookie = client.cookie_header()
    await client.fetch("/auth/logout")
    events = await refused_with(Term(sio_url, cookie, transports=["polling"]))
    assert ("error", {"message": "Unauthorized"}) in events, events


@pytest.mark.gen_test(timeout=30)
async def test_bad_tab_id_is_refused_with_an_error(sio_url, login, services):
    events = await refused_with(Term(sio_url, await login(), tab="no-dashes"))
    assert events[1][0] == "error" and "tabId" in events[1][1]["message"], events
    assert events[-1] == ("disconnect",), events
    assert services.hub.terminals() == []


@pytest.mark.gen_test(timeout=30)
async def test_container_errors_are_reported_then_disconnected(sio_url, login, services, monkeypatch):
    async def engine_down(*args: Any, **kwargs: Any) -> None:
        raise BackendError("the container engine is not reachable")

    monkeypatch.setattr(services.hub, "open", engine_down)
    events = await refused_with(Term(sio_url, await login(), transports=["polling"]))
    assert events[1:] == [("error", {"message": "the container engine is not reachable"}), ("disconnect",)], events


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_foreign_origin_is_refused(sio_url, login, transport):
    term = Term(sio_url, await login(), transports=[transport], origin="http://evil.test")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await term.connect()
    assert term.events == [], term.seen()
    await term.close()


@pytest.mark.gen_test(timeout=30)
async def test_origin_rule_and_cors_on_the_handshake(client):
    path = "/socket.io/?EIO=4&transport=polling&tabId=1"
    frontend = await client.fetch(path, headers={"Origin": FRONTEND})
    assert frontend.code == 200, (frontend.code, frontend.body)
    assert frontend.headers.get("Access-Control-Allow-Origin") == FRONTEND
    assert frontend.headers.get("Access-Control-Allow-Credentials") == "true"
    own = await client.fetch(path, headers={"Origin": client.base_url})
    assert own.code == 200, (own.code, own.body)
    no_origin = await client.fetch(path)
    assert no_origin.code == 200, (no_origin.code, no_origin.body)
    assert "Access-Control-Allow-Origin" not in no_origin.headers
    for headers in ({"Origin": "http://evil.test"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = await client.fetch(path, headers=headers)
        assert refused.code == 403, (headers, refused.code, refused.body)
        assert "Access-Control-Allow-Origin" not in refused.headers, headers


# -- flow control ------------------------------------------------------------------------


def bare_shell(box: Box, tab_id: str, client_id: str, read_only: bool = False) -> AttachCommand:
    """bash without tmux in front: tmux redraws instead of streaming, which hides a flood."""
    env = {"PS1": "$ ", "HOME": str(box.user.workspace), "PATH": os.environ.get("PATH", os.defpath)}
    return AttachCommand(argv=["bash", "--norc", "--noprofile", "-i"], env=env, cwd=str(box.user.workspace))


@pytest.mark.gen_test(timeout=40)
@pytest.mark.parametrize("transports", [["websocket"], ["polling"], ["polling", "websocket"]],
                         ids=["websocket", "polling", "upgrade"])
async def test_yes_to_a_stalled_client_keeps_memory_bounded_and_ctrl_c_stops_it(sio_url, login, services,
                                                                                 monkeypatch, transports):
    monkeypatch.setattr(services.backend, "attach_command", bare_shell)
    term = Term(sio_url, await login(), tab="9", transports=transports, rcvbuf=16384)
    await term.connect()
    try:
        await run(term, "seq 1 30000 | tail -c 100000; echo warm-$((40+2))", "warm-42")
        await until(lambda: term.sio.transport() == transports[-1], f"transport {transports[-1]}", term)
        process = psutil.Process()
        before = process.memory_info().rss
        term.stall.set()
        term.type("yes\r")
        [terminal] = services.hub.terminals()
        peak, read_at = before, []
        for tick in range(30):  # ~3 s without reading
            await asyncio.sleep(0.1)
            peak = max(peak, process.memory_info().rss)
            if tick in (19, 29):
                read_at.append(terminal.session.stats.bytes_out)
        growth_mb = (peak - before) / 2**20
        seen = f"grew {growth_mb:.1f} MB; read {read_at} bytes from the PTY at 2 s and 3 s; {services.hub.metrics()}"
        assert terminal.session.paused and read_at[1] - read_at[0] < 256 * 1024, f"still reading: {seen}"
        assert growth_mb < 10, seen
        other = Term(sio_url, term.cookie, tab="10", transports=transports)
        await other.connect()
        try:
            await run(other, "echo other-tab-$((40+2))", "other-tab-42")  # while the first is still stalled
        finally:
            await other.close()
        term.type("\x03")
        term.stall.clear()
        term.unstalled.set()
        await run(term, "echo stopped-$((40+2))", "stopped-42", timeout=20)
    finally:
        await term.close()


@pytest.mark.gen_test(timeout=30)
async def test_files_changed_events_for_a_client_that_asks_for_them(sio_url, login, make_client):
    cookie = await login("files@example.com")
    watching = Term(sio_url, cookie, tab="1&events=files-changed")
    plain = Term(sio_url, cookie, tab="2")
    for term in (watching, plain):
        term.sio.on("files-changed", lambda data, term=term: term.events.append(("files-changed", data)))
        await term.connect()
    try:
        await run(watching, "echo ready-$((40+2))", "ready-42")
        client = make_client()
        client.cookies = dict(c.split("=", 1) for c in cookie.split("; "))
        assert (await client.fetch("/file/new.txt", method="PUT", body=b"x")).code == 200
        await until(lambda: ("files-changed", {}) in watching.events, "files-changed", watching)
        await asyncio.sleep(0.5)
        assert not [e for e in plain.events if e[0] == "files-changed"]
    finally:
        await watching.close()
        await plain.close()
