"""GET /metrics (prometheus_client): every metric moves when its event happens; the JSON
access log; progress frames while a container starts.

Against a real server on loopback (local backend; the cold/warm attach test again on Docker),
and for what a real server cannot be made to do on cue (a program that stops reading its
input, a client that stops acknowledging output), against the hub with its own registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from threecompute.containers.backend import BackendError
from threecompute.deploy import Deployer
from threecompute.logs import JsonFormatter
from threecompute.metrics import Metrics
from threecompute.pty import PtyInputOverflow
from threecompute.pty.hub import STARTED_MESSAGE, STARTING_MESSAGE, TerminalHub
from threecompute.settings import load_settings

from .conftest import Client
from .terminal_client import TerminalClient
from .test_hub import FakeBackend, Output, user
from .test_webhook import SUCCESS, signed


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Client) -> dict:
    answer = await client.fetch("/metrics")
    assert answer.code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return parse(answer.body.decode())


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "local", "--host", "127.0.0.1"]


@pytest.mark.gen_test
async def test_http_latency_is_labelled_by_route_pattern_and_status(client):
    for name in ("a.txt", "b.txt", "c.txt"):
        assert (await client.fetch(f"/file/{name}")).code == 401
    assert (await client.fetch("/no/such/page")).code == 404
    samples = await scrape(client)
    assert value(samples, "threecompute_http_request_duration_seconds_count",
                 route="/file/(.*)", method="GET", status="401") == 3
    assert value(samples, "threecompute_http_request_duration_seconds_count",
                 route="unmatched", method="GET", status="404") == 1
    assert not any("a.txt" in str(labels) or "/no/such" in str(labels) for _, labels in samples)


@pytest.mark.gen_test
async def test_sign_ins_and_users_are_counted(client):
    before = await scrape(client)
    assert value(before, "threecompute_sign_ins_total", method="dev") == 0
    await client.dev_login("one@example.com")
    await client.dev_login("two@example.com")
    after = await scrape(client)
    assert value(after, "threecompute_sign_ins_total", method="dev") == 2
    assert value(after, "threecompute_users") == 2


@pytest.mark.gen_test(timeout=60)
async def test_terminal_bytes_attach_and_gauges_move(client):
    await client.dev_login("term-metrics@example.com")
    before = await scrape(client)
    term = await TerminalClient.open(client)
    await term.run("echo metric-$((40+2))", "metric-42")
    during = await scrape(client)
    assert value(during, "threecompute_open_terminals") == 1
    assert value(during, "threecompute_terminal_users") == 1
    assert value(during, "threecompute_terminal_input_bytes_total") >= len("echo metric-$((40+2))")
    assert value(during, "threecompute_terminal_output_bytes_total") > value(
        before, "threecompute_terminal_output_bytes_total")
    assert value(during, "threecompute_terminal_attach_seconds_count", start="warm") == 1
    assert value(during, "threecompute_terminal_first_output_seconds_count", start="warm") == 1
    assert value(during, "threecompute_terminals_opened_total") == 1
    term.close()
    deadline = time.monotonic() + 10
    while value(after := await scrape(client), "threecompute_open_terminals") != 0:
        assert time.monotonic() < deadline, after
        await asyncio.sleep(0.1)
    # Counters keep what closed terminals counted.
    assert value(after, "threecompute_terminal_input_bytes_total") == value(
        during, "threecompute_terminal_input_bytes_total")
    assert value(after, "threecompute_terminals_closed_total") == 1


@pytest.mark.gen_test(timeout=60)
async def test_the_deploy_duration_is_observed(client, services):
    services.deployer = Deployer(f"{sys.executable} -c 'import time; time.sleep(0.2)'", services.metrics.deployed)
    payload = json.dumps(SUCCESS).encode()
    assert (await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))).code == 200
    await services.deployer.wait_idle()
    services.deployer = Deployer("/nonexistent/deploy.sh", services.metrics.deployed)
    assert (await client.fetch("/github-webhook", "POST", payload, headers=signed(payload))).code == 200
    await services.deployer.wait_idle()
    samples = await scrape(client)
    assert value(samples, "threecompute_deploy_duration_seconds_count", outcome="ok") == 1
    assert value(samples, "threecompute_deploy_duration_seconds_sum", outcome="ok") >= 0.2
    assert value(samples, "threecompute_deploy_duration_seconds_count", outcome="failed") == 1


# -- the hub with a registry of its own ---------------------------------------------------


def hub_with_metrics() -> tuple[TerminalHub, FakeBackend, Metrics]:
    backend, metrics = FakeBackend(), Metrics()
    hub = TerminalHub(backend, metrics=metrics)
    metrics.watch(hub.metrics, lambda: {})
    return hub, backend, metrics


@pytest.mark.gen_test(timeout=30)
async def test_input_overflow_and_errors_by_kind_are_counted(tmp_path):
    hub, backend, metrics = hub_with_metrics()
    backend.argv = ["sleep", "30"]  # never reads its input
    terminal = await hub.open(user(tmp_path, "alice"), "1", 24, 80, Output().send, lambda: None)
    with pytest.raises(PtyInputOverflow):
        for _ in range(64):
            terminal.write("x" * 65536)
            await asyncio.sleep(0)
    backend.ensure_error = BackendError("engine unreachable")
    with pytest.raises(BackendError):
        await hub.open(user(tmp_path, "bob"), "1", 24, 80, Output().send, lambda: None)
    samples = parse(metrics.text().decode())
    assert value(samples, "threecompute_terminal_input_overflows_total") == 1
    assert value(samples, "threecompute_errors_total", kind="ensure") == 1
    assert value(samples, "threecompute_errors_total", kind="spawn") == 0
    await hub.close_all()


@pytest.mark.gen_test(timeout=30)
async def test_flow_control_pauses_are_counted(tmp_path):
    hub, backend, metrics = hub_with_metrics()
    backend.argv = ["sh", "-c", "yes | head -c 4000000; sleep 30"]
    stalled = asyncio.get_running_loop().create_future()  # a client that never acknowledges
    terminal = await hub.open(user(tmp_path, "alice"), "1", 24, 80, lambda text: stalled, lambda: None)
    deadline = time.monotonic() + 20
    while not terminal.session.paused:
        assert time.monotonic() < deadline, terminal.session.stats
        await asyncio.sleep(0.02)
    samples = parse(metrics.text().decode())
    assert value(samples, "threecompute_terminal_flow_pauses_total") >= 1
    assert value(samples, "threecompute_paused_terminals") == 1
    stalled.set_result(None)
    await hub.close_all()


@pytest.mark.docker
@pytest.mark.parametrize("server_flags", [["--dev", "--backend", "docker", "--host", "127.0.0.1"]])
@pytest.mark.gen_test(timeout=180)
async def test_cold_then_warm_attach_and_container_start_on_docker(make_client):
    client = make_client()
    await client.dev_login("cold-metrics@example.com")
    first = await TerminalClient.open(client, tab="1")
    await first.run("echo cold-$((1+1))", "cold-2")
    second = await TerminalClient.open(client, tab="2")
    await second.run("echo warm-$((2+2))", "warm-4")
    # The first attach started the container: the client heard so before any output.
    assert [m for m, _ in first.progress][-1].startswith("workspace container started"), first.progress
    assert first.progress[-1][1] == 0 and second.progress == []
    samples = await scrape(client)
    assert value(samples, "threecompute_terminal_attach_seconds_count", start="cold") == 1
    assert value(samples, "threecompute_terminal_attach_seconds_count", start="warm") == 1
    assert value(samples, "threecompute_container_start_seconds_count") == 1
    assert value(samples, "threecompute_running_containers") >= 1
    first.close()
    second.close()


# -- structured logs ---------------------------------------------------------------------


@pytest.fixture
def json_access_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tornado.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.gen_test
async def test_json_access_log_lines_carry_the_request_fields(client, json_access_log):
    await client.dev_login("logs@example.com")
    answer = await client.fetch("/auth/me", headers={"X-Request-Id": "req-42"})
    assert answer.code == 200
    assert (await client.fetch("/file/missing.txt", headers={"X-Request-Id": "bad id!"})).code == 404
    lines = [json.loads(line) for line in json_access_log.getvalue().splitlines()]
    me = next(line for line in lines if line.get("path") == "/auth/me")
    assert me["request_id"] == "req-42" and me["route"] == "/auth/me" and me["status"] == 200
    assert me["user_id"] and me["method"] == "GET" and me["duration_ms"] >= 0
    assert me["level"] == "INFO" and me["logger"] == "tornado.access" and "time" in me
    missing = next(line for line in lines if line.get("path") == "/file/missing.txt")
    assert missing["status"] == 404 and missing["route"] == "/file/(.*)"
    assert missing["request_id"] != "bad id!" and len(missing["request_id"]) == 16  # made up, not echoed


def test_log_format_setting():
    assert load_settings(["--dev", "--log-format", "json"], {}, dotenv=Path("/nonexistent")).log_format == "json"
    assert load_settings(["--dev"], {}, dotenv=Path("/nonexistent")).log_format == "text"


@pytest.mark.gen_test
async def test_every_metric_on_the_grafana_dashboard_is_served(client):
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
              for name in re.findall(r"threecompute_[a-z_]+", target["expr"])}
    answer = await client.fetch("/metrics")
    served = {s.name for family in text_string_to_metric_families(answer.body.decode()) for s in family.samples}
    families = {f.name for f in text_string_to_metric_families(answer.body.decode())}
    missing = {n for n in wanted if n not in served and re.sub(r"_(bucket|sum|count)$", "", n) not in families}
    assert len(wanted) >= 15 and not missing, missing


# -- progress while the container starts ---------------------------------------------------


@pytest.fixture
def slow_cold_start(services, monkeypatch):
    """The backend's ensure made slow and reported as a container start (local tmux starts
    no container; the Docker test above sees real ones)."""
    real = services.backend.ensure

    async def slow(user):  # noqa: ANN001, ANN202 - the backend's own signature
        await asyncio.sleep(0.6)
        return dataclasses.replace(await real(user), cold=True)

    monkeypatch.setattr(services.backend, "ensure", slow)


@pytest.mark.gen_test(timeout=60)
async def test_websocket_client_gets_progress_frames_before_output(client, slow_cold_start):
    await client.dev_login("progress@example.com")
    term = await TerminalClient.open(client, tab="3")
    await term.run("echo after-$((1+1))", "after-2")
    assert [m for m, _ in term.progress] == [STARTING_MESSAGE, STARTED_MESSAGE]
    assert all(at == 0 for _, at in term.progress), term.progress  # both before any output
    term.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_quick_attach_sends_no_progress(client):
    await client.dev_login("quick@example.com")
    term = await TerminalClient.open(client, tab="4")
    await term.run("echo quick-$((2+3))", "quick-5")
    assert term.progress == []
    term.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_failed_start_after_progress_is_a_clear_error(client, services, monkeypatch):
    async def failing(user):  # noqa: ANN001, ANN202
        await asyncio.sleep(0.6)
        raise BackendError("container limit reached (3 running); try again later")

    monkeypatch.setattr(services.backend, "ensure", failing)
    await client.dev_login("fails@example.com")
    term = await TerminalClient.open(client, tab="5")
    assert "container limit reached" in await term.read_error()
    assert [m for m, _ in term.progress] == [STARTING_MESSAGE]
    term.close()
