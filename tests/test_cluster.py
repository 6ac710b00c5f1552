"""What replicas share through PostgreSQL about containers: locks, the reaper's lease, and
open terminals that stop counting when their replica dies. Two stores on one database are
two replicas here (each has its own connections and replica id)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from threecompute import store_pg
from threecompute.cluster import KeyedLocks, LocalCluster
from threecompute.store import SqliteStore
from threecompute.store_pg import PostgresStore


@pytest.fixture
def pair(postgres_url):
    a, b = PostgresStore(postgres_url, 8000), PostgresStore(postgres_url, 8000)
    yield a, b
    a.close()
    b.close()


async def eventually(check, timeout: float = 5.0) -> float:
    """Seconds until the async `check()` holds (fails after `timeout`)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "never happened"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_sqlite_shares_nothing(tmp_path):
    store = SqliteStore(tmp_path / "db.sqlite3", 8000)
    try:
        assert isinstance(store.cluster(), LocalCluster)
    finally:
        store.close()


def test_a_lock_is_held_by_one_replica_at_a_time(pair):
    a, b = pair
    inside: list[str] = []

    async def hold(store: PostgresStore, name: str) -> None:
        async with store.cluster().lock("containers"):
            inside.append(name)
            assert len(inside) == 1, inside
            await asyncio.sleep(0.2)
            inside.remove(name)

    async def scenario() -> None:
        await asyncio.gather(*(hold(store, f"{i}") for i, store in enumerate([a, b, a, b])))

    asyncio.run(scenario())


def test_the_reaper_lease_has_one_holder_and_expires(pair):
    a, b = pair

    async def scenario() -> None:
        assert await a.hold_lease("reaper", 1.0)
        assert not await b.hold_lease("reaper", 1.0)
        assert await a.hold_lease("reaper", 1.0)  # renewed by its holder
        await asyncio.sleep(1.2)
        assert await b.hold_lease("reaper", 1.0)  # A went quiet: B takes over
        assert not await a.hold_lease("reaper", 1.0)

    asyncio.run(scenario())


def test_open_terminals_count_everywhere_and_stop_when_their_replica_dies(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(store_pg, "REPLICA_LEASE_SECONDS", 1.5)

    async def open_on_b(user: str) -> bool:
        seen = (await b.activity()).get(user)
        return seen is not None and seen.open

    async def closed_on_b(user: str) -> bool:
        seen = (await b.activity()).get(user)
        return seen is not None and not seen.open

    async def scenario() -> None:
        a.terminals_changed("ann", 1)
        a.terminals_changed("bob", 1)
        a.terminals_changed("bob", 0)  # written in order: the last count wins
        assert await eventually(lambda: open_on_b("ann")) < 1.0
        await eventually(lambda: closed_on_b("bob"))
        # A dies without a word: its loop stops, so no heartbeat and no clean-up.
        a._loop.call_soon_threadsafe(a._loop.stop)
        a._thread.join(5)
        await eventually(lambda: closed_on_b("ann"), timeout=store_pg.HEARTBEAT_SECONDS + 5)

    try:
        asyncio.run(scenario())
    finally:  # bring A's loop back, so that closing it ends its pool's tasks properly
        if not a._thread.is_alive():
            a._thread = threading.Thread(target=a._loop.run_forever, daemon=True)
            a._thread.start()


def test_a_clean_shutdown_forgets_the_replicas_terminals_at_once(pair, postgres_url):
    a, b = pair

    async def scenario() -> None:
        a.terminals_changed("cat", 2)
        await eventually(lambda: _open(b, "cat"))
        a.close()
        assert "cat" not in await b.activity()

    asyncio.run(scenario())


async def _open(store: PostgresStore, user: str) -> bool:
    seen = (await store.activity()).get(user)
    return seen is not None and seen.open


def test_a_touch_restarts_the_users_clock_everywhere(pair):
    a, b = pair

    async def scenario() -> None:
        before = time.time()
        await a.touch("dan")  # durable when it returns: no waiting
        seen = (await b.activity())["dan"]
        assert not seen.open and before <= seen.changed_at <= time.time()

    asyncio.run(scenario())


@pytest.mark.gen_test(timeout=10)
async def test_a_keyed_lock_serializes_its_name_and_is_forgotten_once_free():
    locks, order = KeyedLocks(), []

    async def hold(name: str, tag: str, seconds: float) -> None:
        async with locks.hold(name):
            order.append(f"{tag} in")
            await asyncio.sleep(seconds)
            order.append(f"{tag} out")

    first = asyncio.ensure_future(hold("user:a", "a1", 0.1))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(hold("user:a", "a2", 0))
    other = asyncio.ensure_future(hold("user:b", "b", 0))
    cancelled = asyncio.ensure_future(hold("user:a", "gone", 0))
    await asyncio.sleep(0.01)
    cancelled.cancel()  # a waiter that gives up must not keep the name
    await asyncio.gather(first, waiting, other, cancelled, return_exceptions=True)
    assert order.index("a1 out") < order.index("a2 in")  # one holder of a name at a time
    assert order.index("b in") < order.index("a1 out")  # other names do not wait
    assert "gone in" not in order
    assert len(locks) == 0  # nothing kept for names nobody holds
