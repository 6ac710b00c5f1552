"""The interface between the server and wherever users' terminals run.

Handlers and the terminal layer only ever talk to a `ContainerBackend`; the Docker and
local implementations live beside it. A backend knows nothing of HTTP: it is handed a
`UserRef` (who, which ports, which workspace folder) and answers with the argv that attaches
a terminal tab, or raises `BackendError` with a message fit to show the user.
"""

from __future__ import annotations

import abc
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cluster import Cluster

TAB_ID = re.compile(r"^[A-Za-z0-9]{1,32}\Z")
PORTS_PER_USER = 10


class BackendError(Exception):
    """An operation failed for a reason the user can be told (engine down, cap reached...)."""


@dataclass(frozen=True)
class UserRef:
    user_id: str  # the identity provider's subject; also the workspace folder's name
    port_start: int
    workspace: Path  # DATA_DIR/workspaces/<user_id>, already created

    @property
    def port_end(self) -> int:
        return self.port_start + PORTS_PER_USER - 1


@dataclass(frozen=True)
class Box:
    """Where one user's tabs run: a container id for Docker, the workspace for local."""

    user: UserRef
    ref: str
    cold: bool = field(default=False, compare=False)  # this ensure created or started the container


@dataclass(frozen=True)
class AttachCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # argv only carries the terminal's bytes to and from a program elsewhere (a `docker exec`
    # client): it may share the server's CPU priority. A program that runs the user's own
    # code (the local backend's shell) must not.
    relay: bool = False


def tmux_session_name(tab_id: str) -> str:
    if not TAB_ID.match(tab_id):
        raise ValueError(f"bad tab id: {tab_id!r}")
    return f"tab{tab_id}"


SPARE_READY = "3c-spare-ready"


def tmux_attach_args(tab_id: str, read_only: bool) -> list[str]:
    """tmux arguments that attach a client to tab `tab_id`: made if missing, or for a
    watcher, only an existing one, read-only and never resizing the owner's window."""
    session = tmux_session_name(tab_id)
    if read_only:
        return ["attach-session", "-f", "read-only,ignore-size", "-t", f"={session}"]
    return ["new-session", "-A", "-s", session]


class ContainerBackend(abc.ABC):
    """Gives each user one place to run tmux sessions, and manages its lifetime."""

    name: str

    async def start(self) -> None:
        """Adopt what already runs and start background work (the idle reaper)."""

    async def stop(self) -> None:
        """Stop background work. User containers and tmux sessions keep running."""

    def close(self) -> None:
        """The process is ending: drop what is still queued (nothing may wait on it)."""

    def forget_idle(self) -> None:
        """Let go of what only past work needed (called periodically, as `Services.forget_idle`)."""

    @abc.abstractmethod
    async def purge(self) -> None:
        """Remove everything this deployment made (containers, tmux servers...), workspaces aside.

        For tests and operators tearing a deployment down; the server itself never calls it.
        """

    async def remove_user(self, user: UserRef) -> None:
        """Remove the user's box and everything running in it; nothing if there is none."""

    @abc.abstractmethod
    async def ensure(self, user: UserRef) -> Box:
        """Make the user's box ready (create, start or reuse). Raises BackendError."""

    @abc.abstractmethod
    def attach_command(self, box: Box, tab_id: str, client_id: str, read_only: bool = False) -> AttachCommand:
        """The argv that attaches tab `tab_id` (`tmux_attach_args`) under a PTY.

        `client_id` names this one attachment so that `detach` can end exactly its tmux
        client and nothing else. `read_only`: a watcher's client of an existing tab.
        """

    def spare_command(self, box: Box, client_id: str) -> AttachCommand | None:
        """An attachment started ahead of need: like `attach_command`, but its program waits,
        echo off, after printing SPARE_READY, for one line of input (`spare_handover`) that
        says which tab to attach. None: this backend attaches fast enough without."""
        return None

    @staticmethod
    def spare_handover(tab_id: str) -> str:
        """The line that makes a spare attachment attach tab `tab_id`."""
        return shlex.join(tmux_attach_args(tab_id, read_only=False)) + "\n"

    @abc.abstractmethod
    async def detach(self, box: Box, client_id: str) -> None:
        """End the tmux client that attachment `client_id` started (the session lives on)."""

    async def redraw(self, box: Box, client_id: str, pid: int) -> None:
        """Make the tmux client of attachment `client_id` (under the PTY child `pid`) redraw its screen."""

    @abc.abstractmethod
    async def close_tab(self, user: UserRef, tab_id: str) -> None:
        """Kill a tab's tmux session and its programs; no error if it is already gone."""

    @abc.abstractmethod
    async def cd_all_tabs(self, user: UserRef, folder: str) -> None:
        """Type `cd <folder>` into every tmux session of the user (folder is workspace-relative)."""

    @abc.abstractmethod
    async def health(self) -> dict:
        """`{"ok": bool, ...}` for /healthz."""

    def use_cluster(self, cluster: Cluster) -> None:
        """Share locks and terminal records with other server replicas (see cluster.py)."""

    def terminal_opened(self, user: UserRef) -> None:
        """The user's first terminal opened: stop their idle clock."""

    def terminal_closed(self, user: UserRef) -> None:
        """The user's last terminal closed: start their idle clock."""

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics, e.g. {"running_containers": 3}."""
        return {}
