"""Access attacks against a real server: a rebound Host, a forged X-Forwarded-For, cookies
without Secure, and two provider ids that share a long prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from bench.common import port_is_free
from threecompute.identity import COOKIE_NAME

from .conftest import ADMIN, ROOT, Client, body_json
from .conftest import test_environ as environ_for
from .terminal_client import TerminalClient

EVIL = "evil.example"


def port_of(client: Client) -> int:
    return urllib.parse.urlsplit(client.base_url).port


def rebound(client: Client) -> dict[str, str]:
    """What a page on a name rebound to this server sends: its own Host and Origin."""
    host = f"{EVIL}:{port_of(client)}"
    return {"Host": host, "Origin": f"http://{host}"}


# -- DNS rebinding -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_rebound_host_gets_no_cookie_and_writes_nothing(client, make_client):
    attacker = make_client()
    login = await attacker.fetch("/auth/dev-login?email=victim@example.com", headers=rebound(client))
    assert login.code == 421, login.body
    assert "Host" in body_json(login)["error"]
    assert COOKIE_NAME not in attacker.cookies

    await client.dev_login("victim@example.com")  # the victim's own cookie, replayed by the browser
    headers = {**rebound(client), "Cookie": client.cookie_header()}
    for path, method, body in [("/file/owned.txt", "PUT", b"pwned"), ("/file/made.txt", "POST", b""),
                               ("/auth/tabs", "POST", json.dumps({"tabs": ["9"], "active_tab": "9"})),
                               ("/auth/me", "GET", None), ("/list-files", "GET", None)]:
        answer = await attacker.fetch(path, method, body, headers=headers)
        assert answer.code == 421, (path, answer.body)
        assert body_json(answer)["error"]
    assert body_json(await client.fetch("/list-files")) == {"files": []}
    assert body_json(await client.fetch("/auth/tabs"))["tabs"] == ["1"]


@pytest.mark.gen_test
async def test_a_rebound_host_gets_no_terminal_on_either_transport(client):
    await client.dev_login("victim@example.com")
    headers = {**rebound(client), "Cookie": client.cookie_header()}
    url = client.base_url.replace("http", "ws", 1)
    for path in ("/terminal/ws?tabId=1", "/socket.io/?EIO=4&transport=websocket&tabId=1"):
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(HTTPRequest(url + path, headers=headers))
        assert refused.value.code == 421, path
    polling = await client.fetch("/socket.io/?EIO=4&transport=polling&tabId=1", headers=headers)
    assert polling.code == 421
    assert body_json(polling)["error"]


@pytest.mark.gen_test
async def test_loopback_names_and_the_frontend_host_are_served(client):
    port = port_of(client)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "frontend.test:3000",
                 f"localhost.:{port}", f"192.0.2.10:{port}", "[2001:db8::1]"):  # any IP: no name to rebind
        answer = await client.fetch("/healthz", headers={"Host": host})
        assert answer.code == 200, (host, answer.body)
    for host in (EVIL, f"127.0.0.1.{EVIL}", f"localhost@{EVIL}", "[::1", "", "192.0.2.10.nip.io",
                 f"{EVIL}@localhost"):
        answer = await client.fetch("/healthz", headers={"Host": host})
        assert answer.code in (400, 421), (host, answer.code)


class TestAllowedHosts:
    @pytest.fixture
    def server_env(self, data_dir, provider, http_port) -> dict[str, str]:
        return environ_for(data_dir, provider, http_port, ALLOWED_HOSTS="api.school.example, proxy.internal")

    @pytest.mark.gen_test
    async def test_a_configured_name_is_served(self, client):
        for host in ("api.school.example", "proxy.internal:8443"):
            answer = await client.fetch("/auth/dev-login?email=a@example.com", headers={"Host": host})
            assert answer.code == 302, (host, answer.body)
        assert (await client.fetch("/healthz", headers={"Host": EVIL})).code == 421


# -- X-Forwarded-For -------------------------------------------------------------------------


async def stored_ips(make_client, email: str) -> list[str]:
    admin = make_client()
    await admin.dev_login(ADMIN)
    users = body_json(await admin.fetch("/auth/users"))["users"]
    return next(u for u in users if u["email"] == email)["ip_addresses"]


@pytest.mark.gen_test
async def test_a_forged_forwarded_for_is_not_the_login_address(client, make_client):
    for forged in ("203.0.113.9", "198.51.100.1, 203.0.113.9"):
        answer = await client.fetch("/auth/dev-login?email=liar@example.com",
                                    headers={"X-Forwarded-For": forged, "X-Real-Ip": "203.0.113.10"})
        assert answer.code == 302
    assert await stored_ips(make_client, "liar@example.com") == ["127.0.0.1"]


def test_server_py_ignores_a_forged_forwarded_for(tmp_path, provider_free_env):
    """The same attack on `server.py` itself, whose HTTP server once trusted X-Forwarded-For."""
    port = next(p for p in range(42000, 43000) if port_is_free(p))
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--dev", "--backend", "local",
                                "--port", str(port)], cwd=tmp_path, env=provider_free_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(NoRedirect)
        deadline = time.monotonic() + 20
        while True:
            try:
                opener.open(f"{base}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server.py never answered"
                time.sleep(0.1)
        for email in ("liar@example.com", ADMIN):
            forged = urllib.request.Request(f"{base}/auth/dev-login?email={email}",
                                            headers={"X-Forwarded-For": "203.0.113.9", "X-Real-Ip": "203.0.113.9"})
            answer = opener.open(forged, timeout=10)
        cookie = answer.headers["Set-Cookie"].split(";")[0]
        users = json.load(opener.open(urllib.request.Request(f"{base}/auth/users", headers={"Cookie": cookie})))
        assert [u["ip_addresses"] for u in users["users"]] == [["127.0.0.1"], ["127.0.0.1"]]
    finally:
        process.terminate()
        process.wait(timeout=20)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 - urllib's signature
        return fp


@pytest.fixture
def provider_free_env(tmp_path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "GOOGLE_", "DATA_DIR"))}
    return base | {"DATA_DIR": str(tmp_path / "data"), "ADMIN_EMAILS": ADMIN, "TMUX_TMPDIR": str(tmp_path)}


class TestTrustedProxy:
    @pytest.fixture
    def server_env(self, data_dir, provider, http_port) -> dict[str, str]:
        return environ_for(data_dir, provider, http_port, TRUSTED_PROXIES="127.0.0.0/8, 10.0.0.0/8")

    @pytest.mark.gen_test
    async def test_the_proxy_names_the_client_and_nothing_before_it_counts(self, client, make_client):
        # The client wrote the first entry; the proxies appended the rest.
        chain = "192.0.2.66, 203.0.113.9, 10.1.2.3"
        answer = await client.fetch("/auth/dev-login?email=proxied@example.com", headers={"X-Forwarded-For": chain})
        assert answer.code == 302
        assert await stored_ips(make_client, "proxied@example.com") == ["203.0.113.9"]


# -- Secure cookies --------------------------------------------------------------------------


class TestNotDev:
    """A server without --dev and without FLASK_ENV; the engine is unreachable, which sign-in
    does not need."""

    @pytest.fixture
    def server_flags(self, monkeypatch, tmp_path) -> list[str]:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
        return ["--backend", "docker", "--host", "127.0.0.1"]

    @pytest.mark.gen_test(timeout=60)
    async def test_every_cookie_is_secure(self, client, provider, services):
        assert not services.settings.dev and not services.settings.production
        login = await client.fetch("/auth/login")
        assert login.code == 302
        state = login.headers.get_list("Set-Cookie")
        assert state and all("Secure" in h for h in state), state
        authorize = await client.fetch(login.headers["Location"])
        callback = await client.fetch(authorize.headers["Location"])
        assert callback.code == 302, callback.body
        session = [h for h in callback.headers.get_list("Set-Cookie") if h.startswith(COOKIE_NAME)]
        assert session and all("Secure" in h and "HttpOnly" in h for h in session), session
        assert (await client.fetch("/auth/dev-login?email=x@example.com")).code == 404


# -- two ids with a common prefix (local backend) -------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_ids_sharing_20_characters_get_their_own_shell(client, make_client, services):
    first, second = "108234567890123456781", "108234567890123456782"
    clients = []
    for uid in (first, second):
        await services.store.record_login(uid, f"{uid}@example.com", None)
        signed = make_client()
        signed.cookies[COOKIE_NAME] = services.tokens.issue(uid, f"{uid}@example.com")
        clients.append(signed)
    one = await TerminalClient.open(clients[0])
    await one.run("export MINE=first-$((1+1)); echo set-$((2+3))", "set-5")
    two = await TerminalClient.open(clients[1])
    seen = await two.run("echo [$MINE] in $PWD", f"in {services.settings.workspaces_dir / second}")
    assert "first-2" not in seen
    one.close()
    two.close()
