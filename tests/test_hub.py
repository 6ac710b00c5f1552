"""TerminalHub over a fake backend whose tabs are local bash shells: open/close events on a
user's first and last terminal, idempotent close with detach of the right client, errors,
shutdown and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psutil
import pytest

from threecompute.containers.backend import AttachCommand, BackendError, Box, ContainerBackend, UserRef
from threecompute.pty import spares
from threecompute.pty.hub import LatencyWindow, Terminal, TerminalHub


class FakeBackend(ContainerBackend):
    """Runs each tab as a local bash and records what the hub asked of it."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.ensure_error: BackendError | None = None
        self.detach_error: Exception | None = None
        self.detach_hangs = False
        self.argv = ["bash", "--norc", "--noprofile", "-i"]

    def events(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]

    async def ensure(self, user: UserRef) -> Box:
        self.calls.append(("ensure", user.user_id))
        await asyncio.sleep(0)
        if self.ensure_error is not None:
            raise self.ensure_error
        return Box(user=user, ref=f"box-{user.user_id}")

    def attach_command(self, box: Box, tab_id: str, client_id: str, read_only: bool = False) -> AttachCommand:
        env = {"PS1": f"[{tab_id}]$ ", "INPUTRC": "/dev/null", "CLIENT_ID": client_id}
        return AttachCommand(argv=list(self.argv), env=env, cwd=str(box.user.workspace))

    async def detach(self, box: Box, client_id: str) -> None:
        self.calls.append(("detach", box.user.user_id, client_id))
        if self.detach_hangs:  # an engine that no longer answers
            await asyncio.Event().wait()
        if self.detach_error is not None:
            raise self.detach_error

    async def redraw(self, box: Box, client_id: str, pid: int) -> None:
        self.calls.append(("redraw", box.user.user_id, client_id, pid))

    async def close_tab(self, user: UserRef, tab_id: str) -> None:
        pass

    async def purge(self) -> None:
        pass

    async def cd_all_tabs(self, user: UserRef, folder: str) -> None:
        pass

    async def health(self) -> dict:
        return {"ok": True}

    def terminal_opened(self, user: UserRef) -> None:
        self.calls.append(("opened", user.user_id))

    def terminal_closed(self, user: UserRef) -> None:
        self.calls.append(("closed", user.user_id))


class Output:
    """The transport side of one terminal: frames received and exits seen."""

    def __init__(self) -> None:
        self.text = ""
        self.exits = 0
        self.changed = asyncio.Event()

    def send(self, text: str) -> None:
        self.text += text
        self.changed.set()

    def on_exit(self) -> None:
        self.exits += 1
        self.changed.set()

    async def wait_for(self, needle: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{needle!r} never came; saw {self.text[-1000:]!r}"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def hub(backend: FakeBackend) -> TerminalHub:
    return TerminalHub(backend)


def user(tmp_path: Path, user_id: str) -> UserRef:
    workspace = tmp_path / user_id
    workspace.mkdir(exist_ok=True)
    return UserRef(user_id=user_id, port_start=8000, workspace=workspace)


async def open_terminal(hub: TerminalHub, who: UserRef, tab: str = "1") -> tuple[Terminal, Output]:
    out = Output()
    terminal = await hub.open(who, tab, 24, 80, out.send, out.on_exit)
    await out.wait_for(f"[{tab}]$ ")
    return terminal, out


@pytest.mark.gen_test(timeout=15)
async def test_opened_and_closed_fire_on_first_and_last_terminal_of_a_user(hub, backend, tmp_path):
    alice, bob = user(tmp_path, "alice"), user(tmp_path, "bob")
    a1, _ = await open_terminal(hub, alice, "1")
    a2, _ = await open_terminal(hub, alice, "2")
    b1, _ = await open_terminal(hub, bob, "1")
    assert backend.events("opened") == [("opened", "alice"), ("opened", "bob")], backend.calls
    assert {t.client_id for t in hub.terminals_of("alice")} == {a1.client_id, a2.client_id}

    await hub.close(a1)
    assert backend.events("closed") == [], backend.calls
    await hub.close(a2)
    assert backend.events("closed") == [("closed", "alice")], backend.calls
    assert hub.terminals_of("alice") == []
    await hub.close(b1)
    assert backend.events("closed") == [("closed", "alice"), ("closed", "bob")], backend.calls


@pytest.mark.gen_test(timeout=15)
async def test_a_terminal_runs_the_attach_command_and_echoes(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_SECRET", "do-not-leak")
    alice = user(tmp_path, "alice")
    terminal, out = await open_terminal(hub, alice)
    terminal.write('echo "id=$CLIENT_ID dir=$PWD term=$TERM secret=[$FLASK_SECRET]"\n')
    await out.wait_for(f"id={terminal.client_id} dir={alice.workspace} term=xterm-256color secret=[]")
    terminal.resize(30, 100)
    terminal.write("stty size\n")
    await out.wait_for("30 100")
    await hub.close(terminal)


@pytest.mark.gen_test(timeout=15)
async def test_two_sockets_on_one_tab_are_two_clients(hub, backend, tmp_path):
    alice = user(tmp_path, "alice")
    first, _ = await open_terminal(hub, alice, "7")
    second, _ = await open_terminal(hub, alice, "7")
    assert first.client_id != second.client_id and len(first.client_id) == 16
    assert first.session.pid != second.session.pid
    await hub.close(first)
    assert not second.closed and len(hub.terminals_of("alice")) == 1
    await hub.close(second)


@pytest.mark.gen_test(timeout=15)
async def test_close_is_idempotent_and_detaches_its_own_client(hub, backend, tmp_path):
    alice = user(tmp_path, "alice")
    terminal, out = await open_terminal(hub, alice)
    pid = terminal.session.pid
    await asyncio.gather(hub.close(terminal), hub.close(terminal))
    await hub.close(terminal)
    assert backend.events("detach") == [("detach", "alice", terminal.client_id)], backend.calls
    assert backend.events("closed") == [("closed", "alice")], backend.calls
    assert terminal.closed and terminal.session.closed
    assert not psutil.pid_exists(pid), f"child {pid} still exists"
    assert out.exits == 0
    terminal.write("ignored\n")  # a late frame from the socket is harmless


@pytest.mark.gen_test(timeout=15)
async def test_program_exit_tells_the_transport_and_cleans_up(hub, backend, tmp_path):
    alice = user(tmp_path, "alice")
    terminal, out = await open_terminal(hub, alice)
    terminal.write("exit\n")
    deadline = time.monotonic() + 5
    while hub.terminals_of("alice") or not backend.events("closed"):
        assert time.monotonic() < deadline, (out.exits, backend.calls, out.text[-300:])
        await asyncio.sleep(0.01)
    assert out.exits == 1
    assert backend.events("detach") == [("detach", "alice", terminal.client_id)]
    await hub.close(terminal)  # the transport closing afterwards changes nothing
    assert len(backend.events("detach")) == 1 and hub.metrics()["terminals_exited_total"] == 1


@pytest.mark.gen_test(timeout=15)
async def test_ensure_error_propagates_and_registers_nothing(hub, backend, tmp_path):
    backend.ensure_error = BackendError("the container engine is unreachable")
    with pytest.raises(BackendError, match="unreachable"):
        await hub.open(user(tmp_path, "alice"), "1", 24, 80, Output().send, lambda: None)
    assert hub.terminals() == [] and backend.events("opened") == [], backend.calls
    assert hub.metrics()["ensure_errors_total"] == 1


@pytest.mark.gen_test(timeout=15)
async def test_spawn_failure_is_a_backend_error(hub, backend, tmp_path):
    backend.argv = ["no-such-program-3compute"]
    with pytest.raises(BackendError, match="could not start the terminal"):
        await hub.open(user(tmp_path, "alice"), "1", 24, 80, Output().send, lambda: None)
    assert hub.terminals() == [] and backend.events("opened") == [], backend.calls
    assert hub.metrics()["spawn_errors_total"] == 1


@pytest.mark.gen_test(timeout=15)
async def test_failed_detach_still_closes_the_terminal(hub, backend, tmp_path):
    backend.detach_error = BackendError("engine went away")
    terminal, _ = await open_terminal(hub, user(tmp_path, "alice"))
    await hub.close(terminal)
    assert hub.terminals() == [] and backend.events("closed") == [("closed", "alice")]
    assert hub.metrics()["detach_errors_total"] == 1


@pytest.mark.gen_test(timeout=15)
async def test_close_all_closes_everything_and_refuses_new_terminals(hub, backend, tmp_path):
    me = psutil.Process()
    children_before = len(me.children())
    opened = [await open_terminal(hub, user(tmp_path, who), tab) for who, tab in
              [("alice", "1"), ("alice", "2"), ("bob", "1")]]
    await hub.close_all()
    assert hub.terminals() == []
    assert all(t.closed for t, _ in opened)
    assert len(backend.events("detach")) == 3 and len(backend.events("closed")) == 2, backend.calls
    assert len(me.children()) == children_before, me.children()
    with pytest.raises(BackendError, match="shutting down"):
        await hub.open(user(tmp_path, "carol"), "1", 24, 80, Output().send, lambda: None)


@pytest.mark.gen_test(timeout=15)
async def test_close_all_gives_up_on_detaches_at_its_deadline_and_still_reaps(hub, backend, tmp_path):
    me = psutil.Process()
    children_before = len(me.children())
    backend.detach_hangs = True
    opened = [await open_terminal(hub, user(tmp_path, "alice"), tab) for tab in ("1", "2", "3")]
    started = time.monotonic()
    await hub.close_all(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert len(backend.events("detach")) == 3
    assert all(t.session.closed for t, _ in opened)
    assert len(me.children()) == children_before, me.children()  # the PTY children are reaped


@pytest.mark.gen_test(timeout=15)
async def test_metrics_count_terminals_and_attach_latency(hub, backend, tmp_path):
    alice = user(tmp_path, "alice")
    first, _ = await open_terminal(hub, alice, "1")
    second, _ = await open_terminal(hub, alice, "2")
    await hub.close(first)
    metrics = hub.metrics()
    print(metrics)
    assert metrics["open_terminals"] == 1 and metrics["terminal_users"] == 1
    assert metrics["terminals_opened_total"] == 2 and metrics["terminals_closed_total"] == 1
    assert metrics["attach_count"] == 2 and 0 < metrics["attach_last_seconds"] < 1
    assert metrics["first_output_count"] == 2 and metrics["first_output_p50_seconds"] >= metrics["attach_p50_seconds"]
    assert metrics["pty_bytes_out_total"] > 0 and metrics["spawn_errors_total"] == 0
    await hub.close(second)
    assert hub.metrics()["open_terminals"] == 0



@pytest.mark.gen_test(timeout=15)
async def test_the_first_resize_signals_the_foreground_and_asks_for_one_redraw(hub, backend, tmp_path):
    terminal, out = await open_terminal(hub, user(tmp_path, "alice"))
    terminal.write("trap 'echo winched-$((40+2))' WINCH\n")
    await out.wait_for("[1]$ trap")
    terminal.resize(24, 80)  # the size it has: the kernel signals nothing, the hub does
    await out.wait_for("winched-42")
    deadline = time.monotonic() + 5
    while not backend.events("redraw") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert backend.events("redraw") == [("redraw", "alice", terminal.client_id, terminal.session.pid)]
    terminal.resize(30, 100)
    terminal.resize(31, 100)
    await asyncio.sleep(0.3)
    assert len(backend.events("redraw")) == 1, backend.calls
    await hub.close(terminal)


class SpareBackend(FakeBackend):
    """The fake backend with spare attachments: a shell that waits for its tab on one line."""

    def spare_command(self, box: Box, client_id: str) -> AttachCommand:
        script = ("stty -echo; printf 3c-spare-; printf ready; read -r args; "
                  'PS1="[spare:$args]$ " exec bash --norc --noprofile -i')
        return AttachCommand(argv=["sh", "-c", script], env={"INPUTRC": "/dev/null"}, cwd=str(box.user.workspace))

    @staticmethod
    def spare_handover(tab_id: str) -> str:
        return f"{tab_id}\n"


def children() -> int:
    return len(psutil.Process().children())


@pytest.mark.gen_test(timeout=15)
async def test_the_next_tab_takes_the_spare_and_shutdown_starts_none(tmp_path):
    hub = TerminalHub(SpareBackend())
    alice = user(tmp_path, "alice")
    await open_terminal(hub, alice, "1")
    await until_true(lambda: hub.metrics()["spares_waiting"] == 1)
    out = Output()
    await hub.open(alice, "2", 24, 80, out.send, out.on_exit)
    await out.wait_for("[spare:2]$ ")  # the marker the spare printed before was never shown
    assert "3c-spare-ready" not in out.text and hub.metrics()["spares_used_total"] == 1

    await open_terminal(hub, user(tmp_path, "bob"), "1")  # bob's spare is due 50 ms later
    await hub.close_all()
    await asyncio.sleep(0.3)
    assert children() == 0, "a spare started after the shutdown"
    assert hub.metrics()["spares_waiting"] == 0


async def until_true(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not seen in time"
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=15)
async def test_a_spare_ends_soon_after_its_user_left_and_none_start_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(spares, "GRACE_SECONDS", 0.3)
    hub = TerminalHub(SpareBackend())  # spares live 60 s, but not that long after their user left
    terminal, _ = await open_terminal(hub, user(tmp_path, "alice"))
    await until_true(lambda: hub.metrics()["spares_waiting"] == 1)
    await hub.close(terminal)
    await until_true(lambda: children() == 0)

    off = TerminalHub(SpareBackend(), spare_seconds=0)  # SPARE_ATTACH_SECONDS=0
    terminal, _ = await open_terminal(off, user(tmp_path, "bob"))
    await asyncio.sleep(0.5)
    assert children() == 1 and off.metrics()["spares_waiting"] == 0
    await off.close_all()


def test_a_latency_window_summarises_its_last_samples_and_counts_them_all() -> None:
    window = LatencyWindow(size=4)
    assert window.summary("attach") == {"attach_count": 0}
    for seconds in (9.0, 1.0, 2.0, 3.0, 4.0, 5.0):
        window.add(seconds)
    assert window.summary("attach") == {
        "attach_count": 6, "attach_last_seconds": 5.0, "attach_avg_seconds": 4.0,
        "attach_p50_seconds": 4.0, "attach_p99_seconds": 5.0,  # of 2, 3, 4, 5: the 9 has left
    }
