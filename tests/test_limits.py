"""Limits no user can get past (local backend, real sockets on loopback): terminals per user
and on the server (WebSocket and Socket.IO counted together), the open rate, and the
per-user and per-IP request buckets. Each: reached, refused with its error, a bystander
unaffected, and freed again."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.parse

import psutil
import pytest
from tornado.httpclient import HTTPResponse

from threecompute.containers.backend import BackendError
from threecompute.pty import TerminalHub, TerminalLimit, TerminalLimits
from threecompute.ratelimit import Rate, RateLimiter
from threecompute.settings import ConfigError, load_settings

from . import conftest
from .conftest import Client, body_json
from .terminal_client import TerminalClient
from .test_hub import FakeBackend, Output, user
from .test_socketio import Term, login, refused_with, run, tmux_servers, until  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
TRY_AGAIN_LATER = 1013


@pytest.fixture
def limits() -> dict[str, str]:
    return {"MAX_TERMINALS_PER_USER": "3", "MAX_TERMINALS": "5"}


@pytest.fixture
def server_env(data_dir, provider, http_port, limits) -> dict[str, str]:
    return conftest.test_environ(data_dir, provider, http_port, **limits)


def pty_children() -> int:
    """PTY children of this process (the server runs in it): one per attached terminal."""
    return len(psutil.Process().children())


async def ws_open(base_url: str, cookie: str, tab: str = "1") -> TerminalClient:
    client = Client(base_url)
    client.cookies = dict(part.split("=", 1) for part in cookie.split("; "))
    return await TerminalClient.open(client, tab=tab)


async def ws_ready(base_url: str, cookie: str, tab: str = "1") -> TerminalClient:
    term = await ws_open(base_url, cookie, tab)
    await term.run("echo up-$((20+1))", "up-21")
    return term


async def ws_refused(base_url: str, cookie: str) -> tuple[str, int]:
    """The error frame's message and the close code of a terminal the server refuses."""
    term = await ws_open(base_url, cookie)
    message = await term.read_error()
    assert await term.connection.read_message() is None  # then closed
    return message, term.connection.close_code


async def until_terminals(services, count: int) -> None:
    await until(lambda: len(services.hub.terminals()) == count and services.hub.metrics()["terminal_slots"] == count,
                f"{count} terminals in the hub")


# -- terminals ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_terminals_per_user_both_transports_together(base_url, login, services):  # noqa: F811
    ann, bob = await login("ann@example.com"), await login("bob@example.com")
    sockets = [await ws_ready(base_url, ann, "1"), await ws_ready(base_url, ann, "2")]
    sio = Term(base_url + "/", ann, tab="3")
    await sio.connect()
    await run(sio, "echo sio-$((3*3))", "sio-9")
    await until_terminals(services, 3)
    children = pty_children()

    message, code = await ws_refused(base_url, ann)
    assert code == TRY_AGAIN_LATER and "at most 3 per user" in message, (code, message)
    events = await refused_with(Term(base_url + "/", ann, tab="4"))
    assert ("error", {"message": "too many terminals open: at most 3 per user"}) in events, events
    assert events[-1] == ("disconnect",), events
    assert pty_children() == children  # nothing was spawned for the refused ones
    assert services.hub.metrics()["terminals_refused_total"] == 2

    bystander = await ws_ready(base_url, bob)  # another user is not affected
    await run(sio, "echo still-$((4*4))", "still-16")  # nor are ann's open terminals

    sockets.pop().close()  # one closed: its slot is free again
    await until_terminals(services, 3)
    again = await ws_ready(base_url, ann, "2")
    for term in (*sockets, again, bystander):
        term.close()
    await sio.close()
    await until_terminals(services, 0)


@pytest.mark.gen_test(timeout=60)
async def test_terminals_on_the_whole_server(base_url, login, services):  # noqa: F811
    users = [await login(f"u{i}@example.com") for i in range(3)]
    open_ = [await ws_ready(base_url, users[0], t) for t in ("1", "2", "3")]
    open_ += [await ws_ready(base_url, users[1], t) for t in ("1", "2")]
    children = pty_children()
    message, code = await ws_refused(base_url, users[2])
    assert code == TRY_AGAIN_LATER and "too many terminals" in message and "server" in message, message
    events = await refused_with(Term(base_url + "/", users[2]))
    assert events[1][0] == "error" and "server" in events[1][1]["message"], events
    assert pty_children() == children
    await open_[3].run("echo alive-$((5+5))", "alive-10")  # the open ones keep working
    open_.pop().close()
    await until_terminals(services, 4)
    open_.append(await ws_ready(base_url, users[2]))
    for term in open_:
        term.close()
    await until_terminals(services, 0)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("limits", [{"TERMINAL_OPEN_RATE_LIMIT": "0.1/4"}])
async def test_opening_and_closing_in_a_loop_is_rate_limited(base_url, login, services):  # noqa: F811
    ann, bob = await login("ann@example.com"), await login("bob@example.com")
    started = time.monotonic()  # one token back every 10 s: none while this loops
    for _ in range(4):  # the burst
        term = await ws_ready(base_url, ann)
        term.close()
    await until_terminals(services, 0)
    children = pty_children()
    message, code = await ws_refused(base_url, ann)
    assert code == TRY_AGAIN_LATER and "too fast" in message, message
    events = await refused_with(Term(base_url + "/", ann))
    assert events[1][0] == "error" and "too fast" in events[1][1]["message"], events
    assert pty_children() == children
    (await ws_ready(base_url, bob)).close()  # bob has his own bucket
    await asyncio.sleep(max(0.0, started + 10.5 - time.monotonic()))  # one token back
    (await ws_ready(base_url, ann)).close()
    await until_terminals(services, 0)


# -- requests -----------------------------------------------------------------------------


def assert_429(response: HTTPResponse) -> int:
    assert response.code == 429, (response.code, response.body)
    assert body_json(response) == {"error": "too many requests; slow down"}
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("limits", [{"FILE_RATE_LIMIT": "2/5"}])
async def test_file_api_bucket_per_user(make_client, tmux_servers, caplog):  # noqa: F811
    ann, bob = make_client(), make_client()
    await ann.dev_login("ann@example.com")
    await bob.dev_login("bob@example.com")
    paths = ["/list-files", "/list-files", "/file/a.txt", "/list-files", "/list-files"]
    answers = [await ann.fetch(p, "PUT" if p.startswith("/file") else "GET", b"x" if p.startswith("/file") else None)
               for p in paths]
    assert [a.code for a in answers] == [200] * 5
    refused = await ann.fetch("/file/b.txt", "PUT", b"refused")
    retry_after = assert_429(refused)
    assert (await ann.fetch("/file/b.txt")).code == 429
    assert 'threecompute_refused_total{limit="files"} 2.0\n' in (await bob.fetch("/metrics")).body.decode()
    refusals = [r for r in caplog.records if "rate limit files" in r.getMessage()]
    assert len(refusals) == 1, refusals  # logged once, not once per request
    assert (await bob.fetch("/list-files")).code == 200  # bob's own bucket
    assert (await make_client().fetch("/list-files")).code == 401  # no identity: no bucket, 401 first
    await asyncio.sleep(min(retry_after, 1.0))  # 2 a second: one token back after 0.5 s
    listing = body_json(await ann.fetch("/list-files"))["files"]
    assert listing == ["a.txt"]  # the refused PUT wrote nothing


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("limits", [{"TABS_RATE_LIMIT": "1/3"}])
async def test_tab_saves_bucket_per_user(make_client, tmux_servers):  # noqa: F811
    ann, bob = make_client(), make_client()
    await ann.dev_login("ann@example.com")
    await bob.dev_login("bob@example.com")
    for i in range(3):
        answer = await ann.fetch("/tabs", "POST", {"tabs": ["1", str(i + 2)], "active_tab": "1"})
        assert answer.code == 200, answer.body
    assert_429(await ann.fetch("/tabs", "POST", {"tabs": ["1", "9"], "active_tab": "9"}))
    assert body_json(await ann.fetch("/tabs"))["tabs"] == ["1", "4"]  # reading is not limited, nothing saved
    assert (await bob.fetch("/tabs", "POST", {"tabs": ["5"], "active_tab": "5"})).code == 200
    await asyncio.sleep(1.05)
    assert (await ann.fetch("/tabs", "POST", {"tabs": ["1", "9"], "active_tab": "9"})).code == 200


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("limits", [{"SIGNIN_RATE_LIMIT": "1/3"}])
async def test_sign_in_bucket_per_ip(http_port, http_server, services, tmux_servers):  # noqa: F811
    base_url = f"http://127.0.0.1:{http_port}"  # by address: the client binds its source address

    async def dev_login(source: str, email: str) -> HTTPResponse:
        return await Client(base_url).fetch("/dev-login?" + urllib.parse.urlencode({"email": email}),
                                            network_interface=source)

    codes = [(await dev_login("127.0.0.1", f"s{i}@example.com")).code for i in range(3)]
    assert codes == [302, 302, 302]
    assert_429(await dev_login("127.0.0.1", "s4@example.com"))
    assert_429(await Client(base_url).fetch("/auth/login"))
    assert_429(await Client(base_url).fetch("/callback?state=x&code=y"))
    bystander = await Client(base_url).fetch("/auth/login", network_interface="127.0.0.2")  # another address
    assert bystander.code == 302
    assert {u.email for u in await services.store.list_users()} == {f"s{i}@example.com" for i in range(3)}
    await asyncio.sleep(1.05)
    assert (await dev_login("127.0.0.1", "s4@example.com")).code == 302


def test_the_defaults_never_touch_a_busy_frontend(tmp_path):
    """Four pages of one user, each polling /list-files every 300 ms and saving a file every
    2 s, for ten simulated minutes, and a class of 300 signing in from one address at once."""
    settings = load_settings(["--dev"], {}, dotenv=tmp_path / "none")
    files, signin = RateLimiter(settings.file_rate), RateLimiter(settings.signin_rate)
    refused = 0
    for step in range(int(600 / 0.3)):
        now = step * 0.3
        for page in range(4):
            refused += files.take("ann", now + page * 0.01) > 0
        if step % 7 == 0:
            refused += files.take("ann", now + 0.05) > 0
    assert refused == 0
    assert all(signin.take("10.0.0.1", 1000 + i * 0.01) == 0 for i in range(300))
    assert any(signin.take("10.0.0.1", 1003.1) > 0 for _ in range(100))  # but not unbounded


def test_a_bucket_refills_and_forgets_idle_keys():
    limiter = RateLimiter(Rate(2, 3), max_keys=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)
    assert limiter.take("a", 0.5) == 0
    limiter.take("b", 1.0)
    limiter.take("c", 1.0)  # "a" is dropped: it would have refilled anyway
    assert [limiter.take("a", 1.0) for _ in range(3)] == [0, 0, 0]
    assert RateLimiter(None).take("x") == 0


def test_only_buckets_full_again_are_forgotten():
    limiter = RateLimiter(Rate(2, 4), max_keys=100)  # full again 2 s after the last take
    limiter.take("idle", 5.0)
    assert [limiter.take("drained", 10.0) for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.worth_reporting("drained", 10.0)
    limiter.forget_idle(now=10.2)
    assert limiter.take("drained", 10.2) > 0, "a drained bucket forgotten would let a flood through"
    assert not limiter.worth_reporting("drained", 10.2), "nor log every refusal"
    assert list(limiter._buckets) == ["drained"], "idle since 5.0: full, forgotten"
    limiter.forget_idle(now=30.0)
    assert not limiter._buckets and not limiter._reported
    assert [limiter.take("drained", 30.0) for _ in range(4)] == [0, 0, 0, 0]


@pytest.mark.parametrize("value", ["20", "x/10", "0/10", "5/0", "nan/3", "1/2.5"])
def test_rate_settings_are_validated(value, tmp_path):
    with pytest.raises(ConfigError, match="FILE_RATE_LIMIT"):
        load_settings(["--dev"], {"FILE_RATE_LIMIT": value}, dotenv=tmp_path / "none")
    assert load_settings(["--dev"], {"FILE_RATE_LIMIT": "off"}, dotenv=tmp_path / "none").file_rate is None
    assert load_settings(["--dev"], {"FILE_RATE_LIMIT": "7/70"}, dotenv=tmp_path / "none").file_rate == Rate(7, 70)


# -- the hub alone: opens in flight count, and a refusal calls nothing -----------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_flood_of_opens_at_once_gets_exactly_the_limit(tmp_path):
    backend = FakeBackend()
    hub = TerminalHub(backend, TerminalLimits(max_per_user=5, max_total=8))
    ann, bob = user(tmp_path, "ann"), user(tmp_path, "bob")
    outputs = [Output() for _ in range(60)]
    # 60 opens at once, all waiting on `ensure` together: only the first 5 get a slot.
    results = await asyncio.gather(*(hub.open(ann, "1", 24, 80, o.send, o.on_exit) for o in outputs),
                                   return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TerminalLimit)]
    assert (len(opened), len(refused)) == (5, 55), results
    assert len(backend.events("ensure")) == 5  # refused before anything was asked of the backend
    bobs = [await hub.open(bob, "1", 24, 80, Output().send, lambda: None) for _ in range(3)]
    with pytest.raises(TerminalLimit, match="server"):
        await hub.open(bob, "1", 24, 80, Output().send, lambda: None)
    assert hub.metrics()["terminals_refused_total"] == 56
    await hub.close(opened[0])
    again = await hub.open(bob, "2", 24, 80, Output().send, lambda: None)  # freed on close
    await hub.close_all()
    assert hub.metrics()["terminal_slots"] == 0 and again.closed and all(b.closed for b in bobs)


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_open_gives_its_slot_back(tmp_path):
    backend = FakeBackend()
    hub = TerminalHub(backend, TerminalLimits(max_per_user=1, max_total=1))
    backend.ensure_error = BackendError("engine down")
    for _ in range(3):
        with pytest.raises(BackendError, match="engine down"):
            await hub.open(user(tmp_path, "ann"), "1", 24, 80, Output().send, lambda: None)
    backend.ensure_error = None
    terminal = await hub.open(user(tmp_path, "ann"), "1", 24, 80, Output().send, lambda: None)
    await hub.close(terminal)
    assert hub.metrics()["terminal_slots"] == 0


class SlowBackend(FakeBackend):
    """`ensure` takes until `ready` is set, like an engine making containers under load."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()
        self.made = 0

    async def ensure(self, user):  # noqa: ANN001, ANN201 - the backend's signature
        self.calls.append(("ensure", user.user_id))
        await self.ready.wait()
        self.made += 1
        return await super().ensure(user)


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_leaves_while_waiting_frees_its_slot_at_once(tmp_path):
    backend = SlowBackend()
    hub = TerminalHub(backend, TerminalLimits(max_per_user=2, max_total=10))
    ann = user(tmp_path, "ann")
    waiting = [asyncio.ensure_future(hub.open(ann, "1", 24, 80, Output().send, lambda: None)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(TerminalLimit):
        await hub.open(ann, "1", 24, 80, Output().send, lambda: None)
    for task in waiting:  # both clients give up (their sockets close)
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert hub.metrics()["terminal_slots"] == 0
    retry = asyncio.ensure_future(hub.open(ann, "1", 24, 80, Output().send, lambda: None))  # room again
    backend.ready.set()
    terminal = await retry
    await asyncio.sleep(0.05)
    assert backend.made == 3  # the abandoned ensures still ran to the end (the container is made whole)
    assert hub.metrics()["ensure_errors_total"] == 0
    await hub.close(terminal)
    assert hub.metrics()["terminal_slots"] == 0
