"""POST /github-webhook: every branch of the contract, with a real deploy command."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path

import pytest

from threecompute.deploy import Deployer
from threecompute.handlers.webhook import DELIVERY_MEMORY_SECONDS
from threecompute.store import open_store

from .conftest import body_json


@pytest.fixture
def database_url(any_database_url) -> str:
    """Every test here runs against SQLite and against PostgreSQL."""
    return any_database_url


SECRET = "hook-secret"
SUCCESS = {"action": "completed", "workflow_run": {"conclusion": "success", "head_branch": "main"}}


def signed(payload: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


@pytest.fixture
def runs_log(tmp_path: Path, services) -> Path:
    """Point the deployer at a command that appends a line per run and takes 0.3 s."""
    log = tmp_path / "runs.log"
    script = f"import time; open({str(log)!r}, 'a').write('run\\n'); time.sleep(0.3)"
    services.deployer = Deployer(f"{sys.executable} -c {json.dumps(script)}")
    return log


def runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.gen_test
async def test_a_signed_success_on_main_runs_the_deploy(client, services, runs_log):
    payload = json.dumps(SUCCESS).encode()
    answer = await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))
    assert answer.code == 200, answer.body
    await services.deployer.wait_idle()
    assert runs(runs_log) == 1


@pytest.mark.gen_test
async def test_requests_during_a_run_queue_exactly_one_more(client, services, runs_log):
    payload = json.dumps(SUCCESS).encode()
    codes = [(await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))).code
             for _ in range(4)]
    assert codes == [200, 202, 202, 202]
    await services.deployer.wait_idle()
    assert runs(runs_log) == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("event, reason", [
    ({"action": "requested", "workflow_run": {"conclusion": "success", "head_branch": "main"}}, "action"),
    ({"action": "completed", "workflow_run": {"conclusion": "failure", "head_branch": "main"}}, "conclusion"),
    ({"action": "completed", "workflow_run": {"conclusion": "success", "head_branch": "dev"}}, "head_branch"),
    ({"action": "completed", "conclusion": "success", "head_branch": "feature"}, "head_branch"),
])
async def test_other_events_are_204_with_a_reason(client, services, runs_log, event, reason):
    payload = json.dumps(event).encode()
    answer = await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))
    assert answer.code == 204
    assert reason in answer.headers["X-Reason"]
    await asyncio.sleep(0.1)
    assert runs(runs_log) == 0


@pytest.mark.gen_test
async def test_bad_signatures_run_nothing(client, services, runs_log):
    payload = json.dumps(SUCCESS).encode()
    cases = [
        ({}, 400),
        ({"X-Hub-Signature-256": "sha1=" + "0" * 40}, 400),
        ({"X-Hub-Signature-256": "sha256=" + "0" * 63}, 400),
        ({"X-Hub-Signature-256": "sha256=" + "z" * 64}, 400),
        (signed(payload, "wrong-secret"), 403),
        (signed(payload + b" "), 403),
    ]
    for headers, status in cases:
        answer = await client.fetch("/github-webhook", "POST", payload, headers=headers)
        assert answer.code == status, (headers, answer.body)
        assert body_json(answer)["error"]
    not_json = b"action=completed"
    assert (await client.fetch("/github-webhook", "POST", not_json, headers=signed(not_json))).code == 400
    await asyncio.sleep(0.1)
    assert runs(runs_log) == 0


@pytest.mark.gen_test
async def test_no_secret_configured_is_503(client, services, runs_log):
    services.settings = dataclasses.replace(services.settings, github_webhook_secret="")
    payload = json.dumps(SUCCESS).encode()
    answer = await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))
    assert answer.code == 503
    assert runs(runs_log) == 0


@pytest.mark.gen_test
async def test_a_missing_deploy_command_is_logged_not_fatal(client, services):
    services.deployer = Deployer("/nonexistent/deploy.sh")
    payload = json.dumps(SUCCESS).encode()
    assert (await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))).code == 200
    await services.deployer.wait_idle()
    assert services.deployer.last_exit_code == -1
    assert (await client.fetch("/healthz")).code == 200


def delivered(payload: bytes, delivery: str) -> dict[str, str]:
    return signed(payload) | {"X-GitHub-Delivery": delivery}


@pytest.mark.gen_test
async def test_a_replayed_delivery_runs_nothing(client, services, runs_log):
    payload = json.dumps(SUCCESS).encode()
    first = await client.fetch("/github-webhook", "POST", payload, headers=delivered(payload, "72d3162e-cc78-11e3"))
    assert first.code == 200
    await services.deployer.wait_idle()
    for _ in range(3):
        replay = await client.fetch("/github-webhook", "POST", payload,
                                    headers=delivered(payload, "72d3162e-cc78-11e3"))
        assert replay.code == 200 and replay.headers["X-Reason"] == "duplicate delivery"
        assert body_json(replay) == {"status": "duplicate"}
    await services.deployer.wait_idle()
    assert runs(runs_log) == 1
    other = await client.fetch("/github-webhook", "POST", payload, headers=delivered(payload, "8f1c0a4e-0001"))
    assert other.code == 200
    await services.deployer.wait_idle()
    assert runs(runs_log) == 2


@pytest.mark.gen_test
async def test_delivery_ids_survive_a_restart_and_expire_after_a_day(client, services, runs_log, monkeypatch):
    payload = json.dumps(SUCCESS).encode()
    assert (await client.fetch("/github-webhook", "POST", payload, headers=delivered(payload, "abc-1"))).code == 200
    await services.deployer.wait_idle()
    reopened = open_store(services.settings)  # what the next start opens
    try:
        assert not await reopened.first_delivery("abc-1", DELIVERY_MEMORY_SECONDS)
        later = time.time() + DELIVERY_MEMORY_SECONDS + 60
        monkeypatch.setattr(time, "time", lambda: later)
        assert await reopened.first_delivery("abc-1", DELIVERY_MEMORY_SECONDS)
    finally:
        reopened.close()


@pytest.mark.gen_test
async def test_a_malformed_delivery_id_is_400_and_an_unsigned_one_is_not_stored(client, services, runs_log):
    payload = json.dumps(SUCCESS).encode()
    bad = await client.fetch("/github-webhook", "POST", payload, headers=delivered(payload, "x" * 101))
    assert bad.code == 400 and "X-GitHub-Delivery" in body_json(bad)["error"]
    unsigned = {"X-Hub-Signature-256": "sha256=" + "0" * 64, "X-GitHub-Delivery": "stolen-id"}
    assert (await client.fetch("/github-webhook", "POST", payload, headers=unsigned)).code == 403
    assert (await client.fetch("/github-webhook", "POST", payload, headers=delivered(payload, "stolen-id"))).code == 200
    await services.deployer.wait_idle()
    assert runs(runs_log) == 1
