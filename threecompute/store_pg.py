"""The store on PostgreSQL (`DATABASE_URL=postgresql://…`), shared by every server replica.

Same schema as SQLite (`store.MIGRATIONS`, with `REAL` read as `DOUBLE PRECISION`), migrated
at start under an advisory lock so that replicas starting together migrate once. What each
guarantee rests on, across processes:

* port slots: a new user is inserted under one transaction-scoped advisory lock, so the
  lowest free slot is computed by one replica at a time; `UNIQUE (port_slot)` backs it up;
* no lost update: a sign-in locks its row (`SELECT … FOR UPDATE`) before merging addresses,
  and a tab save is one `UPDATE`;
* revocation: the token id is written and `NOTIFY`-ed in one transaction; every replica
  LISTENs on its own connection and adds it to its in-memory set. A reconnecting listener
  and a periodic refresh reload the whole set, so a missed notification costs at most
  `REFRESH_SECONDS`.

psycopg's async pool runs on an event loop of the store's own thread: construction and
`close` stay synchronous as with SQLite, and the listener keeps running however busy the
server's IOLoop is. Callers await each query through `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import re
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .cluster import Activity, Cluster
from .store import FREE_SLOT_SQL, MIGRATIONS, Store, StoreError, User

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "threecompute_events"
MIGRATE_LOCK = 0x3C0001  # advisory lock keys: arbitrary, fixed, ours
SLOT_LOCK = 0x3C0002
REFRESH_SECONDS = 30.0
RECONNECT_SECONDS = 1.0
POOL_TIMEOUT_SECONDS = 2.0  # while the database is away, requests fail this fast
OPEN_TIMEOUT_SECONDS = 10.0
CHECK_IDLE_SECONDS = 2.0  # a pooled connection idle longer is checked (one round trip) before use
HEARTBEAT_SECONDS = 5.0
LOCK_CONNECTIONS = 20
LOCK_TIMEOUT_SECONDS = 120.0
REPLICA_LEASE_SECONDS = 15.0  # a replica silent this long no longer counts (its terminals are gone)
FORGET_SECONDS = 86400.0  # records of replicas gone this long are deleted


def lock_key(name: str) -> int:
    """A 64-bit advisory lock key for a name."""
    return int.from_bytes(hashlib.sha256(f"3compute:{name}".encode()).digest()[:8], "big", signed=True)


def postgres_ddl(script: str) -> str:
    """A migration written for SQLite, for PostgreSQL (REAL is 4 bytes there: too few for times)."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)


class PostgresStore(Store):
    """The store, and the cluster records of `cluster.Cluster`, on one PostgreSQL database."""

    def __init__(self, url: str, port_base: int, pool_size: int = 10) -> None:
        super().__init__(port_base)
        self.url = url
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-pg", daemon=True)
        self._thread.start()
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=POOL_TIMEOUT_SECONDS,
            kwargs={"autocommit": True, "row_factory": dict_row},
            check=self._check, reset=self._returned,
        )
        self._returned_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Locks hold a connection while held (a container being made, ~1 s): a pool of their
        # own, so that they never starve the queries.
        self._lock_pool = AsyncConnectionPool(url, min_size=0, max_size=LOCK_CONNECTIONS, open=False,
                                              timeout=LOCK_TIMEOUT_SECONDS, kwargs={"autocommit": True})
        self._listener: asyncio.Task | None = None
        self._heart: asyncio.Task | None = None
        self.listening = threading.Event()
        self.replica_id = secrets.token_hex(8)
        self._local_open: dict[str, int] = {}  # this replica's open terminals per user (store loop only)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        try:
            self._wait(self._open(), OPEN_TIMEOUT_SECONDS + 5)
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _wait(self, coro: Awaitable[T], timeout: float) -> T:
        """Run `coro` on the store's loop and block for it (start-up and shutdown only)."""
        future = asyncio.run_coroutine_threadsafe(self._guarded(coro), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreError(f"database did not answer within {timeout:g} s") from None

    async def _run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """`fn(conn)` with a pooled connection, on the store's loop; awaited from any loop."""
        async def job() -> T:
            async with self._pool.connection() as conn:
                return await fn(conn)

        return await self._on_loop(job())

    async def _check(self, conn: psycopg.AsyncConnection) -> None:
        """Before a connection is handed out: one that has been idle a while may predate an
        outage, so it is tried first (and replaced if dead) rather than failing a request."""
        if time.monotonic() - self._returned_at.get(conn, 0.0) > CHECK_IDLE_SECONDS:
            await AsyncConnectionPool.check_connection(conn)

    async def _returned(self, conn: psycopg.AsyncConnection) -> None:
        self._returned_at[conn] = time.monotonic()

    async def _on_loop(self, coro: Awaitable[T]) -> T:
        if self._closing:
            raise StoreError("the store is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._guarded(coro), self._loop))

    @staticmethod
    async def _guarded(coro: Awaitable[T]) -> T:
        try:
            return await coro
        except psycopg.Error as exc:
            raise StoreError(f"database error: {str(exc).strip() or type(exc).__name__}") from exc

    async def _open(self) -> None:
        try:  # one plain connection first: it fails at once, with the reason, where the pool would retry
            probe = await psycopg.AsyncConnection.connect(self.url, connect_timeout=OPEN_TIMEOUT_SECONDS)
            await probe.close()
            await self._pool.open(wait=True, timeout=OPEN_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"cannot reach the database: {reason}") from exc
        await self._lock_pool.open()
        async with self._pool.connection() as conn:
            await self._migrate(conn)
            self._revoked = await self._load_revoked(conn)
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen(), name="store-listen")
        self._heart = loop.create_task(self._heartbeat(), name="store-heartbeat")

    def close(self) -> None:
        if self._closing and not self._thread.is_alive():
            return
        self._closing = True

        async def shutdown() -> None:
            for task in (self._listener, self._heart):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if self._heart is not None:
                with contextlib.suppress(psycopg.Error, StoreError):  # others stop counting us at once
                    async with self._pool.connection(timeout=2) as conn:
                        await conn.execute("DELETE FROM replicas WHERE id = %s", (self.replica_id,))
                        await conn.execute("DELETE FROM open_terminals WHERE replica = %s", (self.replica_id,))
            await self._pool.close()
            await self._lock_pool.close()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            except Exception as exc:  # closing must not raise
                log.warning("closing the database pool: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    @staticmethod
    async def _migrate(conn: psycopg.AsyncConnection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            if row is None:
                await conn.execute("INSERT INTO schema_version VALUES (0)")
            version = row["version"] if row else 0
            for index, script in enumerate(MIGRATIONS[version:], start=version):
                await conn.execute(postgres_ddl(script))
                await conn.execute("UPDATE schema_version SET version = %s", (index + 1,))

    # -- users ----------------------------------------------------------------------------

    async def record_login(self, user_id: str, email: str, ip: str | None) -> User:
        async def write(conn: psycopg.AsyncConnection) -> User:
            async with conn.transaction():
                row = await self._locked_row(conn, user_id)
                if row is None:
                    # One new user at a time across replicas: each sees the slots taken before it.
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SLOT_LOCK,))
                    row = await self._locked_row(conn, user_id)  # the same user, signing in elsewhere
                now = time.time()
                if row is None:
                    slot = self._checked_slot((await (await conn.execute(FREE_SLOT_SQL)).fetchone())["slot"])
                    await conn.execute(
                        "INSERT INTO users (id, email, first_login, last_login, login_count, ip_addresses,"
                        " port_slot) VALUES (%s, %s, %s, %s, 1, %s, %s)",
                        (user_id, email, now, now, json.dumps([ip] if ip else []), slot),
                    )
                else:
                    await conn.execute(
                        "UPDATE users SET email = %s, last_login = %s, login_count = login_count + 1,"
                        " ip_addresses = %s WHERE id = %s",
                        (email, now, self._merged_ips(row["ip_addresses"], ip), user_id),
                    )
                return self._to_user(await self._fetch_one(conn, "SELECT * FROM users WHERE id = %s", user_id))

        return await self._run(write)

    @staticmethod
    async def _locked_row(conn: psycopg.AsyncConnection, user_id: str) -> dict | None:
        cursor = await conn.execute("SELECT ip_addresses FROM users WHERE id = %s FOR UPDATE", (user_id,))
        return await cursor.fetchone()

    @staticmethod
    async def _fetch_one(conn: psycopg.AsyncConnection, sql: str, *params: Any) -> dict | None:
        return await (await conn.execute(sql, params)).fetchone()

    async def get_user(self, user_id: str) -> User | None:
        async def read(conn: psycopg.AsyncConnection) -> User | None:
            row = await self._fetch_one(conn, "SELECT * FROM users WHERE id = %s", user_id)
            return None if row is None else self._to_user(row)

        return await self._run(read)

    async def list_users(self) -> list[User]:
        async def read(conn: psycopg.AsyncConnection) -> list[User]:
            cursor = await conn.execute("SELECT * FROM users ORDER BY first_login, id")
            return [self._to_user(row) for row in await cursor.fetchall()]

        return await self._run(read)

    async def save_tabs(self, user_id: str, tabs: list[str], active_tab: str) -> None:
        async def write(conn: psycopg.AsyncConnection) -> None:
            await conn.execute("UPDATE users SET tabs = %s, active_tab = %s WHERE id = %s",
                               (json.dumps(tabs), active_tab, user_id))

        await self._run(write)

    async def health(self) -> dict:
        report = await super().health()
        # Without its listener a replica still works, but learns of revocations elsewhere late.
        return {**report, "engine": "postgresql", "listening": self.listening.is_set()}

    async def first_delivery(self, delivery_id: str, keep_seconds: float) -> bool:
        async def write(conn: psycopg.AsyncConnection) -> bool:
            async with conn.transaction():
                await conn.execute("DELETE FROM webhook_deliveries WHERE received_at < %s",
                                   (time.time() - keep_seconds,))
                cursor = await conn.execute("INSERT INTO webhook_deliveries VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                            (delivery_id, time.time()))
                return cursor.rowcount == 1

        return await self._run(write)

    async def count_users(self) -> int:
        async def read(conn: psycopg.AsyncConnection) -> int:
            return (await self._fetch_one(conn, "SELECT COUNT(*) AS n FROM users"))["n"]

        return await self._run(read)

    async def transaction(self, statements: list[tuple[str, tuple]]) -> list[list[dict]]:
        async def write(conn: psycopg.AsyncConnection) -> list[list[dict]]:
            results = []
            async with conn.transaction():
                for sql, params in statements:
                    cursor = await conn.execute(sql.replace("?", "%s"), params)
                    results.append(list(await cursor.fetchall()) if cursor.description else [])
            return results

        return await self._run(write)

    # -- revoked tokens -------------------------------------------------------------------

    async def revoke(self, jti: str, expires_at: float) -> None:
        async def write(conn: psycopg.AsyncConnection) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM revoked_tokens WHERE expires_at < %s", (time.time(),))
                await conn.execute(
                    "INSERT INTO revoked_tokens VALUES (%s, %s)"
                    " ON CONFLICT (jti) DO UPDATE SET expires_at = EXCLUDED.expires_at", (jti, expires_at))
                # Delivered to every listener when this transaction commits, and only then.
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(
                    {"kind": "revoked", "jti": jti, "expires_at": expires_at})))

        await self._run(write)
        self._remember_revoked(jti, expires_at)

    @staticmethod
    async def _load_revoked(conn: psycopg.AsyncConnection) -> dict[str, float]:
        cursor = await conn.execute("SELECT jti, expires_at FROM revoked_tokens WHERE expires_at >= %s",
                                    (time.time(),))
        return {row["jti"]: row["expires_at"] for row in await cursor.fetchall()}

    # -- cross-replica events -------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN for ever: reconnect after a failure, and reload what may have been missed."""
        while not self._closing:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, row_factory=dict_row) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self._refresh(conn)  # anything revoked while nobody listened
                    self.listening.set()
                    await self._receive(conn)
            except (psycopg.Error, OSError) as exc:
                if self.listening.is_set():
                    log.warning("database listener lost (%s); reconnecting", str(exc).strip())
            self.listening.clear()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _receive(self, conn: psycopg.AsyncConnection) -> None:
        next_refresh = time.monotonic() + REFRESH_SECONDS
        while True:
            async for notice in conn.notifies(timeout=max(0.1, next_refresh - time.monotonic())):
                self._on_event(notice.payload)
            if time.monotonic() >= next_refresh:
                await self._refresh(conn)
                next_refresh = time.monotonic() + REFRESH_SECONDS

    async def _refresh(self, conn: psycopg.AsyncConnection) -> None:
        self._revoked = {**self._revoked, **await self._load_revoked(conn)}

    def _on_event(self, payload: str) -> None:
        try:
            event = json.loads(payload)
            if event.get("kind") == "revoked":
                self._remember_revoked(str(event["jti"]), float(event["expires_at"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring a malformed event: %.200r", payload)

    # -- containers across replicas (cluster.Cluster) -------------------------------------

    def cluster(self) -> Cluster:
        return self

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """A session advisory lock, on a connection kept out of the pool while it is held."""
        key = lock_key(name)
        conn = await self._on_loop(self._acquire(key))
        try:
            yield
        finally:
            await self._on_loop(self._release(conn, key))

    async def _acquire(self, key: int) -> psycopg.AsyncConnection:
        conn = await self._lock_pool.getconn()
        try:
            await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        except BaseException:
            await self._lock_pool.putconn(conn)
            raise
        return conn

    async def _release(self, conn: psycopg.AsyncConnection, key: int) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            await self._lock_pool.putconn(conn)  # a broken connection is discarded, and its lock with it

    async def hold_lease(self, name: str, seconds: float) -> bool:
        async def take(conn: psycopg.AsyncConnection) -> bool:
            now = time.time()
            row = await self._fetch_one(
                conn, "INSERT INTO leases VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
                " SET holder = EXCLUDED.holder, until = EXCLUDED.until"
                " WHERE leases.holder = EXCLUDED.holder OR leases.until < %s RETURNING holder",
                name, self.replica_id, now + seconds, now)
            return row is not None

        return await self._run(take)

    def terminals_changed(self, user_id: str, open_count: int) -> None:
        """Recorded at once by the heartbeat task (which also rewrites them all periodically)."""
        def mark() -> None:
            self._local_open[user_id] = open_count
            self._dirty.add(user_id)
            self._wake.set()

        if not self._closing:
            self._loop.call_soon_threadsafe(mark)

    async def activity(self) -> dict[str, Activity]:
        async def read(conn: psycopg.AsyncConnection) -> dict[str, Activity]:
            now = time.time()
            cursor = await conn.execute(
                "SELECT o.user_id, bool_or(o.open_count > 0 AND r.seen_at >= %s) AS open,"
                " max(CASE WHEN o.open_count > 0 THEN LEAST(r.seen_at, %s) ELSE o.changed_at END) AS changed_at"
                " FROM open_terminals o JOIN replicas r ON r.id = o.replica GROUP BY o.user_id",
                (now - REPLICA_LEASE_SECONDS, now))
            return {row["user_id"]: Activity(row["open"], row["changed_at"]) for row in await cursor.fetchall()}

        return await self._run(read)

    async def touch(self, user_id: str) -> None:
        async def write(conn: psycopg.AsyncConnection) -> None:
            await conn.execute(
                "INSERT INTO open_terminals VALUES (%s, %s, 0, %s) ON CONFLICT (replica, user_id)"
                " DO UPDATE SET changed_at = EXCLUDED.changed_at", (self.replica_id, user_id, time.time()))

        await self._run(write)

    async def _heartbeat(self) -> None:
        """Keep this replica's lease and its open-terminal rows current; write changes at once."""
        next_beat = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
            self._wake.clear()
            beat = time.monotonic() >= next_beat
            users = set(self._local_open) if beat else set(self._dirty)
            try:
                async with self._pool.connection() as conn:
                    await self._write_terminals(conn, users, beat)
            except (psycopg.Error, OSError) as exc:  # the database is away: retry on the next beat
                log.debug("heartbeat: %s", exc)
                next_beat = time.monotonic() + RECONNECT_SECONDS
                continue
            self._dirty -= users
            for user in users:
                if self._local_open.get(user) == 0 and user not in self._dirty:
                    del self._local_open[user]  # recorded as closed; nothing more to repeat
            if beat:
                next_beat = time.monotonic() + HEARTBEAT_SECONDS

    async def _write_terminals(self, conn: psycopg.AsyncConnection, users: set[str], beat: bool) -> None:
        now = time.time()
        async with conn.transaction():
            if beat:
                await conn.execute("INSERT INTO replicas VALUES (%s, %s) ON CONFLICT (id) DO UPDATE"
                                   " SET seen_at = EXCLUDED.seen_at", (self.replica_id, now))
                await conn.execute("DELETE FROM open_terminals WHERE replica IN"
                                   " (SELECT id FROM replicas WHERE seen_at < %s)", (now - FORGET_SECONDS,))
                await conn.execute("DELETE FROM replicas WHERE seen_at < %s", (now - FORGET_SECONDS,))
            counts = [(self.replica_id, user, self._local_open.get(user, 0), now) for user in sorted(users)]
            if counts:
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        "INSERT INTO open_terminals VALUES (%s, %s, %s, %s) ON CONFLICT (replica, user_id)"
                        " DO UPDATE SET open_count = EXCLUDED.open_count, changed_at = CASE"
                        " WHEN open_terminals.open_count = EXCLUDED.open_count THEN open_terminals.changed_at"
                        " ELSE EXCLUDED.changed_at END", counts)
