"""Every setting the server reads, declared once: flags, environment and `.env`.

`load_settings` validates everything at start-up and raises `ConfigError` with one line
naming the variable, so a bad deployment stops before it serves anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .containers.backend import PORTS_PER_USER
from .ratelimit import Rate

GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_USERINFO_URL = "https://openidconnect.googleapis.com/v1/userinfo"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
MIN_SECRET_BYTES = 32
HIGHEST_PORT = 65535
HOST_HEADER = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::\d{1,5})?$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it in one line."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 5555
    debug: bool = False
    log_format: str = "text"
    dev: bool = False
    backend: str = "docker"
    secret: str = ""
    secret_generated: bool = False
    production: bool = False
    google_client_id: str = ""
    google_client_secret: str = ""
    frontend_origin: str = "http://localhost:3000"
    redirect_uri: str = "http://127.0.0.1:5555/auth/callback"
    github_webhook_secret: str = ""
    port_base: int = 8000
    data_dir: Path = Path("data")
    container_image: str = "3compute"
    admin_emails: frozenset[str] = field(default_factory=frozenset)
    max_containers: int = 100
    container_memory: str = "512m"
    container_cpus: float = 1.0
    container_pids: int = 256
    idle_timeout_seconds: float = 600.0
    idle_poll_seconds: float = 30.0
    oauth_authorize_url: str = GOOGLE_AUTHORIZE_URL
    oauth_token_url: str = GOOGLE_TOKEN_URL
    oauth_userinfo_url: str = GOOGLE_USERINFO_URL
    deploy_command: str = "/opt/deploy.sh"
    session_days: float = 7.0
    allowed_hosts: frozenset[str] = LOOPBACK_HOSTS
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    database_url: str = ""  # PostgreSQL, shared by replicas; empty: SQLite in DATA_DIR
    # Limits per user (terminals, file API, tab saves) and per client IP (sign-in); None: off.
    max_terminals_per_user: int = 20
    max_terminals: int = 1000
    server_nice: int = -10
    spare_attach_seconds: float = 60.0  # how long a spare attachment waits for a tab; 0: none
    terminal_open_rate: Rate | None = Rate(5, 60)
    file_rate: Rate | None = Rate(50, 500)
    tabs_rate: Rate | None = Rate(20, 200)
    signin_rate: Rate | None = Rate(10, 300)
    workspace_quota_mb: int = 0  # 0: none
    workspace_disks: str = "none"  # "loop": each workspace an ext4 filesystem of the quota's size
    grading_concurrency: int = 2  # test runs at once (grading.py); the rest wait
    grading_timeout_seconds: float = 60.0
    grading_test_seconds: float = 10.0
    grading_memory: str = "256m"
    grading_cpus: float = 0.5
    grading_pids: int = 64

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry `Secure` except in `--dev` against a plain-HTTP frontend."""
        return not self.dev or self.frontend_origin.startswith("https://")

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "3compute.sqlite3"


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, `#` comments, optional quotes; nothing fancier."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="3Compute backend server")
    parser.add_argument("--host", default=None, help="bind address (default HOST_IP, else 127.0.0.1)")
    parser.add_argument("--port", default="5555", help="listen port (default 5555)")
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    parser.add_argument("--dev", action="store_true", help="development mode (dev-login, no Secure cookie)")
    parser.add_argument("--backend", default="docker", choices=["docker", "swarm", "local"], help="where terminals run")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines (default) or one JSON object per line")
    return parser.parse_args(argv)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name} must be at least {minimum}, got {raw}")
    return value


def _memory(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip().lower() or default
    digits = raw[:-1] if raw[-1:] in "bkmg" else raw
    if not digits.isdigit() or int(digits) <= 0:
        raise ConfigError(f"{name} must be a size such as 512m or 1g, got {raw!r}")
    return raw


def _rate(env: Mapping[str, str], name: str, default: Rate) -> Rate | None:
    """`RATE/BURST` (events a second, events at once), or `off`."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw == "off":
        return None
    rate, _, burst = raw.partition("/")
    try:
        parsed = Rate(float(rate), int(burst))
    except ValueError:
        raise ConfigError(f"{name} must be RATE/BURST such as 20/100, or off; got {raw!r}") from None
    if not parsed.per_second > 0 or parsed.burst < 1:  # also refuses NaN
        raise ConfigError(f"{name} needs a rate above 0 and a burst of at least 1, got {raw!r}")
    return parsed


def _port(raw: str, name: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be between 0 and 65535, got {port}")
    return port


def host_name(value: str) -> str | None:
    """The host of a `Host` header or `host[:port]`: lower case, no port, no brackets, no
    trailing dot; None when it is anything else (user info, a path, a bad bracket)."""
    match = HOST_HEADER.match(value.strip())
    if match is None:
        return None
    return (match.group(1) or match.group(2)).lower().rstrip(".") or None


def _allowed_hosts(env: Mapping[str, str], host: str, urls: list[str]) -> frozenset[str]:
    """The names a request's `Host` may carry: loopback, the bind address unless it is a
    wildcard, the hosts of the configured URLs, and ALLOWED_HOSTS (for a proxy's name)."""
    names = set(LOOPBACK_HOSTS)
    if host not in WILDCARD_HOSTS:
        names.add(host.strip("[]").lower())  # a bind address: an IP or a name, never a port
    names.update(name for url in urls if (name := urlsplit(url).hostname))
    for entry in env.get("ALLOWED_HOSTS", "").split(","):
        if entry.strip():
            name = host_name(entry)
            if name is None:
                raise ConfigError(f"ALLOWED_HOSTS must be comma-separated host names, got {entry.strip()!r}")
            names.add(name)
    return frozenset(names)


def _networks(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in env.get(name, "").split(","):
        if entry.strip():
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{name} must be comma-separated IPs or CIDRs, got {entry.strip()!r}") from None
    return tuple(networks)


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
                  dotenv: Path = Path(".env")) -> Settings:
    args = parse_args(argv)
    env = {**read_dotenv(dotenv), **(os.environ if environ is None else environ)}
    production = env.get("FLASK_ENV", "").strip().lower() == "production"
    if args.dev and production:
        raise ConfigError("--dev is refused when FLASK_ENV=production")
    host = args.host or env.get("HOST_IP", "").strip() or "127.0.0.1"
    port = _port(args.port, "--port")
    if args.backend == "local" and not (args.dev and host in LOOPBACK_HOSTS):
        raise ConfigError("--backend local needs --dev and a loopback --host")

    secret = env.get("FLASK_SECRET", "")
    generated = False
    if not secret:
        if not args.dev:
            raise ConfigError("FLASK_SECRET is required (or run with --dev)")
        secret, generated = secrets.token_urlsafe(32), True
    if not args.dev and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"FLASK_SECRET must be at least {MIN_SECRET_BYTES} bytes, got {len(secret.encode())}")

    suffix = "PROD" if production else "DEV"
    frontend = env.get(f"FRONTEND_ORIGIN_{suffix}", "").strip().rstrip("/") or "http://localhost:3000"
    redirect = env.get(f"REDIRECT_URI_{suffix}", "").strip() or f"http://{host}:{port}/auth/callback"
    port_base = _int(env, "PORT_BASE", 8000, minimum=1)
    if port_base + PORTS_PER_USER - 1 > HIGHEST_PORT:
        raise ConfigError(f"PORT_BASE must leave room for {PORTS_PER_USER} ports up to {HIGHEST_PORT}, got {port_base}")

    quota_mb, disks = _workspace_disks(env, args.backend)
    return Settings(
        host=host,
        port=port,
        debug=args.debug,
        log_format=args.log_format,
        dev=args.dev,
        backend=args.backend,
        secret=secret,
        secret_generated=generated,
        production=production,
        google_client_id=env.get("GOOGLE_CLIENT_ID", ""),
        google_client_secret=env.get("GOOGLE_CLIENT_SECRET", ""),
        frontend_origin=frontend,
        redirect_uri=redirect,
        github_webhook_secret=env.get("GITHUB_WEBHOOK_SECRET", ""),
        port_base=port_base,
        data_dir=Path(env.get("DATA_DIR", "").strip() or "data").absolute(),
        container_image=env.get("CONTAINER_IMAGE", "").strip() or "3compute",
        admin_emails=frozenset(e.strip().lower() for e in env.get("ADMIN_EMAILS", "").split(",") if e.strip()),
        max_containers=_int(env, "MAX_CONTAINERS", 100, minimum=1),
        container_memory=_memory(env, "CONTAINER_MEMORY", "512m"),
        container_cpus=_float(env, "CONTAINER_CPUS", 1.0, minimum=0.01),
        container_pids=_int(env, "CONTAINER_PIDS", 256, minimum=16),
        idle_timeout_seconds=_float(env, "IDLE_TIMEOUT_SECONDS", 600.0),
        idle_poll_seconds=_float(env, "IDLE_POLL_SECONDS", 30.0, minimum=0.1),
        oauth_authorize_url=env.get("OAUTH_AUTHORIZE_URL", "").strip() or GOOGLE_AUTHORIZE_URL,
        oauth_token_url=env.get("OAUTH_TOKEN_URL", "").strip() or GOOGLE_TOKEN_URL,
        oauth_userinfo_url=env.get("OAUTH_USERINFO_URL", "").strip() or GOOGLE_USERINFO_URL,
        deploy_command=env.get("DEPLOY_COMMAND", "").strip() or "/opt/deploy.sh",
        session_days=_float(env, "SESSION_DAYS", 7.0, minimum=0.001),
        allowed_hosts=_allowed_hosts(env, host, [frontend, redirect]),
        trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        database_url=_database_url(env),
        max_terminals_per_user=_int(env, "MAX_TERMINALS_PER_USER", 20, minimum=1),
        max_terminals=_int(env, "MAX_TERMINALS", 1000, minimum=1),
        server_nice=_int(env, "SERVER_NICE", -10, minimum=-20, maximum=19),
        spare_attach_seconds=_float(env, "SPARE_ATTACH_SECONDS", 60.0),
        terminal_open_rate=_rate(env, "TERMINAL_OPEN_RATE_LIMIT", Rate(5, 60)),
        file_rate=_rate(env, "FILE_RATE_LIMIT", Rate(50, 500)),
        tabs_rate=_rate(env, "TABS_RATE_LIMIT", Rate(20, 200)),
        signin_rate=_rate(env, "SIGNIN_RATE_LIMIT", Rate(10, 300)),
        workspace_quota_mb=quota_mb,
        workspace_disks=disks,
        grading_concurrency=_int(env, "GRADING_CONCURRENCY", 2, minimum=1),
        grading_timeout_seconds=_float(env, "GRADING_TIMEOUT_SECONDS", 60.0, minimum=1),
        grading_test_seconds=_float(env, "GRADING_TEST_SECONDS", 10.0, minimum=0.5),
        grading_memory=_memory(env, "GRADING_MEMORY", "256m"),
        grading_cpus=_float(env, "GRADING_CPUS", 0.5, minimum=0.01),
        grading_pids=_int(env, "GRADING_PIDS", 64, minimum=16),
    )


def _workspace_disks(env: Mapping[str, str], backend: str) -> tuple[int, str]:
    """WORKSPACE_QUOTA_MB and WORKSPACE_DISKS, which only work together and not on Swarm."""
    quota_mb = _int(env, "WORKSPACE_QUOTA_MB", 0)
    disks = env.get("WORKSPACE_DISKS", "").strip().lower() or "none"
    if disks not in ("none", "loop"):
        raise ConfigError(f"WORKSPACE_DISKS must be none or loop, got {disks!r}")
    if disks == "loop" and quota_mb <= 0:
        raise ConfigError("WORKSPACE_DISKS=loop needs WORKSPACE_QUOTA_MB (the size of each workspace)")
    if disks == "loop" and backend == "swarm":
        raise ConfigError("WORKSPACE_DISKS=loop cannot serve --backend swarm: the workspaces are on every "
                          "node's shared storage (set a quota on the NFS server instead)")
    return quota_mb, disks


def _database_url(env: Mapping[str, str]) -> str:
    raw = env.get("DATABASE_URL", "").strip()
    if raw and not raw.startswith(("postgresql://", "postgres://")):
        raise ConfigError("DATABASE_URL must be a postgresql:// URL (or unset for SQLite in DATA_DIR)")
    return raw
