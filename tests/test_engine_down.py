"""With the Docker engine unreachable the server still serves: health says degraded, and a
terminal connect is accepted and answered with an error frame naming the cause."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from threecompute.containers.backend import BackendError
from threecompute.containers.docker import DockerBackend
from threecompute.settings import Settings

from .conftest import body_json
from .terminal_client import TerminalClient


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "docker", "--host", "127.0.0.1"]


@pytest.fixture
def engine_down(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")


@pytest.mark.gen_test(timeout=60)
async def test_health_is_degraded_and_terminals_get_an_error_frame(engine_down, client):
    health = await client.fetch("/healthz")
    assert health.code == 200
    report = body_json(health)
    assert report["status"] == "degraded" and report["docker"]["ok"] is False, report
    assert report["store"]["ok"] is True

    await client.dev_login("offline@example.com")
    term = await TerminalClient.open(client)
    message = await term.read_error(timeout=30)
    assert "docker" in message.lower() or "engine" in message.lower(), message
    while await term.connection.read_message() is not None:
        pass
    assert term.connection.close_code == 1011
    assert body_json(await client.fetch("/list-files")) == {"files": []}  # the file API does not need Docker


@pytest.mark.skipif(os.geteuid() != 0, reason="firewall chains need root")
def test_purge_with_the_engine_down_still_removes_the_firewall_chains(engine_down, tmp_path):
    backend = DockerBackend(Settings(data_dir=tmp_path / "data"))
    chain = f"3C-IN-{backend.deployment[:10]}"

    async def start_then_purge() -> None:
        await backend.start()
        assert subprocess.run(["iptables", "-S", chain], capture_output=True).returncode == 0
        with pytest.raises(BackendError):
            await backend.purge()

    try:
        asyncio.run(start_then_purge())
    finally:
        backend.close()
    assert subprocess.run(["iptables", "-S", chain], capture_output=True).returncode != 0, "the chain was left"
