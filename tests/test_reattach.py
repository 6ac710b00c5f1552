"""A re-attached tab shows its current screen at once: 50 re-attaches per transport and
backend, each read with a terminal emulator (pyte) for at most 1 s after its first output,
without typing; and each backend's redraw sends the whole screen again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pyte
import pytest

from threecompute.handlers.auth import dev_user_id

from .conftest import NO_RATE_LIMITS
from .terminal_client import TerminalClient
from .test_socketio import Term

EMAIL = "reattach@example.com"
ROWS, COLS = 30, 110  # what a browser tab's xterm.js fits to; the PTY starts at 24x80
REATTACHES = 50
# When the first resize comes after the connect: spread over the start of `docker exec` and
# tmux, where a size change can be missed.
RESIZE_DELAYS = [0.0, 0.005, 0.01, 0.02, 0.035, 0.05, 0.08, 0.12, 0.18, 0.25]
MARKER = "earlier-output-42"


class Screen:
    """What xterm.js would show for the output seen so far."""

    def __init__(self) -> None:
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.Stream(self.screen)

    def feed(self, text: str) -> None:
        self.stream.feed(text)

    def shows_marker_and_prompt(self) -> bool:
        lines = self.screen.display
        prompt = lines[self.screen.cursor.y][: self.screen.cursor.x]
        return any(MARKER in line for line in lines) and prompt.strip().endswith(("$", "#"))

    def dump(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display if line.strip())


class WebSocketTab:
    """A tab over /terminal/ws, resized `resize_after` seconds after connecting."""

    def __init__(self, client) -> None:
        self.client = client
        self.ws: TerminalClient | None = None
        self.seen = 0

    async def open(self, resize_after: float = 0.0) -> None:
        self.ws = await TerminalClient.open(self.client, tab="1")
        await asyncio.sleep(resize_after)
        await self.ws.resize(ROWS, COLS)

    async def type(self, text: str) -> None:
        await self.ws.type(text)

    async def output(self, wait: float) -> str:
        with contextlib.suppress(TimeoutError):
            await self.ws.read_frame(wait)
        return self.ws.screen

    async def close(self) -> None:
        self.ws.close()


class SocketIOTab:
    """A tab over Socket.IO (`query: {tabId}`), resized `resize_after` seconds after connecting."""

    def __init__(self, client) -> None:
        self.url = client.base_url + "/"
        self.cookie = client.cookie_header()
        self.term: Term | None = None

    async def open(self, resize_after: float = 0.0) -> None:
        self.term = Term(self.url, self.cookie, tab="1")
        await self.term.connect()
        await asyncio.sleep(resize_after)
        self.term.sio.emit("resize", {"cols": COLS, "rows": ROWS})

    async def type(self, text: str) -> None:
        self.term.type(text)

    async def output(self, wait: float) -> str:
        await asyncio.sleep(min(wait, 0.02))
        with self.term.lock:
            return self.term.output

    async def close(self) -> None:
        await self.term.close()


TRANSPORTS: dict[str, Callable] = {"websocket": WebSocketTab, "socketio": SocketIOTab}



@pytest.fixture
def limits_env() -> dict[str, str]:
    """This module floods the server on purpose; the rate limits have tests of their own."""
    return NO_RATE_LIMITS

@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def server_flags(request) -> list[str]:
    return ["--dev", "--backend", request.param, "--host", "127.0.0.1"]


async def screen_within(tab, seconds: float, since: float | None = None) -> tuple[bool, Screen]:
    """Whether the screen shows the earlier output and a prompt within `seconds` of `since`."""
    deadline = (since or time.monotonic()) + seconds
    while True:
        screen = Screen()
        screen.feed(await tab.output(max(0.0, min(0.05, deadline - time.monotonic()))))
        if screen.shows_marker_and_prompt():
            return True, screen
        if time.monotonic() >= deadline:
            return False, screen


async def first_output(tab, seconds: float) -> float:
    """When the tab's first output arrived (polled), or the deadline if none did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await tab.output(max(0.0, min(0.05, deadline - time.monotonic()))):
            break
    return time.monotonic()


async def until_closed(services, user_id: str) -> None:
    deadline = time.monotonic() + 10
    while services.hub.terminals_of(user_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=600)
@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_a_reattached_tab_shows_its_screen_at_once(client, services, server_flags, transport):
    await client.dev_login(EMAIL)
    first = TRANSPORTS[transport](client)
    await first.open()
    await first.type("clear; echo earlier-output-$((6*7))\r")
    visible, screen = await screen_within(first, 30)  # the first attach also makes the container
    assert visible, screen.dump()
    await first.close()

    blank, waits = [], []
    for attempt in range(REATTACHES):
        await until_closed(services, dev_user_id(EMAIL))  # a reload: the old page's socket is gone
        tab = TRANSPORTS[transport](client)
        delay = RESIZE_DELAYS[attempt % len(RESIZE_DELAYS)]
        opened = time.monotonic()
        await tab.open(resize_after=delay)
        try:
            # From the first output: how soon `docker exec` starts is the machine's load; what
            # must never happen is output that leaves the screen blank until the user types.
            visible, screen = await screen_within(tab, 1.0, since=await first_output(tab, 10.0))
            waits.append(time.monotonic() - opened)
            if not visible:
                blank.append((attempt, delay, screen.dump()[-300:]))
        finally:
            await tab.close()
    waits.sort()
    print(f"{transport}: screen shown after p50 {waits[len(waits) // 2]:.3f} s, max {waits[-1]:.3f} s")
    assert not blank, f"{len(blank)} of {REATTACHES} re-attaches blank 1 s after their first output: {blank[:3]}"



@pytest.mark.gen_test(timeout=120)
async def test_the_backends_redraw_sends_the_whole_screen_again(client, services, server_flags):
    await client.dev_login(EMAIL)
    ws = await TerminalClient.open(client, tab="1")  # no resize: the hub asks for no redraw itself
    try:
        await ws.run("echo earlier-output-$((6*7))", MARKER, timeout=60)
        await asyncio.sleep(0.3)  # the prompt after it
        [terminal] = services.hub.terminals_of(dev_user_id(EMAIL))
        await services.backend.redraw(terminal.box, terminal.client_id, terminal.session.pid)
        await ws.read_until(MARKER, timeout=5)  # nothing was typed: only a redraw shows it again
    finally:
        ws.close()
