"""Idle reaping: remove a user's container once nothing of theirs has run in it for a while.

Two parts:

* `user_programs(procs)` — the policy, a pure function. A container's own infrastructure
  (tini, the `sleep infinity` it supervises, tmux, idle interactive shells and the backend's
  own `sh -c` wrappers) does not keep it; anything else the user started (a web server,
  vim, `yes`, a shell script) does.
* `IdleReaper` — the clock. The terminal layer reports a user's first open and last close
  (`terminal_opened` / `terminal_closed`). While a user has no open terminal, every
  `poll` seconds the reaper lists the processes of their container; once only
  infrastructure has been seen for `timeout` seconds (counted from the last close, the
  last sighting of a user program, the last `ensure`, or adoption at start) it asks the
  backend to remove the container. Users with an open terminal are never reaped.

Several replicas (cluster.py): every replica runs the loop, but a sweep happens only on the
replica holding the `reaper` lease, and a user with a terminal open on any live replica is
busy; the idle clock also restarts at the last open or close anywhere. A replica that takes
the lease over restarts every clock, since it has not watched the containers before.

The reaper talks to its backend through the small `ReapTarget` protocol, so the loop can be
tested with a fake and short timeouts. It runs as an asyncio task and never blocks the loop:
every Docker call happens in the backend's executor.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..cluster import Cluster, LocalCluster

log = logging.getLogger(__name__)

INITS = frozenset({"tini", "docker-init"})
SHELLS = frozenset({"sh", "ash", "dash", "bash", "rbash", "zsh", "fish"})
# Every `sh -c` script the backends run inside a container mentions this word.
WRAPPER_MARK = "3compute"
LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class Proc:
    """One process as `ps -eo pid,ppid,args` shows it."""

    pid: int
    ppid: int
    args: str

    @property
    def name(self) -> str:
        """The program's base name; a login shell's leading `-` is dropped."""
        first = self.args.split(" ", 1)[0]
        return posixpath.basename(first).lstrip("-")


def parse_ps_rows(rows: Iterable[Iterable[str]]) -> list[Proc]:
    """Rows of (pid, ppid, args) strings, as Docker's `top` gives them, to `Proc`s."""
    procs = []
    for row in rows:
        pid, ppid, *rest = row
        procs.append(Proc(int(pid), int(ppid), " ".join(rest)))
    return procs


def _is_interactive_shell(proc: Proc) -> bool:
    """`bash`, `-bash`, `bash -l`, `sh -i`: a shell waiting for its user, not running a script."""
    return proc.name in SHELLS and all(arg.startswith("-") and arg != "-c" for arg in proc.args.split()[1:])


def _is_wrapper(proc: Proc) -> bool:
    """One of the backends' own `sh -c '...'` scripts (attach, detach, cd)."""
    words = proc.args.split()
    return proc.name in SHELLS and "-c" in words[1:2] and WRAPPER_MARK in proc.args


def is_infrastructure(proc: Proc, procs_by_pid: dict[int, Proc]) -> bool:
    """Whether `proc` is part of the container's own machinery rather than a user program."""
    if proc.args.endswith("<defunct>"):
        return True  # a zombie waiting for its parent; the parent decides
    if proc.name in INITS or proc.name == "tmux":
        return True
    if proc.name == "sleep":
        parent = procs_by_pid.get(proc.ppid)
        return parent is None or parent.name in INITS  # the image's CMD, not a user's `sleep 100`
    return _is_interactive_shell(proc) or _is_wrapper(proc)


def user_programs(procs: list[Proc]) -> list[Proc]:
    """The processes that keep a container alive: everything that is not infrastructure."""
    by_pid = {proc.pid: proc for proc in procs}
    return [proc for proc in procs if not is_infrastructure(proc, by_pid)]


class ReapTarget(Protocol):
    """What the reaper needs from a backend."""

    async def running_boxes(self) -> dict[str, str]:
        """user id → container ref, for this deployment's running containers."""

    async def processes(self, ref: str) -> list[Proc]:
        """The processes of one container; raises if it is gone."""

    async def reap(self, user_id: str, ref: str) -> bool:
        """Remove the container if `IdleReaper.is_due(user_id)` still holds; True if removed."""


class IdleReaper:
    """The idle clock of every user and the loop that removes idle containers."""

    def __init__(self, target: ReapTarget, timeout: float, poll: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.timeout = timeout
        self.poll = poll
        self.clock = clock
        self.reaped = 0
        self.cluster: Cluster = LocalCluster()
        self._open: dict[str, int] = {}
        self._open_elsewhere: set[str] = set()  # as of the last sweep
        self._idle_since: dict[str, float] = {}
        self._leading: bool | None = None  # None: no sweep yet
        self._task: asyncio.Task | None = None

    # -- events from the terminal layer and the backend -------------------------------------

    def terminal_opened(self, user_id: str) -> None:
        self._open[user_id] = self._open.get(user_id, 0) + 1
        self._idle_since.pop(user_id, None)
        self.cluster.terminals_changed(user_id, self._open[user_id])

    def terminal_closed(self, user_id: str) -> None:
        left = self._open.get(user_id, 0) - 1
        self.cluster.terminals_changed(user_id, max(0, left))
        if left > 0:
            self._open[user_id] = left
            return
        self._open.pop(user_id, None)
        self._idle_since[user_id] = self.clock()

    def touch(self, user_id: str) -> None:
        """Restart the clock (the box was just made ready, a terminal is about to attach)."""
        if not self.is_busy(user_id):
            self._idle_since[user_id] = self.clock()

    def adopt(self, user_ids: Iterable[str]) -> None:
        """Containers found at start: their clock starts now unless a terminal is open."""
        for user_id in user_ids:
            if not self.is_busy(user_id):
                self._idle_since.setdefault(user_id, self.clock())

    def is_busy(self, user_id: str) -> bool:
        return self._open.get(user_id, 0) > 0 or user_id in self._open_elsewhere

    def is_due(self, user_id: str) -> bool:
        since = self._idle_since.get(user_id)
        return not self.is_busy(user_id) and since is not None and self.clock() - since >= self.timeout

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="idle-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.sweep()
            except Exception as exc:  # the engine may be down; try again next time
                log.warning("idle reaper: %s", exc)

    async def sweep(self) -> list[str]:
        """One pass over the running containers; returns the users whose container went."""
        # The lease outlasts a slow sweep (an engine under load): two sweeping at once would
        # be harmless (each removal looks again under the user's lock), only wasteful.
        leading = await self.cluster.hold_lease("reaper", max(3 * self.poll, LEASE_SECONDS))
        if leading and self._leading is False:
            self._idle_since.clear()  # clocks restart: we have not been watching
        self._leading = leading
        if not leading:
            return []
        await self._merge_activity()
        boxes = await self.target.running_boxes()
        for user_id in list(self._idle_since):
            if user_id not in boxes:
                del self._idle_since[user_id]
        idle = {user: ref for user, ref in boxes.items() if not self.is_busy(user)}
        results = await asyncio.gather(*(self._check(user, ref) for user, ref in idle.items()))
        return [user for user, gone in zip(idle, results, strict=True) if gone]

    async def refresh(self) -> None:
        """Read the other replicas' terminal records again (the backend calls it before reaping)."""
        await self._merge_activity()

    async def _merge_activity(self) -> None:
        """Terminals open on other replicas, and their last opens and closes, into the clocks."""
        activity = await self.cluster.activity()
        self._open_elsewhere = {user for user, seen in activity.items() if seen.open}
        now_wall, now = time.time(), self.clock()
        for user, seen in activity.items():
            if user in self._open_elsewhere:
                self._idle_since.pop(user, None)
            elif user in self._idle_since:  # (new sightings start their clock now anyway)
                since = now - max(0.0, now_wall - seen.changed_at)
                self._idle_since[user] = max(self._idle_since.get(user, since), since)

    async def _check(self, user_id: str, ref: str) -> bool:
        self._idle_since.setdefault(user_id, self.clock())
        try:
            busy = user_programs(await self.target.processes(ref))
        except Exception as exc:
            log.debug("idle reaper: cannot list processes of %s: %s", ref[:12], exc)
            return False
        if busy:
            self._idle_since[user_id] = self.clock()
            return False
        if not self.is_due(user_id):
            return False
        removed = await self.target.reap(user_id, ref)
        if removed:
            self.reaped += 1
            self._idle_since.pop(user_id, None)
            log.info("idle reaper: removed the container of %s", user_id)
        return removed
