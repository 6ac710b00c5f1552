"""/healthz and /metrics."""

from __future__ import annotations

import pytest

from threecompute.store import StoreError

from .conftest import body_json


@pytest.fixture
def database_url(any_database_url) -> str:
    """Every test here runs against SQLite and against PostgreSQL."""
    return any_database_url

@pytest.mark.gen_test
async def test_healthz_reports_store_and_backend(client):
    answer = await client.fetch("/healthz")
    assert answer.code == 200
    health = body_json(answer)
    assert health["status"] == "ok"
    assert health["store"]["ok"] is True and health["docker"]["ok"] is True


@pytest.mark.gen_test
async def test_healthz_is_503_when_the_store_fails(client, services, monkeypatch):
    async def broken() -> int:
        raise StoreError("disk on fire")

    monkeypatch.setattr(services.store, "count_users", broken)
    answer = await client.fetch("/healthz")
    assert answer.code == 503
    assert body_json(answer)["status"] == "down"


@pytest.mark.gen_test
async def test_metrics_are_prometheus_text(client):
    await client.dev_login("metrics@example.com")
    answer = await client.fetch("/metrics")
    assert answer.code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "threecompute_users 1.0\n" in answer.body.decode()


@pytest.mark.gen_test
async def test_unknown_paths_are_json_404(client):
    answer = await client.fetch("/no/such/thing")
    assert answer.code == 404
    assert body_json(answer) == {"error": "not found"}
