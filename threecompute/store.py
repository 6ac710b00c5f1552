"""The server's durable state in one SQLite file: users, their port ranges, tab state and
revoked tokens.

Every write is one short transaction (`BEGIN IMMEDIATE`), so concurrent logins and tab saves
never lose an update, and a crash leaves either the old record or the new one. The async
methods run the SQL on one dedicated thread, which keeps the IOLoop free and serialises
writers inside this process; SQLite's own locking covers other processes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tornado.ioloop import IOLoop

from .containers.backend import PORTS_PER_USER

T = TypeVar("T")
MAX_IPS_KEPT = 20

# Each entry migrates the schema from version i to i + 1; never edit a shipped one.
MIGRATIONS = [
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        first_login REAL NOT NULL,
        last_login REAL NOT NULL,
        login_count INTEGER NOT NULL DEFAULT 0,
        ip_addresses TEXT NOT NULL DEFAULT '[]',
        port_slot INTEGER NOT NULL UNIQUE,
        tabs TEXT NOT NULL DEFAULT '["1"]',
        active_tab TEXT NOT NULL DEFAULT '1'
    );
    CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    );
    """,
]


class StoreError(Exception):
    """The database could not be read or written."""


class StoreFull(StoreError):
    """The disk under the database is full: nothing was written; reads still work."""


@dataclass(frozen=True)
class User:
    id: str
    email: str
    first_login: float
    last_login: float
    login_count: int
    ip_addresses: list[str]
    port_start: int
    tabs: list[str]
    active_tab: str

    @property
    def port_end(self) -> int:
        return self.port_start + PORTS_PER_USER - 1

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "email": self.email,
            "first_login": self.first_login,
            "last_login": self.last_login,
            "login_count": self.login_count,
            "ip_addresses": self.ip_addresses,
            "port_start": self.port_start,
            "port_end": self.port_end,
            "tabs": self.tabs,
            "active_tab": self.active_tab,
        }


class Store:
    def __init__(self, path: Path, port_base: int) -> None:
        self.path = path
        self.port_base = port_base
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._local = threading.local()
        self._revoked: dict[str, float] = {}
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(self._migrate)
        self._revoked = self._call(self._load_revoked)

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._connection())
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise StoreFull(f"database error: {exc}") from exc
            raise StoreError(f"database error: {exc}") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a full disk) can leave the transaction open, or SQLite may
                # have rolled it back itself; either way the connection must be usable after.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return self._call(transaction)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await IOLoop.current().run_in_executor(self._executor, fn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._close_thread_connection).result()
        self._executor.shutdown(wait=True)
        self._close_thread_connection()

    def _close_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for index, script in enumerate(MIGRATIONS[version:], start=version):
            conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {index + 1}; COMMIT;")

    # -- users ----------------------------------------------------------------------------

    async def record_login(self, user_id: str, email: str, ip: str | None) -> User:
        return await self._run(lambda: self._write(lambda c: self._record_login(c, user_id, email, ip)))

    def _record_login(self, conn: sqlite3.Connection, user_id: str, email: str, ip: str | None) -> User:
        now = time.time()
        row = conn.execute("SELECT ip_addresses FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO users (id, email, first_login, last_login, login_count, ip_addresses, port_slot)"
                " VALUES (?, ?, ?, ?, 1, ?, ?)",
                (user_id, email, now, now, json.dumps([ip] if ip else []), self._free_slot(conn)),
            )
        else:
            ips = [a for a in json.loads(row["ip_addresses"]) if a != ip] + ([ip] if ip else [])
            conn.execute(
                "UPDATE users SET email = ?, last_login = ?, login_count = login_count + 1,"
                " ip_addresses = ? WHERE id = ?",
                (email, now, json.dumps(ips[-MAX_IPS_KEPT:]), user_id),
            )
        return self._user_row(conn, user_id)

    @staticmethod
    def _free_slot(conn: sqlite3.Connection) -> int:
        """The lowest port slot no user holds (slots freed by deleted users are reused)."""
        row = conn.execute(
            "SELECT 0 AS slot WHERE NOT EXISTS (SELECT 1 FROM users WHERE port_slot = 0)"
            " UNION ALL SELECT port_slot + 1 FROM users u WHERE NOT EXISTS"
            " (SELECT 1 FROM users WHERE port_slot = u.port_slot + 1) ORDER BY slot LIMIT 1"
        ).fetchone()
        return row[0]

    def _user_row(self, conn: sqlite3.Connection, user_id: str) -> User:
        row = conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()
        return self._to_user(row)

    def _to_user(self, row: sqlite3.Row) -> User:
        return User(
            id=row["id"],
            email=row["email"],
            first_login=row["first_login"],
            last_login=row["last_login"],
            login_count=row["login_count"],
            ip_addresses=json.loads(row["ip_addresses"]),
            port_start=self.port_base + row["port_slot"] * PORTS_PER_USER,
            tabs=json.loads(row["tabs"]),
            active_tab=row["active_tab"],
        )

    async def get_user(self, user_id: str) -> User | None:
        def read(conn: sqlite3.Connection) -> User | None:
            row = conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()
            return None if row is None else self._to_user(row)

        return await self._run(lambda: self._call(read))

    async def list_users(self) -> list[User]:
        def read(conn: sqlite3.Connection) -> list[User]:
            return [self._to_user(r) for r in conn.execute("SELECT * FROM users ORDER BY first_login, id")]

        return await self._run(lambda: self._call(read))

    async def save_tabs(self, user_id: str, tabs: list[str], active_tab: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE users SET tabs = ?, active_tab = ? WHERE id = ?", (json.dumps(tabs), active_tab, user_id)
            )

        await self._run(lambda: self._write(write))

    # -- revoked tokens -------------------------------------------------------------------

    def is_revoked(self, jti: str) -> bool:
        """Answered from memory: every authenticated request asks, so it must be free."""
        return jti in self._revoked

    async def revoke(self, jti: str, expires_at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (time.time(),))
            conn.execute("INSERT OR REPLACE INTO revoked_tokens VALUES (?, ?)", (jti, expires_at))

        await self._run(lambda: self._write(write))
        self._revoked[jti] = expires_at

    def _load_revoked(self, conn: sqlite3.Connection) -> dict[str, float]:
        rows = conn.execute("SELECT jti, expires_at FROM revoked_tokens WHERE expires_at >= ?", (time.time(),))
        return {r["jti"]: r["expires_at"] for r in rows}

    async def count_users(self) -> int:
        return await self._run(lambda: self._call(lambda c: c.execute("SELECT COUNT(*) FROM users").fetchone()[0]))

    async def health(self) -> dict:
        try:
            count = await self.count_users()
        except (StoreError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "users": count}
