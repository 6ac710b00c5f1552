"""Spare attachments on a real server with the Docker backend: a user's next tab takes the
waiting `docker exec`, attaches its own tab and works; a spare ends after its lifetime
and at shutdown, leaving no process on the host or in the container."""

from __future__ import annotations

import contextlib

import docker
import psutil
import pytest

from threecompute.containers.docker import LABEL_DEPLOYMENT, LABEL_USER
from threecompute.handlers.auth import dev_user_id
from threecompute.handlers.terminal import close_all_sockets
from threecompute.pty import spares

from .classroom_helpers import signed_in
from .terminal_client import TerminalClient
from .test_socketio import until

pytestmark = pytest.mark.docker
EMAIL = "spare@example.com"


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "docker", "--host", "127.0.0.1"]


def pty_children() -> int:
    """Children of this process (the server runs in it): one `docker exec` per attachment."""
    return len(psutil.Process().children())


def waiting_wrappers(services) -> int:
    """Spare wrappers waiting in the user's container (their script prints the marker)."""
    engine = docker.from_env(version="auto")
    labels = [f"{LABEL_DEPLOYMENT}={services.backend.deployment}", f"{LABEL_USER}={dev_user_id(EMAIL)}"]
    (container,) = engine.containers.list(filters={"label": labels})
    top = container.top(ps_args="-eww -o pid,args")  # -ww: whatever COLUMNS the engine has
    return sum(1 for row in top["Processes"] if spares.SPARE_READY in row[-1])


async def until_size(term: TerminalClient, size: str, tries: int = 20) -> None:
    """The tab's window reaches `size`: through the engine, and the hub's redraw when tmux
    started too late to see the resize (ARCHITECTURE.md, "Re-attaching"), so not at once."""
    for i in range(tries):
        with contextlib.suppress(AssertionError):
            await term.run(f"echo sz$((1+{i}))=$(tput lines)x$(tput cols)", f"sz{i + 1}={size}", timeout=0.5)
            return
    raise AssertionError(f"the window never became {size}: {term.screen[-300:]!r}")


def hub_figure(services, name: str) -> float:
    return services.hub.metrics()[name]


@pytest.mark.gen_test(timeout=120)
async def test_the_next_tab_takes_the_spare_and_attaches_its_own_tab(make_client, services, monkeypatch):
    monkeypatch.setattr(services.hub.spares, "lifetime_seconds", 5.0)
    student = await signed_in(make_client, EMAIL)
    first = await TerminalClient.open(student, tab="1")
    await first.run("export MARK=one-$((0+1)); echo set-$((1+1))", "set-2")  # in tab 1's shell only
    await until(lambda: hub_figure(services, "spares_waiting") == 1, "a spare ready", timeout=30)
    assert waiting_wrappers(services) == 1

    second = await TerminalClient.open(student, tab="2")
    await second.run("echo in=$(tmux display -p '#S') mark=${MARK:-none} $((6*7))", "in=tab2 mark=none 42")
    await second.resize(30, 100)
    await until_size(second, "30x100")
    assert hub_figure(services, "spares_used_total") == 1
    await first.run("echo still=$MARK", "still=one-1")

    # A new spare stands behind the one taken; untaken, it ends after its lifetime.
    await until(lambda: hub_figure(services, "spares_waiting") == 1, "the next spare", timeout=30)
    await until(lambda: hub_figure(services, "spares_waiting") == 0 and pty_children() == 2,
                "the spare ended after its lifetime", timeout=30)
    first.close()
    second.close()
    await until(lambda: pty_children() == 0, "the tabs' attachments ended", timeout=30)
    await until(lambda: waiting_wrappers(services) == 0, "its wrapper gone from the container", timeout=30)


@pytest.mark.gen_test(timeout=120)
async def test_shutdown_ends_the_spares(make_client, services):
    student = await signed_in(make_client, EMAIL)
    term = await TerminalClient.open(student, tab="1")
    await term.run("echo up-$((1+1))", "up-2")
    await until(lambda: hub_figure(services, "spares_waiting") == 1, "a spare ready", timeout=30)
    assert pty_children() == 2, "the tab's attachment and the spare"

    await close_all_sockets(services)
    assert pty_children() == 0
    await until(lambda: waiting_wrappers(services) == 0, "the spare's wrapper gone from the container", timeout=30)
