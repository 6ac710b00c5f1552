"""CORS preflights: answered before any route's own checks, on every route of the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tornado.web

from threecompute.handlers.auth import dev_user_id

from .conftest import FRONTEND

EMAIL = "ann@example.com"

ALLOW = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Allow-Methods",
         "Access-Control-Allow-Headers")


@pytest.fixture
def workspace(data_dir: Path) -> Path:
    return data_dir / "workspaces" / dev_user_id(EMAIL)


def route_paths(app: tornado.web.Application) -> list[str]:
    """One concrete path for every rule in the table, plus one that no rule matches."""
    paths = []
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        path = re.sub(r"\(\.\*\)", "dir/x.py", pattern).replace("\\.", ".").replace("/?", "/")
        path = path.replace("([^/]+)", "x.js")
        assert re.fullmatch(pattern, path), (pattern, path)
        paths.append(path)
    return [*paths, "/no/such/route"]


def preflight_headers(origin: str, method: str = "PUT") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type"}


def test_the_table_is_covered(app):
    paths = route_paths(app)
    for expected in ("/file/dir/x.py", "/upload", "/terminal/ws", "/socket.io/", "/auth/me", "/list-files"):
        assert expected in paths


@pytest.mark.gen_test
async def test_preflight_from_the_frontend_allows_on_every_route_without_a_cookie(client, app):
    for path in route_paths(app):
        answer = await client.fetch(path, "OPTIONS", headers=preflight_headers(FRONTEND))
        assert answer.code == 204, (path, answer.code, answer.body)
        assert answer.headers["Access-Control-Allow-Origin"] == FRONTEND, path
        assert answer.headers["Access-Control-Allow-Credentials"] == "true", path
        assert {"GET", "POST", "PUT", "DELETE"} <= set(answer.headers["Access-Control-Allow-Methods"].split(", "))
        assert "content-type" in answer.headers["Access-Control-Allow-Headers"].lower().split(", "), path
        assert "Origin" in answer.headers["Vary"]
        assert answer.body == b"" and "Set-Cookie" not in answer.headers, path


@pytest.mark.gen_test
async def test_preflight_from_a_foreign_origin_allows_nothing(client, app):
    await client.dev_login(EMAIL)  # a cookie changes nothing either
    for origin in ("https://evil.example", "null", FRONTEND + ".evil.example"):
        for path in route_paths(app):
            answer = await client.fetch(path, "OPTIONS", headers=preflight_headers(origin, "DELETE"))
            assert answer.code == 204, (path, answer.code)
            assert not [h for h in ALLOW if h in answer.headers], (origin, path, dict(answer.headers))


@pytest.mark.gen_test
async def test_only_safe_requested_headers_are_allowed(client):
    answer = await client.fetch("/file/a.py", "OPTIONS", headers={
        **preflight_headers(FRONTEND), "Access-Control-Request-Headers": "Content-Type, X-Requested-With, X-Evil"})
    allowed = answer.headers["Access-Control-Allow-Headers"].split(", ")
    assert allowed == ["content-type", "x-requested-with"]


@pytest.mark.gen_test
async def test_a_preflight_changes_nothing(client, workspace):
    await client.dev_login(EMAIL)
    await client.fetch("/file/a.txt", "OPTIONS", b"", headers=preflight_headers(FRONTEND),
                       allow_nonstandard_methods=True)
    assert not (workspace / "a.txt").exists()
    put = await client.fetch("/file/a.txt", "PUT", "saved", headers={
        "Origin": FRONTEND, "Content-Type": "text/plain; charset=utf-8"})
    assert put.code == 200 and put.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert (workspace / "a.txt").read_text() == "saved"
