"""Port ranges end at 65535: the last users fit, the next one is refused clearly."""

from __future__ import annotations

import pytest

from threecompute.identity import COOKIE_NAME

from .conftest import FRONTEND, body_json
from .conftest import test_environ as environ_for
from .test_auth import sign_in


@pytest.fixture
def database_url(any_database_url) -> str:
    """Every test here runs against SQLite and against PostgreSQL."""
    return any_database_url


TOP_BASE = 65516  # room for exactly two users: 65516-65525 and 65526-65535


@pytest.fixture
def server_env(data_dir, provider, http_port, database_url) -> dict[str, str]:
    extra = {"DATABASE_URL": database_url} if database_url else {}
    return environ_for(data_dir, provider, http_port, PORT_BASE=str(TOP_BASE), **extra)


@pytest.mark.gen_test
async def test_the_last_ranges_fit_and_the_next_user_is_refused(make_client, services):
    ends = []
    for email in ("one@example.com", "two@example.com"):
        client = make_client()
        await client.dev_login(email)
        me = body_json(await client.fetch("/auth/me"))
        ends.append(me["port_end"])
    assert ends == [65525, 65535]

    third = make_client()
    refused = await third.fetch("/auth/dev-login?email=three@example.com")
    assert refused.code == 503, refused.body
    assert "no free range of 10 ports" in body_json(refused)["error"]
    assert COOKIE_NAME not in third.cookies
    assert await services.store.count_users() == 2

    again = make_client()  # users who have a range still sign in
    await again.dev_login("two@example.com")
    assert body_json(await again.fetch("/auth/me"))["port_end"] == 65535


@pytest.mark.gen_test
async def test_an_oauth_sign_in_past_the_range_goes_back_to_the_login_page(make_client, provider, services):
    for number in range(2):
        provider.profile = {"sub": f"50{number}", "email": f"u{number}@example.com", "email_verified": True}
        assert (await sign_in(make_client(), provider)).code == 302
    provider.profile = {"sub": "599", "email": "late@example.com", "email_verified": True}
    late = make_client()
    callback = await sign_in(late, provider)
    assert callback.code == 302
    assert callback.headers["Location"] == f"{FRONTEND}/login?error=no_ports_left"
    assert COOKIE_NAME not in late.cookies
    assert await services.store.get_user("599") is None
