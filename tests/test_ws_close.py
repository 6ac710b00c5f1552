"""Refused WebSocket messages get their close frame, every time (websocket-client, loopback).

A message over 1 MiB closes with 1009 and invalid UTF-8 in a text frame with 1007, on the
terminal socket and on Socket.IO's; the close frame must arrive, not a connection reset.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import pytest
import websocket

from .conftest import Client, body_json
from .terminal_client import TerminalClient

REPEAT = 12
MIB = 1024 * 1024
TERMINAL, SOCKETIO = "/terminal/ws?tabId=1", "/socket.io/?EIO=4&transport=websocket&tabId=1"
INVALID_UTF8 = b'{"type": "pty-input", "data": {"input": "\xff\xfe"}}'


def close_code(url: str, cookie: str, *frames: tuple[bytes | str, int] | websocket.ABNF) -> str:
    """Send the messages (or raw frames), then read until the server's close frame: its code,
    or what went wrong. A close that follows an error frame names that frame and the output
    before it (a terminal that ended by itself says why)."""
    ws = websocket.create_connection(url, cookie=cookie, timeout=15)
    received: list[str] = []
    try:
        for frame in frames:
            if isinstance(frame, websocket.ABNF):
                ws.send_frame(frame)
            else:
                ws.send(frame[0], opcode=frame[1])
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = str(int.from_bytes(data[:2], "big"))
                return f"{code} after {received[-3:]}" if any('"error"' in text for text in received) else code
            received.append(data.decode(errors="replace")[-300:])
    except Exception as exc:  # a reset is the failure this file is about
        return f"{type(exc).__name__}: {exc}"
    finally:
        ws.close()


async def repeat(client: Client, path: str, *frames: tuple[bytes | str, int]) -> collections.Counter:
    url = client.base_url.replace("http", "ws", 1) + path
    codes = collections.Counter()
    for _ in range(REPEAT):
        codes[await asyncio.to_thread(close_code, url, client.cookie_header(), *frames)] += 1
    return codes


async def all_closed(services, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while services.hub.terminals() or services.open_sockets:
        assert time.monotonic() < deadline, "terminals left open after their sockets closed"
        await asyncio.sleep(0.05)


TEXT, BINARY = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY


@pytest.mark.gen_test(timeout=180)
@pytest.mark.parametrize("path", [TERMINAL, SOCKETIO], ids=["terminal", "socketio"])
@pytest.mark.parametrize("size", [2 * MIB, MIB + 1], ids=["2MiB", "1MiB+1"])
async def test_an_oversized_message_gets_1009(client, services, path, size):
    await client.dev_login("big@example.com")
    assert await repeat(client, path, ("x" * size, TEXT)) == {"1009": REPEAT}
    assert await repeat(client, path, (b"\0" * size, BINARY)) == {"1009": REPEAT}
    await all_closed(services)
    assert (await client.fetch("/healthz")).code == 200


@pytest.mark.gen_test(timeout=180)
async def test_a_message_fragmented_past_the_limit_gets_1009(client, services):
    await client.dev_login("fragments@example.com")
    piece = "z" * (MIB // 2)
    fragments = [websocket.ABNF.create_frame(piece, TEXT, fin=0),
                 *(websocket.ABNF.create_frame(piece, websocket.ABNF.OPCODE_CONT, fin=0) for _ in range(3)),
                 websocket.ABNF.create_frame(piece, websocket.ABNF.OPCODE_CONT, fin=1)]
    assert await repeat(client, TERMINAL, *fragments) == {"1009": REPEAT}
    await all_closed(services)


@pytest.mark.gen_test(timeout=180)
@pytest.mark.parametrize("path", [TERMINAL, SOCKETIO], ids=["terminal", "socketio"])
async def test_invalid_utf8_in_a_text_frame_gets_1007(client, services, path):
    await client.dev_login("utf8@example.com")
    payload = INVALID_UTF8 if path == TERMINAL else b"4\xff\xfe"
    assert await repeat(client, path, (payload, TEXT)) == {"1007": REPEAT}
    await all_closed(services)


@pytest.mark.gen_test(timeout=120)
async def test_nothing_after_the_refused_frame_reaches_the_terminal(client, services):
    await client.dev_login("after@example.com")
    typed = json.dumps({"type": "pty-input", "data": {"input": "touch typed-after-close\r"}})
    assert await repeat(client, TERMINAL, (INVALID_UTF8, TEXT), (typed, TEXT)) == {"1007": REPEAT}
    await all_closed(services)
    term = await TerminalClient.open(client)  # the tab still works, and nothing ran in it
    await term.run("ls; echo listed-$((3*3))", "listed-9")
    term.close()
    assert "typed-after-close" not in body_json(await client.fetch("/list-files"))["files"]


@pytest.mark.gen_test(timeout=120)
async def test_valid_frames_up_to_the_limit_still_work(client):
    await client.dev_login("fine@example.com")
    term = await TerminalClient.open(client)
    await term.run("echo ünïcode-$((2*21))", "ünïcode-42")
    resize = json.dumps({"type": "resize", "data": {"rows": 38, "cols": 102}})
    await term.send(resize + " " * (MIB - len(resize)))  # exactly 1 MiB: JSON may end in spaces
    await asyncio.sleep(0.5)
    await term.run("stty size", "38 102")
    term.close()
