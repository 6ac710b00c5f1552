"""What server replicas share about containers: a lock across processes, a lease, and who has
terminals open where.

The container backend and its idle reaper use a `Cluster`. With one server process (SQLite)
it is `LocalCluster`: process-local locks, the lease always held, nothing shared, which is
exactly the single-server behaviour. The PostgreSQL store provides one over the database
(`store_pg.PostgresCluster`): advisory locks, a lease row, and open-terminal counts per
replica kept alive by a heartbeat, so a replica that dies stops counting once its lease runs
out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Activity:
    """A user's terminals across every live replica."""

    open: bool  # a terminal is open on some live replica
    changed_at: float  # wall-clock time of the last open or close anywhere


class Cluster(Protocol):
    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by one replica at a time (e.g. around count-and-create for MAX_CONTAINERS)."""

    async def hold_lease(self, name: str, seconds: float) -> bool:
        """Take or renew the lease `name` for `seconds`; False while another replica holds it."""

    def terminals_changed(self, user_id: str, open_count: int) -> None:
        """This replica now has `open_count` terminals of the user open (fire and forget)."""

    async def activity(self) -> dict[str, Activity]:
        """Every user with terminal records, as seen across live replicas."""

    async def touch(self, user_id: str) -> None:
        """Record activity of the user now, durably before returning (a box was just made
        ready here: a reaper elsewhere must restart the user's idle clock)."""


class KeyedLocks:
    """An asyncio lock per name, kept only while someone holds it or waits for it: a lock per
    user would otherwise stay for every user the server has ever seen."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # name -> (lock, holders and waiters)

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class LocalCluster:
    """One server process: nothing to share."""

    def __init__(self) -> None:
        self.locks = KeyedLocks()

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.locks.hold(name)

    async def hold_lease(self, name: str, seconds: float) -> bool:
        return True

    def terminals_changed(self, user_id: str, open_count: int) -> None:
        pass

    async def activity(self) -> dict[str, Activity]:
        return {}

    async def touch(self, user_id: str) -> None:
        pass
