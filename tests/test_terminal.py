"""The terminal WebSocket end to end: real sockets on loopback, real PTYs, real tmux.

Every test runs on the local backend; those marked `docker` run again against the Docker
engine (the `backend` fixture's second value).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import psutil
import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from threecompute.terminal_frames import LOST_TERMINAL_MESSAGE

from .conftest import FRONTEND, Client
from .terminal_client import TerminalClient

BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture(params=BACKENDS)
def server_flags(request) -> list[str]:
    return ["--dev", "--backend", request.param, "--host", "127.0.0.1"]


async def signed_in(client: Client, email: str = "term@example.com") -> Client:
    await client.dev_login(email)
    return client


@pytest.mark.gen_test(timeout=90)
async def test_typed_input_is_echoed(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo $((6*7))", "42")
    await term.send({"type": "pty-input", "input": "echo top-level-$((1+1))\r"})  # fields at the top level
    await term.read_until("top-level-2")
    term.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_terminal_whose_program_fails_says_so_closes_with_1011_and_is_logged(client, services, caplog):
    term = await TerminalClient.open(await signed_in(client, "lost@example.com"))
    await term.run("echo up-$((1+1))", "up-2")
    (terminal,) = services.hub.terminals()
    os.kill(terminal.session.pid, signal.SIGKILL)  # as when its engine or node dies
    assert await term.read_error() == LOST_TERMINAL_MESSAGE
    while await term.read_frame(15) is not None:
        pass
    assert term.connection.close_code == 1011
    assert f"tab 1 of {terminal.user_id}: its program ended with status -9" in caplog.text


@pytest.mark.gen_test(timeout=90)
async def test_resize_reaches_the_shell(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    await term.resize(37, 101)
    await term.send({"type": "resize", "rows": 38, "cols": 102})
    await asyncio.sleep(0.3)
    await term.run("stty size", "38 102")
    term.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_reconnect_resumes_the_same_shell_and_another_tab_is_another(client):
    await signed_in(client)
    first = await TerminalClient.open(client, tab="7")
    await first.run("export SECRET_WORD=pineapple; echo set-$SECRET_WORD", "set-pineapple")
    first.close()
    await asyncio.sleep(0.5)
    again = await TerminalClient.open(client, tab="7")
    await again.run("echo again-$SECRET_WORD", "again-pineapple")
    other = await TerminalClient.open(client, tab="8")
    await other.run("echo other-${SECRET_WORD:-unset}", "other-unset")
    again.close()
    other.close()


@pytest.mark.gen_test(timeout=90)
async def test_an_open_terminal_socket_lets_go_of_its_upgrade_request(client, services):
    term = await TerminalClient.open(await signed_in(client), tab="3")
    await term.run("echo open-$((3+3))", "open-6")
    (socket,) = services.open_sockets
    assert len(socket.request.headers) == 0  # the Cookie, User-Agent, Origin... lines are gone
    assert "_cookies" not in socket.request.__dict__
    assert socket.request.remote_ip == "127.0.0.1"  # what logs and limits use stays
    await term.run("echo still-$((2+5))", "still-7")
    term.close()


@pytest.mark.gen_test(timeout=90)
async def test_close_tab_ends_the_shell(client):
    await signed_in(client)
    term = await TerminalClient.open(client, tab="5")
    await term.run("export KEPT=yes; echo kept-$KEPT", "kept-yes")
    term.close()
    answer = await client.fetch("/terminal/close-tab", "POST", {"tabId": "5"})
    assert answer.code == 200, answer.body
    assert (await client.fetch("/terminal/close-tab", "POST", {"tabId": "5"})).code == 200  # already gone
    fresh = await TerminalClient.open(client, tab="5")
    await fresh.run("echo fresh-${KEPT:-none}", "fresh-none")
    fresh.close()
    assert (await client.fetch("/terminal/close-tab", "POST", {"tabId": "../x"})).code == 400
    assert (await client.fetch("/terminal/close-tab", "POST", {})).code == 400


@pytest.mark.gen_test(timeout=60)
async def test_close_tab_needs_a_session(client):
    assert (await client.fetch("/terminal/close-tab", "POST", {"tabId": "1"})).code == 401


@pytest.mark.gen_test(timeout=90)
async def test_multibyte_output_arrives_whole(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("stty cols 200; echo ok-$((1+1))", "ok-2")
    # 9,000 characters of 2, 3 and 4 bytes each, in lines tmux redraws as it likes.
    script = "import sys; s='é中😀'*3000; [print(s[i:i+150]) for i in range(0, len(s), 150)]; print('END-'+'OF-TEXT')"
    await term.type(f'python3 -c "{script}"\r')
    output = await term.read_until("END-OF-TEXT", timeout=30)
    assert "\ufffd" not in output
    assert output.count("é") >= 3000 and output.count("中") >= 3000 and output.count("😀") >= 3000
    term.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_flood_to_a_stalled_client_keeps_memory_bounded(client):
    """`yes` while the client reads nothing for 4 s: the server stops reading that PTY."""
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    process = psutil.Process()
    before = process.memory_info().rss
    await term.type("yes flood-line-of-text\r")
    await term.read_until("flood-line")
    peak = before
    for _ in range(40):  # the client reads nothing for 4 s
        await asyncio.sleep(0.1)
        peak = max(peak, process.memory_info().rss)
    growth = peak - before
    print(f"\nRSS growth under a stalled `yes`: {growth / 2**20:.1f} MiB")
    assert growth < 24 * 2**20, f"grew {growth / 2**20:.1f} MiB"
    await term.type("\x03")
    await term.type("echo stopped-$((2+3))\r")
    await term.read_until("stopped-5", timeout=60)
    term.close()


@pytest.mark.gen_test(timeout=120)
async def test_other_tabs_keep_echoing_during_a_flood(client):
    await signed_in(client)
    flood = await TerminalClient.open(client, tab="1")
    await flood.run("echo ready-$((2+2))", "ready-4")
    await flood.type("yes\r")
    quiet = await TerminalClient.open(client, tab="2")
    await quiet.run("echo warm-$((2+2))", "warm-4")
    delays = []
    for i in range(10):
        started = time.monotonic()
        await quiet.type(f"echo ping{i}x\r")
        await quiet.read_until(f"ping{i}x\r\n")
        delays.append(time.monotonic() - started)
    print(f"\necho while another tab floods: max {max(delays) * 1000:.0f} ms")
    assert max(delays) < 2.0, delays  # generous: this is a liveness check, the figure is printed
    await flood.type("\x03")
    flood.close()
    quiet.close()


def child_processes() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.gen_test(timeout=180)
async def test_connect_close_cycles_leave_nothing_behind(client, services, monkeypatch):
    monkeypatch.setattr(services.hub.spares, "lifetime_seconds", 2.0)  # so that the last spare is gone too
    await signed_in(client)
    warm = await TerminalClient.open(client, tab="3")
    await warm.run("echo warm-$((2+2))", "warm-4")
    warm.close()
    await wait_for(lambda: not services.hub.terminals())
    fds_before, children_before = len(os.listdir("/proc/self/fd")), child_processes()
    for i in range(30):
        term = await TerminalClient.open(client, tab="3")
        await term.run(f"echo cycle{i}-$((2+2))", f"cycle{i}-4")
        term.close()
    await wait_for(lambda: not services.hub.terminals())
    await wait_for(lambda: child_processes() <= children_before, timeout=20)
    zombies = [p for p in psutil.Process().children(recursive=True)
               if p.status() == psutil.STATUS_ZOMBIE and p.pid not in children_before]
    assert not zombies
    fds_after = len(os.listdir("/proc/self/fd"))
    assert fds_after <= fds_before + 2, (fds_before, fds_after)  # +2: the HTTP client's pooled sockets


async def wait_for(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=90)
async def test_bad_frames_get_an_error_and_the_session_stays_up(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    bad = ["{not json", "[1,2]", json.dumps({"type": "launch"}),
           json.dumps({"type": "pty-input", "data": {"input": 5}}),
           json.dumps({"type": "resize", "data": {"rows": 0, "cols": 80}}),
           json.dumps({"type": "resize", "data": {"rows": 24, "cols": 1001}}),
           json.dumps({"type": "resize", "data": {"rows": "24", "cols": 80}}),
           json.dumps({"type": "pty-input", "data": "ls"})]
    for frame in bad:
        await term.send(frame)
        message = await term.read_error()
        assert message, frame
    await term.run("echo still-here-$((2+2))", "still-here-4")
    term.close()


@pytest.mark.gen_test(timeout=90)
async def test_an_oversized_frame_closes_with_1009(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    await term.send(json.dumps({"type": "pty-input", "data": {"input": "x" * (1024 * 1024 + 10)}}))
    while await term.connection.read_message() is not None:
        pass
    assert term.connection.close_code == 1009


@pytest.mark.gen_test(timeout=60)
async def test_refused_without_cookie_from_a_foreign_origin_or_with_a_bad_tab(client, make_client):
    with pytest.raises(HTTPClientError) as refused:
        await TerminalClient.open(make_client())
    assert refused.value.code == 401
    await signed_in(client)
    with pytest.raises(HTTPClientError) as foreign:
        await TerminalClient.open(client, origin="https://evil.example")
    assert foreign.value.code == 403
    for query in ("tabId=../x", "tabId=" + "a" * 33, "tabId=a%20b", "tabId="):
        with pytest.raises(HTTPClientError) as bad:
            await TerminalClient.open(client, query=query)
        assert bad.value.code == 400, query
    allowed = await TerminalClient.open(client, origin=FRONTEND)
    await allowed.run("echo frontend-ok-$((2+2))", "frontend-ok-4")
    allowed.close()


@pytest.mark.gen_test(timeout=240)
async def test_thirty_terminals_for_ten_users_at_once(make_client):
    clients = [make_client() for _ in range(10)]
    await asyncio.gather(*(c.dev_login(f"crowd{i}@example.com") for i, c in enumerate(clients)))
    terminals = await asyncio.gather(*(TerminalClient.open(c, tab=str(t)) for c in clients for t in range(3)))
    await asyncio.gather(*(term.run(f"echo hello-{i}-$((i*0+{i}))", f"hello-{i}-{i}", timeout=120)
                           for i, term in enumerate(terminals)))
    for term in terminals:
        term.close()


@pytest.mark.gen_test(timeout=60)
async def test_typing_before_the_terminal_is_ready_is_kept(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.type("echo early-$((3*3))\r")  # sent at once, while the container may still be starting
    await term.read_until("early-9", timeout=45)
    term.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_input_flood_into_a_program_that_does_not_read_gets_an_error_frame(client):
    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    await term.type("sleep 30\r")
    await asyncio.sleep(0.3)
    for _ in range(3):  # 2.4 MiB that nothing reads: past the 1 MiB input bound
        await term.type("y" * (800 * 1024))
    assert "input" in (await term.read_error(timeout=30)).lower()
    await term.type("\x03")
    await term.run("echo alive-$((5*5))", "alive-25", timeout=30)
    term.close()


@pytest.mark.gen_test(timeout=60)
async def test_shutdown_closes_sockets_with_1001(client, services):
    from threecompute.handlers.terminal import close_all_sockets

    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    await close_all_sockets(services)
    while await term.connection.read_message() is not None:
        pass
    assert term.connection.close_code == 1001
    assert not services.hub.terminals()
    with pytest.raises(WebSocketClosedError):
        await term.type("x")


@pytest.mark.gen_test(timeout=90)
async def test_upload_folder_move_into_changes_the_open_tabs_folder(client):
    from .test_files import upload

    term = await TerminalClient.open(await signed_in(client))
    await term.run("echo ready-$((2+2))", "ready-4")
    answer = await upload(client, "/upload-folder", [("proj/main.py", b"print(1)")], {"move-into": "proj"})
    assert answer.code == 200, answer.body
    await term.read_until("/proj")  # the typed `cd` lands shortly after the answer; wait for it
    await asyncio.sleep(0.2)
    await term.run("echo at:$(basename $PWD):end", "at:proj:end")
    term.close()


@pytest.mark.gen_test(timeout=90)
async def test_exit_closes_with_1000_and_no_error_frame(client):
    term = await TerminalClient.open(await signed_in(client, "leaver@example.com"))
    await term.run("echo bye-$((1+1))", "bye-2")
    await term.type("exit\r")
    frames = []
    while (message := await term.connection.read_message()) is not None:
        frames.append(json.loads(message)["type"])
    assert term.connection.close_code == 1000 and "error" not in frames and term.errors == []
