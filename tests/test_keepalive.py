"""Terminal sockets are pinged by one shared timer: a client that never answers is closed,
one that answers stays (real sockets on loopback, the local backend)."""

from __future__ import annotations

import asyncio
import time

import pytest
import websocket

from threecompute.keepalive import Keepalive

from .terminal_client import TerminalClient


def silent_socket(client, tab: str) -> websocket.WebSocket:
    """A client that never reads, so it never answers a ping."""
    url = client.base_url.replace("http", "ws", 1) + f"/terminal/ws?tabId={tab}"
    return websocket.create_connection(url, cookie=client.cookie_header(), timeout=15)


def open_tabs(services) -> set[str]:
    return {getattr(socket, "tab_id", None) for socket in services.open_sockets}


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_never_answers_pings_is_closed_and_one_that_answers_stays(client, services):
    # An interval long enough that a loaded machine's pause never makes a pong late.
    services.keepalive = Keepalive(interval_seconds=1.0)
    await client.dev_login("keepalive@example.com")
    silent = await asyncio.to_thread(silent_socket, client, "1")
    answering = await TerminalClient.open(client, tab="2")
    await answering.run("echo up-$((1+1))", "up-2")
    deadline = time.monotonic() + 20  # two intervals, then Tornado's 5 s closing handshake
    while "1" in open_tabs(services):
        assert time.monotonic() < deadline, "the silent client was never closed"
        await asyncio.sleep(0.1)
    await asyncio.sleep(3.0)  # three more pings, each answered
    assert "2" in open_tabs(services)
    await answering.run("echo still-$((2+3))", "still-5")
    answering.close()
    silent.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_timer_runs_only_while_a_socket_is_open(client, services):
    await client.dev_login("keepalive2@example.com")
    assert not services.keepalive.running
    term = await TerminalClient.open(client, tab="3")
    await term.run("echo on-$((1+2))", "on-3")
    assert services.keepalive.running
    term.close()
    deadline = time.monotonic() + 10
    while services.keepalive.sockets:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not services.keepalive.running
