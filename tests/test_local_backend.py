"""The local backend: tmux on the host, one socket per deployment and user."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import ptyprocess
import pytest

from tests.pty_reader import read_until
from threecompute.containers import make_backend
from threecompute.containers.backend import AttachCommand, Box, UserRef
from threecompute.containers.local import TMUX_CONF, LocalBackend
from threecompute.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    local = make_backend(Settings(data_dir=tmp_path / "data", backend="local", dev=True))
    assert isinstance(local, LocalBackend)
    yield local
    asyncio.run(local.purge())


@pytest.fixture
def ann(backend: LocalBackend) -> UserRef:
    return UserRef("ann", 8000, backend.settings.data_dir / "workspaces" / "ann")


def spawn(cmd: AttachCommand) -> ptyprocess.PtyProcess:
    return ptyprocess.PtyProcess.spawn(cmd.argv, cwd=cmd.cwd, env={**os.environ, **cmd.env}, dimensions=(24, 80))



def tmux(backend: LocalBackend, user: UserRef, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([backend.tmux, "-L", backend.socket_name(user.user_id), *args],
                          capture_output=True, text=True, check=False)


def close(proc: ptyprocess.PtyProcess) -> None:
    proc.terminate(force=True)
    proc.close()


def open_tab(backend: LocalBackend, user: UserRef, tab: str) -> tuple[Box, ptyprocess.PtyProcess]:
    box = asyncio.run(backend.ensure(user))
    proc = spawn(backend.attach_command(box, tab, "client0001"))
    proc.write(b"echo ready-$((40+2))\r")
    read_until(proc, "ready-42")
    return box, proc


def test_ensure_makes_the_workspace_and_attach_runs_tmux_in_it(backend, ann):
    box = asyncio.run(backend.ensure(ann))
    assert ann.workspace.is_dir() and box.ref == str(ann.workspace)
    cmd = backend.attach_command(box, "1", "client0001")
    assert cmd.argv[1:] == ["-L", backend.socket_name("ann"), "-f", str(TMUX_CONF), "new-session", "-A", "-s",
                            "tab1"]
    assert cmd.cwd == str(ann.workspace)
    assert not cmd.relay  # the user's own shell: it never gets the server's CPU share
    assert cmd.env["TERM"] == "xterm-256color" and cmd.env["HOME"] == str(ann.workspace)
    assert cmd.env["LANG"] == "C.UTF-8"
    assert asyncio.run(backend.health())["ok"] is True


def test_echo_and_reconnect_resumes_the_same_shell(backend, ann):
    box, proc = open_tab(backend, ann, "1")
    proc.write(b"export SECRET=kept-$((6*7)); pwd\r")
    assert str(ann.workspace) in read_until(proc, str(ann.workspace))
    close(proc)
    asyncio.run(backend.detach(box, "client0001"))
    assert tmux(backend, ann, "has-session", "-t", "=tab1").returncode == 0

    again = spawn(backend.attach_command(box, "1", "client0002"))
    again.write(b"echo got-$SECRET\r")
    read_until(again, "got-kept-42")
    close(again)


def test_close_tab_kills_only_that_session(backend, ann):
    _, one = open_tab(backend, ann, "1")
    _, ten = open_tab(backend, ann, "10")
    close(one)
    close(ten)
    asyncio.run(backend.close_tab(ann, "1"))
    assert tmux(backend, ann, "has-session", "-t", "=tab1").returncode != 0
    assert tmux(backend, ann, "has-session", "-t", "=tab10").returncode == 0
    asyncio.run(backend.close_tab(ann, "1"))  # already gone: no error
    asyncio.run(backend.close_tab(UserRef("bob", 8010, ann.workspace.parent / "bob"), "1"))  # no server


def test_the_tmux_server_outlives_its_last_session(backend, ann):
    """A server that ended with its last session would race the next attach: a client that
    connects while it shuts down prints "server exited unexpectedly", and its terminal ends."""
    _, proc = open_tab(backend, ann, "1")
    close(proc)
    asyncio.run(backend.close_tab(ann, "1"))
    sessions = tmux(backend, ann, "list-sessions")
    assert (sessions.returncode, sessions.stdout, sessions.stderr) == (0, "", "")


def test_cd_all_tabs_moves_every_shell(backend, ann):
    (ann.workspace / "my 'odd' dir").mkdir(parents=True)
    _, one = open_tab(backend, ann, "1")
    _, two = open_tab(backend, ann, "2")
    asyncio.run(backend.cd_all_tabs(ann, "/my 'odd' dir/"))
    for proc in (one, two):
        proc.write(b"echo at-$(basename \"$PWD\")-end\r")
        read_until(proc, "at-my 'odd' dir-end")
        close(proc)


def test_its_tmux_socket_is_its_own(backend, ann, tmp_path):
    default_socket = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / "default"
    default_existed = default_socket.exists()
    _, proc = open_tab(backend, ann, "1")
    close(proc)
    socket_path = tmux(backend, ann, "display-message", "-p", "-t", "=tab1:", "#{socket_path}").stdout.strip()
    assert Path(socket_path).name == backend.socket_name("ann")
    assert tmux(backend, ann, "list-sessions", "-F", "#{session_name}").stdout.split() == ["tab1"]
    assert default_socket.exists() == default_existed  # the default tmux server was not started
    other = LocalBackend(Settings(data_dir=tmp_path / "other"))
    assert other.socket_name("ann") != backend.socket_name("ann")
    assert backend.socket_name("a/b c" * 10).startswith(f"3c-{backend.deployment}-")


def test_ids_sharing_a_long_prefix_get_servers_of_their_own(backend, tmp_path):
    """Provider ids are 21 digits: two that differ only in the last one are two users."""
    first, second = "108234567890123456781", "108234567890123456782"
    assert backend.socket_name(first) != backend.socket_name(second)
    users = [UserRef(uid, 8000, backend.settings.data_dir / "workspaces" / uid) for uid in (first, second)]
    _, one = open_tab(backend, users[0], "1")
    one.write(b"export MINE=first-$((1+1))\r")
    _, two = open_tab(backend, users[1], "1")
    two.write(b"echo [$MINE] at $PWD\r")
    seen = read_until(two, f"at {users[1].workspace}")
    assert "first-2" not in seen
    for proc in (one, two):
        close(proc)
    assert tmux(backend, users[1], "list-sessions", "-F", "#{session_name}").stdout.split() == ["tab1"]


def test_purge_ends_this_deployments_tmux_servers_only(backend: LocalBackend, ann: UserRef, tmp_path: Path):
    other = LocalBackend(Settings(data_dir=tmp_path / "elsewhere"))
    bob = UserRef("bob", 8010, other.settings.data_dir / "workspaces" / "bob")
    procs = []
    for local, user in ((backend, ann), (other, bob)):
        box = asyncio.run(local.ensure(user))
        procs.append(spawn(local.attach_command(box, "1", "c1")))
        procs[-1].write(b"echo up-$((1+1))\r")
        read_until(procs[-1], "up-2")

    def server_alive(local: LocalBackend, user: UserRef) -> bool:
        probe = subprocess.run([local.tmux, "-L", local.socket_name(user.user_id), "has-session"],
                               capture_output=True, check=False)
        return probe.returncode == 0

    assert server_alive(backend, ann) and server_alive(other, bob)
    asyncio.run(backend.purge())
    assert not server_alive(backend, ann)
    assert not list(backend.socket_dir().glob(f"3c-{backend.deployment}-*"))
    assert server_alive(other, bob)
    asyncio.run(other.purge())
    for proc in procs:
        proc.terminate(force=True)
