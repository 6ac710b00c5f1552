"""Sign-in against a fake provider on loopback, the session cookie, and the /auth records."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types
import urllib.parse

import jwt
import pytest

from threecompute import identity
from threecompute.identity import COOKIE_NAME, VERIFIED_TOKENS_KEPT, TokenCodec
from threecompute.services import build_services

from .conftest import ADMIN, FRONTEND, SECRET, Client, body_json


@pytest.fixture
def database_url(any_database_url) -> str:
    """Every test here runs against SQLite and against PostgreSQL."""
    return any_database_url

async def sign_in(client: Client, provider) -> object:
    """The whole browser dance: login -> provider -> callback. Returns the callback answer."""
    login = await client.fetch("/auth/login")
    assert login.code == 302, login.body
    authorize = await client.fetch(login.headers["Location"])
    assert authorize.code == 302
    return await client.fetch(authorize.headers["Location"])


def forge(claims: dict, key: str | None = SECRET, algorithm: str = "HS256") -> str:
    base = {"sub": "1001", "email": "student@example.com", "iat": int(time.time()),
            "exp": int(time.time()) + 3600, "jti": "forged"}
    return jwt.encode(base | claims, key, algorithm=algorithm)


@pytest.mark.gen_test
async def test_oauth_sign_in_sets_a_session_cookie_and_records_the_user(client, provider):
    login = await client.fetch("/auth/login")
    location = urllib.parse.urlsplit(login.headers["Location"])
    query = urllib.parse.parse_qs(location.query)
    assert location.path == "/authorize"
    assert query["scope"] == ["openid email profile"]
    assert query["state"][0]

    callback = await sign_in(client, provider)
    assert callback.code == 302, callback.body
    assert callback.headers["Location"] == f"{FRONTEND}/"
    cookie = next(h for h in callback.headers.get_list("Set-Cookie") if h.startswith(COOKIE_NAME))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie

    me = await client.fetch("/auth/me")
    assert me.code == 200
    record = body_json(me)
    assert record["email"] == "student@example.com"
    assert record["port_end"] == record["port_start"] + 9


@pytest.mark.gen_test
async def test_callback_refuses_forged_or_missing_state(client, provider):
    login = await client.fetch("/auth/login")
    authorize = await provider_redirect(client, login)
    forged = authorize.replace("state=", "state=x")
    assert (await client.fetch(forged)).code == 400
    client.cookies.pop("3compute_oauth_state")
    answer = await client.fetch(authorize)
    assert answer.code == 400
    assert "state" in body_json(answer)["error"]
    assert COOKIE_NAME not in client.cookies


@pytest.mark.gen_test
async def test_callback_refuses_a_missing_or_bad_code(client, provider):
    login = await client.fetch("/auth/login")
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(login.headers["Location"]).query)["state"][0]
    assert (await client.fetch(f"/auth/callback?state={state}")).code == 400
    answer = await client.fetch(f"/auth/callback?state={state}&code=nonsense")
    assert answer.code == 400, answer.body
    assert COOKIE_NAME not in client.cookies


async def provider_redirect(client: Client, login) -> str:
    authorize = await client.fetch(login.headers["Location"])
    return authorize.headers["Location"]


@pytest.mark.gen_test
async def test_unverified_email_is_sent_back_to_login(client, provider):
    provider.profile = {"sub": "2002", "email": "unverified@example.com", "email_verified": False}
    callback = await sign_in(client, provider)
    assert callback.code == 302
    assert callback.headers["Location"] == f"{FRONTEND}/login?error=email_not_verified"
    assert COOKIE_NAME not in client.cookies
    assert (await client.fetch("/auth/me")).code == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("make_token", [
    lambda: forge({}, key="another-key-another-key-another-key"),
    lambda: forge({"exp": int(time.time()) - 10}),
    lambda: forge({}, key=None, algorithm="none"),
    lambda: forge({})[:-4] + "AAAA",
    lambda: "not-a-jwt",
    lambda: forge({"sub": ""}),
], ids=["other-key", "expired", "alg-none", "tampered", "garbage", "no-subject"])
async def test_bad_tokens_are_no_identity(client, make_token):
    client.cookies[COOKIE_NAME] = make_token()
    for path in ("/auth/me", "/me", "/auth/tabs", "/list-files"):
        answer = await client.fetch(path)
        assert answer.code == 401, (path, answer.body)
        assert body_json(answer) == {"error": "unauthenticated"}


def test_a_verified_token_is_remembered_only_until_it_expires(monkeypatch):
    codec = TokenCodec(SECRET, lifetime_seconds=3600)
    token = codec.issue("u1", "u1@example.com")
    assert codec.decode(token).user_id == "u1"
    later = time.time() + 3601
    monkeypatch.setattr(identity, "time", types.SimpleNamespace(time=lambda: later))
    assert codec.decode(token) is None, "remembered past its expiry"


def test_the_verified_tokens_kept_are_bounded():
    codec = TokenCodec(SECRET, lifetime_seconds=3600)
    tokens = [codec.issue(f"u{i}", f"u{i}@example.com") for i in range(VERIFIED_TOKENS_KEPT + 50)]
    assert all(codec.decode(token) is not None for token in tokens)
    assert len(codec._verified) == VERIFIED_TOKENS_KEPT
    assert codec.decode(tokens[0]).user_id == "u0", "an evicted token is verified again"


def test_a_token_unused_for_a_whole_period_is_forgotten(monkeypatch):
    codec = TokenCodec(SECRET, lifetime_seconds=3600)
    working, gone = codec.issue("u1", "u1@example.com"), codec.issue("u2", "u2@example.com")
    verified: list[str] = []
    verify = codec._verify
    monkeypatch.setattr(codec, "_verify", lambda token: verified.append(token) or verify(token))
    assert codec.decode(working) and codec.decode(gone)
    for _ in range(3):
        codec.forget_idle()
        assert codec.decode(working).user_id == "u1"  # used in every period: kept
    assert verified == [working, gone]
    assert codec.decode(gone).user_id == "u2", "forgotten, then verified again"
    assert verified == [working, gone, gone]


@pytest.mark.gen_test
async def test_logout_clears_the_cookie_and_revokes_the_token(client):
    await client.dev_login("student@example.com")
    token = client.cookies[COOKIE_NAME]
    assert (await client.fetch("/auth/me")).code == 200
    logout = await client.fetch("/auth/logout")
    assert logout.code == 200
    assert COOKIE_NAME not in client.cookies
    client.cookies[COOKIE_NAME] = token  # a replayed copy
    assert (await client.fetch("/auth/me")).code == 401


@pytest.mark.gen_test
async def test_short_paths_answer_like_the_auth_ones(client):
    assert (await client.fetch("/me")).code == 401
    await client.dev_login("short@example.com")
    long_form, short_form = await client.fetch("/auth/me"), await client.fetch("/me")
    assert long_form.code == short_form.code == 200
    assert long_form.body == short_form.body
    assert body_json(await client.fetch("/tabs")) == {"tabs": ["1"], "active_tab": "1"}
    assert (await client.fetch("/login")).code == 302
    assert (await client.fetch("/users")).code == 403


@pytest.mark.gen_test
async def test_users_is_for_admins_only(client, make_client):
    assert (await client.fetch("/auth/users")).code == 401
    await client.dev_login("student@example.com")
    assert (await client.fetch("/auth/users")).code == 403
    admin = make_client()
    await admin.dev_login(ADMIN)
    answer = await admin.fetch("/auth/users")
    assert answer.code == 200
    emails = {u["email"] for u in body_json(answer)["users"]}
    assert emails == {"student@example.com", ADMIN}


@pytest.mark.gen_test
async def test_tabs_round_trip_and_validation(client):
    assert (await client.fetch("/auth/tabs")).code == 401
    await client.dev_login("tabs@example.com")
    assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1"], "active_tab": "1"}
    saved = await client.fetch("/auth/tabs", "POST", {"tabs": ["1", "2", "abc"], "active_tab": "2"})
    assert saved.code == 200 and body_json(saved) == {"success": True}
    assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", "2", "abc"], "active_tab": "2"}

    bad_bodies = [
        b"{not json",
        b"[1, 2]",
        {"tabs": "1", "active_tab": "1"},
        {"tabs": [], "active_tab": "1"},
        {"tabs": ["1", "../x"], "active_tab": "1"},
        {"tabs": ["a" * 33], "active_tab": "a" * 33},
        {"tabs": [str(i) for i in range(51)], "active_tab": "1"},
        {"tabs": ["1", 2], "active_tab": "1"},
        {"tabs": ["1"], "active_tab": "2"},
        {"tabs": ["1"]},
    ]
    for body in bad_bodies:
        answer = await client.fetch("/auth/tabs", "POST", body, headers={"Content-Type": "application/json"})
        assert answer.code == 400, (body, answer.body)
        assert body_json(answer)["error"]
    assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", "2", "abc"], "active_tab": "2"}


@pytest.mark.gen_test
async def test_dev_login_redirects_only_to_own_paths(client):
    ok = await client.fetch("/auth/dev-login?email=a@example.com&next=/files")
    assert ok.code == 302 and ok.headers["Location"] == "/files"
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"):
        query = urllib.parse.urlencode({"email": "a@example.com", "next": bad})
        answer = await client.fetch(f"/auth/dev-login?{query}")
        assert answer.headers["Location"] == "/", bad
    assert (await client.fetch("/auth/dev-login?email=not-an-email")).code == 400


@pytest.mark.gen_test
async def test_dev_login_is_404_without_dev(client, services):
    services.settings = dataclasses.replace(services.settings, dev=False)
    answer = await client.fetch("/auth/dev-login?email=a@example.com")
    assert answer.code == 404
    assert COOKIE_NAME not in client.cookies


@pytest.mark.gen_test
async def test_cookie_is_secure_in_dev_with_an_https_frontend(client, services):
    # Without --dev it always is: tests/test_access.py
    services.settings = dataclasses.replace(services.settings, frontend_origin="https://app.example")
    answer = await client.dev_login("prod@example.com")
    cookie = next(h for h in answer.headers.get_list("Set-Cookie") if h.startswith(COOKIE_NAME))
    assert "Secure" in cookie


@pytest.mark.gen_test(timeout=120)
async def test_forty_parallel_sign_ins_and_tab_saves_lose_nothing(make_client, services):
    async def one_user(i: int) -> tuple[Client, dict]:
        client = make_client()
        await client.dev_login(f"user{i}@example.com")
        saved = await client.fetch("/auth/tabs", "POST", {"tabs": ["1", f"t{i}"], "active_tab": f"t{i}"})
        assert saved.code == 200
        return client, body_json(await client.fetch("/auth/me"))

    results = await asyncio.gather(*(one_user(i) for i in range(40)))
    starts = [me["port_start"] for _, me in results]
    assert len(set(starts)) == 40, sorted(starts)
    assert all(abs(a - b) >= 10 for i, a in enumerate(sorted(starts)) for b in sorted(starts)[i + 1:])
    assert min(starts) == services.settings.port_base
    for i, (client, _) in enumerate(results):
        assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", f"t{i}"], "active_tab": f"t{i}"}
    users = await services.store.list_users()
    assert len(users) == 40 and all(u.login_count == 1 for u in users)


@pytest.mark.gen_test(timeout=60)
async def test_a_restart_keeps_users_ports_tabs_and_cookies(client, services, settings):
    await client.dev_login("keep@example.com")
    await client.fetch("/auth/tabs", "POST", {"tabs": ["1", "9"], "active_tab": "9"})
    before = body_json(await client.fetch("/auth/me"))
    services.store.close()

    reopened = build_services(settings)
    try:
        services.store = reopened.store  # the app now reads the new store on the same file
        after = body_json(await client.fetch("/auth/me"))
        assert after == before
        assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", "9"], "active_tab": "9"}
        await client.dev_login("keep@example.com")
        assert body_json(await client.fetch("/auth/me")) == before
        user = (await reopened.store.list_users())[0]
        assert user.login_count == 2
    finally:
        reopened.file_executor.shutdown()


@pytest.mark.gen_test
async def test_revocation_survives_a_restart(client, services, settings):
    await client.dev_login("gone@example.com")
    token = client.cookies[COOKIE_NAME]
    await client.fetch("/auth/logout")
    services.store.close()
    reopened = build_services(settings)
    try:
        services.store = reopened.store
        client.cookies[COOKIE_NAME] = token
        assert (await client.fetch("/auth/me")).code == 401
    finally:
        reopened.file_executor.shutdown()
