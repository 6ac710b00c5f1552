"""The server's durable state: users, their port ranges, tab state, revoked tokens and the
webhook deliveries of the last day.

`Store` is the interface, with two engines behind it: `SqliteStore` here (one file in
DATA_DIR, the embedded default) and `PostgresStore` in `store_pg.py` (`DATABASE_URL`, shared
by many replicas). `open_store(settings)` picks one. Both run the same schema (`MIGRATIONS`),
migrated by the server itself at start.

SQLite: every write is one short transaction (`BEGIN IMMEDIATE`), so concurrent logins and
tab saves never lose an update, and a crash leaves either the old record or the new one. The
async methods run the SQL on one dedicated thread, which keeps the IOLoop free and serialises
writers inside this process; SQLite's own locking covers other processes.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tornado.ioloop import IOLoop

from .cluster import Cluster, LocalCluster
from .containers.backend import PORTS_PER_USER
from .settings import HIGHEST_PORT

if TYPE_CHECKING:
    from .identity import Identity
    from .settings import Settings

T = TypeVar("T")
MAX_IPS_KEPT = 20
USER_TOKENS = "user:"  # a revoked id of this prefix stands for all of a user's tokens (no jti has a colon)

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
    # Shared by replicas on one database (see cluster.py); a single SQLite server leaves them empty.
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        seen_at REAL NOT NULL
    );
    CREATE TABLE open_terminals (
        replica TEXT NOT NULL,
        user_id TEXT NOT NULL,
        open_count INTEGER NOT NULL,
        changed_at REAL NOT NULL,
        PRIMARY KEY (replica, user_id)
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    );
    """,
    """
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        received_at REAL NOT NULL
    );
    """,
    # Classrooms (classrooms.py): roles beyond ADMIN_EMAILS, teacher sign-up, classes, grades.
    """
    CREATE TABLE user_roles (
        user_id TEXT PRIMARY KEY,
        role TEXT NOT NULL
    );
    CREATE TABLE teacher_allowlist (
        email TEXT PRIMARY KEY,
        added_by TEXT NOT NULL,
        added_at REAL NOT NULL
    );
    CREATE TABLE teacher_codes (
        code_hash TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE classrooms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        owner_id TEXT NOT NULL,
        access_code TEXT NOT NULL UNIQUE,
        archived INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE classroom_members (
        classroom_id TEXT NOT NULL REFERENCES classrooms (id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL,
        joined_at REAL NOT NULL,
        PRIMARY KEY (classroom_id, user_id)
    );
    CREATE TABLE assignments (
        id TEXT PRIMARY KEY,
        classroom_id TEXT NOT NULL REFERENCES classrooms (id) ON DELETE CASCADE,
        slug TEXT NOT NULL,
        name TEXT NOT NULL,
        published INTEGER NOT NULL DEFAULT 0,
        due_at REAL,
        created_at REAL NOT NULL,
        weight REAL NOT NULL DEFAULT 1,
        UNIQUE (classroom_id, slug)
    );
    CREATE TABLE manual_scores (
        assignment_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        score REAL NOT NULL,
        set_by TEXT NOT NULL,
        set_at REAL NOT NULL,
        PRIMARY KEY (assignment_id, user_id)
    );
    CREATE TABLE grade_runs (
        id TEXT PRIMARY KEY,
        assignment_id TEXT NOT NULL REFERENCES assignments (id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        ran_by TEXT NOT NULL,
        ran_at REAL NOT NULL,
        status TEXT NOT NULL,
        passed INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        score REAL NOT NULL,
        tests TEXT NOT NULL,
        output TEXT NOT NULL
    );
    CREATE INDEX grade_runs_latest ON grade_runs (assignment_id, user_id, ran_at);
    """,
]


# The lowest port slot no user holds (slots freed by deleted users are reused); the same SQL on
# both engines.
FREE_SLOT_SQL = (
    "SELECT 0 AS slot WHERE NOT EXISTS (SELECT 1 FROM users WHERE port_slot = 0)"
    " UNION ALL SELECT port_slot + 1 FROM users u WHERE NOT EXISTS"
    " (SELECT 1 FROM users WHERE port_slot = u.port_slot + 1) ORDER BY slot LIMIT 1"
)


class StoreError(Exception):
    """The database could not be read or written."""


class NoPortsLeft(Exception):
    """Every block of ports from PORT_BASE up to 65535 belongs to a user: no new user fits."""


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


class Store(abc.ABC):
    """Users, port slots, tabs and revoked tokens, whichever engine keeps them.

    Construction opens and migrates the database; `close` releases it. Revoked token ids are
    also held in memory (`refuses` is asked on every request, so it must cost nothing).
    """

    def __init__(self, port_base: int) -> None:
        self.port_base = port_base
        self.port_slots = (HIGHEST_PORT + 1 - port_base) // PORTS_PER_USER
        self._revoked: dict[str, float] = {}
        self._local_cluster = LocalCluster()

    @abc.abstractmethod
    async def record_login(self, user_id: str, email: str, ip: str | None) -> User:
        """Create the user (with the lowest free port slot) or count one more sign-in."""

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self) -> list[User]: ...

    @abc.abstractmethod
    async def save_tabs(self, user_id: str, tabs: list[str], active_tab: str) -> None: ...

    @abc.abstractmethod
    async def revoke(self, jti: str, expires_at: float) -> None:
        """Refuse the token from now on, in every server process sharing this store."""

    @abc.abstractmethod
    async def first_delivery(self, delivery_id: str, keep_seconds: float) -> bool:
        """Record a webhook delivery id; False when it was already seen within `keep_seconds`.

        Only signed deliveries get here, and ids older than the window are dropped on every
        call, so the table holds one day of the repository's events.
        """

    @abc.abstractmethod
    async def count_users(self) -> int: ...

    @abc.abstractmethod
    async def transaction(self, statements: list[tuple[str, tuple]]) -> list[list[dict]]:
        """Run `statements` (SQL with `?` placeholders, the same on both engines) in one
        transaction; the rows each returned (`RETURNING` included), as dicts."""

    def _checked_slot(self, slot: int) -> int:
        """The lowest free slot, if its 10 ports still fit below 65536."""
        if slot >= self.port_slots:
            raise NoPortsLeft(f"no free range of {PORTS_PER_USER} ports is left for a new user"
                              f" (PORT_BASE {self.port_base} to {HIGHEST_PORT} is full)")
        return slot

    @abc.abstractmethod
    def close(self) -> None: ...

    def cluster(self) -> Cluster:
        """What this store shares with other server processes about containers (nothing here)."""
        return self._local_cluster

    async def revoke_user(self, user_id: str, lifetime_seconds: float) -> None:
        """Refuse every token of `user_id` issued until now: those expire within a lifetime
        from now, a token issued later expires after that."""
        await self.revoke(f"{USER_TOKENS}{user_id}", time.time() + lifetime_seconds)

    def refuses(self, identity: Identity) -> bool:
        """Answered from memory: every authenticated request asks, so it must be free."""
        return identity.jti in self._revoked or \
            identity.expires_at <= self._revoked.get(f"{USER_TOKENS}{identity.user_id}", 0.0)

    def _remember_revoked(self, jti: str, expires_at: float) -> None:
        now = time.time()
        if len(self._revoked) > 1000:  # expired ids refuse nothing the JWT check would let in
            self._revoked = {k: v for k, v in self._revoked.items() if v >= now}
        self._revoked[jti] = expires_at

    def _to_user(self, row: Any) -> User:
        """A `users` row (any mapping by column name) as a User."""
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

    @staticmethod
    def _merged_ips(stored: str, ip: str | None) -> str:
        ips = [a for a in json.loads(stored) if a != ip] + ([ip] if ip else [])
        return json.dumps(ips[-MAX_IPS_KEPT:])

    async def health(self) -> dict:
        try:
            count = await self.count_users()
        except (StoreError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "users": count}


def open_store(settings: Settings) -> Store:
    """PostgreSQL when DATABASE_URL is set, else SQLite in DATA_DIR."""
    if settings.database_url:
        from .store_pg import PostgresStore

        return PostgresStore(settings.database_url, settings.port_base)
    return SqliteStore(settings.db_path, settings.port_base)


class SqliteStore(Store):
    """The embedded engine: one SQLite file (WAL), for one server process."""

    def __init__(self, path: Path, port_base: int) -> None:
        super().__init__(port_base)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._local = threading.local()
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
            conn.execute(
                "UPDATE users SET email = ?, last_login = ?, login_count = login_count + 1,"
                " ip_addresses = ? WHERE id = ?",
                (email, now, self._merged_ips(row["ip_addresses"], ip), user_id),
            )
        return self._user_row(conn, user_id)

    def _free_slot(self, conn: sqlite3.Connection) -> int:
        return self._checked_slot(conn.execute(FREE_SLOT_SQL).fetchone()[0])

    def _user_row(self, conn: sqlite3.Connection, user_id: str) -> User:
        row = conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()
        return self._to_user(row)

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

    async def revoke(self, jti: str, expires_at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (time.time(),))
            conn.execute("INSERT OR REPLACE INTO revoked_tokens VALUES (?, ?)", (jti, expires_at))

        await self._run(lambda: self._write(write))
        self._remember_revoked(jti, expires_at)

    def _load_revoked(self, conn: sqlite3.Connection) -> dict[str, float]:
        rows = conn.execute("SELECT jti, expires_at FROM revoked_tokens WHERE expires_at >= ?", (time.time(),))
        return {r["jti"]: r["expires_at"] for r in rows}

    async def first_delivery(self, delivery_id: str, keep_seconds: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM webhook_deliveries WHERE received_at < ?", (time.time() - keep_seconds,))
            cursor = conn.execute("INSERT OR IGNORE INTO webhook_deliveries VALUES (?, ?)", (delivery_id, time.time()))
            return cursor.rowcount == 1

        return await self._run(lambda: self._write(write))

    async def count_users(self) -> int:
        return await self._run(lambda: self._call(lambda c: c.execute("SELECT COUNT(*) FROM users").fetchone()[0]))

    async def transaction(self, statements: list[tuple[str, tuple]]) -> list[list[dict]]:
        def write(conn: sqlite3.Connection) -> list[list[dict]]:
            return [[dict(row) for row in conn.execute(sql, params).fetchall()] for sql, params in statements]

        return await self._run(lambda: self._write(write))

