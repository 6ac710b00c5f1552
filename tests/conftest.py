"""Shared fixtures: a real server on loopback (pytest-tornado), a fake OAuth provider on
loopback, settings on a temporary DATA_DIR, and a small cookie-keeping HTTP client."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import types
import urllib.parse
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import docker
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from bench.common import free_port_block
from threecompute.app import make_app, make_http_server, server_options
from threecompute.containers.backend import BackendError
from threecompute.handlers.terminal import close_all_sockets
from threecompute.services import Services, build_services
from threecompute.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a module, loaded once."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
SECRET = "test-secret-0123456789abcdef0123456789"
FRONTEND = "http://frontend.test:3000"
ADMIN = "admin@example.com"


# -- the fake OAuth provider ------------------------------------------------------------


class FakeProvider:
    """Authorize, token and userinfo endpoints; `profile` is whom the next sign-in returns."""

    def __init__(self) -> None:
        self.profile: dict = {"sub": "1001", "email": "student@example.com", "email_verified": True}
        self.codes: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.token_requests: list[dict] = []
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> tornado.web.Application:
        provider = self

        class Authorize(tornado.web.RequestHandler):
            def get(self) -> None:
                code = f"code{len(provider.codes)}"
                provider.codes[code] = dict(provider.profile)
                query = urllib.parse.urlencode({"code": code, "state": self.get_argument("state")})
                self.redirect(f"{self.get_argument('redirect_uri')}?{query}")

        class Token(tornado.web.RequestHandler):
            def check_xsrf_cookie(self) -> None:
                pass

            def post(self) -> None:
                form = {k: self.get_body_argument(k) for k in self.request.body_arguments}
                provider.token_requests.append(form)
                profile = provider.codes.pop(form.get("code", ""), None)
                if profile is None or form.get("client_secret") != "client-secret":
                    self.set_status(400)
                    self.finish({"error": "invalid_grant"})
                    return
                token = f"tok{len(provider.tokens)}"
                provider.tokens[token] = profile
                self.finish({"access_token": token, "token_type": "Bearer", "expires_in": 3600})

        class UserInfo(tornado.web.RequestHandler):
            def get(self) -> None:
                token = self.request.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in provider.tokens:
                    self.set_status(401)
                    self.finish({"error": "invalid_token"})
                    return
                self.finish(provider.tokens[token])

        return tornado.web.Application([(r"/authorize", Authorize), (r"/token", Token), (r"/userinfo", UserInfo)])


@pytest.fixture
def provider(io_loop) -> Iterator[FakeProvider]:
    fake = FakeProvider()
    sock, fake.port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(fake.app())
    server.add_sockets([sock])
    yield fake
    server.stop()


# -- settings and the server under test -------------------------------------------------


def test_environ(data_dir: Path, provider: FakeProvider | None, http_port: int, **extra: str) -> dict[str, str]:
    env = {
        "FLASK_SECRET": SECRET,
        "FRONTEND_ORIGIN_DEV": FRONTEND,
        "REDIRECT_URI_DEV": f"http://localhost:{http_port}/auth/callback",
        "GOOGLE_CLIENT_ID": "client-id",
        "GOOGLE_CLIENT_SECRET": "client-secret",
        "DATA_DIR": str(data_dir),
        "ADMIN_EMAILS": ADMIN,
        "PORT_BASE": str(free_port_block(10 * 50)),
        "GITHUB_WEBHOOK_SECRET": "hook-secret",
        "DEPLOY_COMMAND": f"{sys.executable} -c pass",
    }
    if provider is not None:
        env |= {
            "OAUTH_AUTHORIZE_URL": f"{provider.base}/authorize",
            "OAUTH_TOKEN_URL": f"{provider.base}/token",
            "OAUTH_USERINFO_URL": f"{provider.base}/userinfo",
        }
    return env | extra


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "local", "--host", "127.0.0.1"]


@pytest.fixture
def database_url() -> str:
    """The store the server under test uses: "" is SQLite in DATA_DIR (a module may override)."""
    return ""


@pytest.fixture
def limits_env() -> dict[str, str]:
    """Rate-limit settings of the server under test: the defaults, unless a module that floods
    the server on purpose (to test something else) turns them off."""
    return {}


NO_RATE_LIMITS = {"FILE_RATE_LIMIT": "off", "TABS_RATE_LIMIT": "off", "SIGNIN_RATE_LIMIT": "off",
                  "TERMINAL_OPEN_RATE_LIMIT": "off"}


@pytest.fixture
def server_env(data_dir, provider, http_port, database_url, limits_env) -> dict[str, str]:
    extra = {"DATABASE_URL": database_url} if database_url else {}
    return test_environ(data_dir, provider, http_port, **extra, **limits_env)


# -- a private PostgreSQL ---------------------------------------------------------------

POSTGRES_SCRIPT = ROOT / "scripts" / "postgres.sh"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster of this test run's own (initdb in a temporary folder, a free
    loopback port); its superuser URL. Stopped and removed at the end, failures or not."""
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not shutil.which("initdb"):
        message = "PostgreSQL is not installed (scripts/postgres.sh install)"
        if os.environ.get("REQUIRE_DOCKER") == "1" or os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    folder = tempfile.mkdtemp(prefix="3compute-pg-")
    port = tornado.testing.bind_unused_port()
    port[0].close()
    try:
        subprocess.run([str(POSTGRES_SCRIPT), "start", folder, str(port[1])], check=True,
                       env=os.environ | {"PG_FAST": "1"}, timeout=120)
        yield f"postgresql://postgres@127.0.0.1:{port[1]}"
    finally:
        subprocess.run([str(POSTGRES_SCRIPT), "stop", folder], timeout=60)


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """A fresh, empty database on the private cluster, dropped afterwards."""
    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{postgres_server}/{name}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def any_database_url(request) -> str:
    """Both engines in turn: "" (SQLite in DATA_DIR), then a fresh PostgreSQL database."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def settings(server_flags, server_env, tmp_path) -> Settings:
    return load_settings(server_flags, server_env, dotenv=tmp_path / "no.env")


def require_docker() -> None:
    """Skip a Docker test where no engine or image answers; fail instead under REQUIRE_DOCKER=1."""
    try:
        docker.from_env(version="auto", timeout=10).images.get(os.environ.get("CONTAINER_IMAGE", "3compute"))
    except Exception as exc:
        message = f"Docker engine or image unavailable: {exc}"
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _docker_available(request) -> None:
    if request.node.get_closest_marker("docker"):
        require_docker()


@pytest.fixture
def services(settings, io_loop) -> Iterator[Services]:
    built = build_services(settings)
    io_loop.run_sync(built.backend.start)
    try:
        yield built
    finally:
        io_loop.run_sync(lambda: close_all_sockets(built))
        io_loop.run_sync(built.backend.stop)
        # Containers and tmux servers outlive the server by design (and containers hold host
        # ports): remove this test's.
        with contextlib.suppress(BackendError):  # an engine that is down holds nothing of ours
            io_loop.run_sync(built.backend.purge, timeout=60)
        built.close()


@pytest.fixture
def app(services) -> tornado.web.Application:
    return make_app(services)


@pytest.fixture
def http_server_options() -> dict:
    """The server's own limits; a test module overrides this fixture to shorten timeouts."""
    return server_options()


@pytest.fixture
def http_server(request, io_loop, _unused_port, app, http_server_options):  # noqa: ANN001 - pytest-tornado's own fixture, as server.py serves
    server = make_http_server(app, http_server_options)
    server.add_sockets([_unused_port[0]])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


# -- a client that keeps cookies --------------------------------------------------------


class Client:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies: dict[str, str] = {}
        self.http = AsyncHTTPClient()

    def cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    async def fetch(self, path: str, method: str = "GET", body: bytes | str | dict | None = None,
                    headers: dict | None = None, **kwargs) -> HTTPResponse:
        headers = dict(headers or {})
        if self.cookies:
            headers.setdefault("Cookie", self.cookie_header())
        if isinstance(body, dict):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT"):
            body = b""
        url = path if path.startswith("http") else self.base_url + path
        response = await self.http.fetch(url, method=method, body=body, headers=headers, raise_error=False,
                                         follow_redirects=False, request_timeout=60, **kwargs)
        self.keep_cookies(response)
        return response

    def keep_cookies(self, response: HTTPResponse) -> None:
        for header in response.headers.get_list("Set-Cookie"):
            jar = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel["expires"] and "1970" in morsel["expires"] or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    async def dev_login(self, email: str) -> HTTPResponse:
        response = await self.fetch("/auth/dev-login?" + urllib.parse.urlencode({"email": email}))
        assert response.code == 302, (response.code, response.body)
        return response


def body_json(response: HTTPResponse) -> dict:
    try:
        return json.loads(response.body)
    except ValueError:
        raise AssertionError(f"not JSON ({response.code}): {response.body[:300]!r}") from None


@pytest.fixture
def client(base_url, http_server) -> Client:
    return Client(base_url)


@pytest.fixture
def make_client(base_url, http_server):
    return lambda: Client(base_url)


# -- a server in its own process --------------------------------------------------------


def run_server_process(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 20):
    """server.py run to completion (for start-up failures), with only `env` on top of a clean base."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "GOOGLE_", "DATA_DIR"))}
    return subprocess.run([sys.executable, str(ROOT / "server.py"), *args], env=base | env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
