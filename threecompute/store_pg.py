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
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .store import FREE_SLOT_SQL, MIGRATIONS, Store, StoreError, User

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "threecompute_events"
MIGRATE_LOCK = 0x3C0001  # advisory lock keys: arbitrary, fixed, ours
SLOT_LOCK = 0x3C0002
REFRESH_SECONDS = 30.0
RECONNECT_SECONDS = 1.0
POOL_TIMEOUT_SECONDS = 5.0
OPEN_TIMEOUT_SECONDS = 10.0


def postgres_ddl(script: str) -> str:
    """A migration written for SQLite, for PostgreSQL (REAL is 4 bytes there: too few for times)."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)


class PostgresStore(Store):
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
            check=AsyncConnectionPool.check_connection,  # a connection from before an outage is retried, not used
        )
        self._listener: asyncio.Task | None = None
        self.listening = threading.Event()
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

        if self._closing:
            raise StoreError("the store is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._guarded(job()), self._loop))

    @staticmethod
    async def _guarded(coro: Awaitable[T]) -> T:
        try:
            return await coro
        except psycopg.Error as exc:
            raise StoreError(f"database error: {str(exc).strip() or type(exc).__name__}") from exc

    async def _open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=OPEN_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            raise StoreError(f"cannot reach the database: {exc}") from exc
        async with self._pool.connection() as conn:
            await self._migrate(conn)
            self._revoked = await self._load_revoked(conn)
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="store-listen")

    def close(self) -> None:
        if self._closing and not self._thread.is_alive():
            return
        self._closing = True

        async def shutdown() -> None:
            if self._listener is not None:
                self._listener.cancel()
                await asyncio.gather(self._listener, return_exceptions=True)
            await self._pool.close()

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
                    slot = (await (await conn.execute(FREE_SLOT_SQL)).fetchone())["slot"]
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

    async def count_users(self) -> int:
        async def read(conn: psycopg.AsyncConnection) -> int:
            return (await self._fetch_one(conn, "SELECT COUNT(*) AS n FROM users"))["n"]

        return await self._run(read)

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
