"""What a connection used is freed when it ends, not by a later collection of reference
cycles: a class reconnecting at once (its engine back, say) would otherwise pile thousands
of dead connections, with their buffers, into memory the allocator keeps afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest

from threecompute.containers.backend import BackendError

from .conftest import Client
from .terminal_client import TerminalClient
from .test_files import upload

# The test's own clients are Tornado's too: of Tornado's classes, only server-side ones.
SERVER_SIDE = ("threecompute.", "tornado.http1connection.HTTP1ServerConnection", "tornado.web.")


@contextlib.contextmanager
def cycles_left() -> Iterator[list[str]]:
    """The collector off inside; after, the list names the server's objects that only a
    collection would have freed."""
    gc.collect()
    gc.disable()
    names: list[str] = []
    try:
        yield names
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        names += sorted({name for o in gc.garbage
                         if (name := f"{type(o).__module__}.{type(o).__qualname__}").startswith(SERVER_SIDE)})
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


async def all_closed(services) -> None:
    for _ in range(200):
        if not services.hub.terminals() and not services.open_sockets:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the closes' last callbacks


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "local", "--host", "127.0.0.1"]


@pytest.mark.gen_test(timeout=90)
async def test_a_terminal_connection_that_worked_leaves_no_cycle(client: Client, services) -> None:
    await client.dev_login("cycles@example.com")
    warm = await TerminalClient.open(client, tab="1")  # the user's box and the caches exist first
    await warm.run("echo warm-$((1+1))", "warm-2")
    warm.close()
    await all_closed(services)
    with cycles_left() as left:
        term = await TerminalClient.open(client, tab="2")
        await term.run("echo up-$((2+2))", "up-4")
        await term.send({"type": "pty-input", "input": "x" * 10})
        term.close()
        await all_closed(services)
    assert left == []


@pytest.mark.gen_test(timeout=90)
async def test_a_terminal_whose_open_failed_leaves_no_cycle(client: Client, services, monkeypatch) -> None:
    async def engine_gone(user):
        raise BackendError("Docker engine unreachable at unix:///nowhere.sock: no such file")

    await client.dev_login("failed@example.com")
    monkeypatch.setattr(services.backend, "ensure", engine_gone)
    with cycles_left() as left:
        for tab in ("1", "2", "3"):
            term = await TerminalClient.open(client, tab=tab)
            assert "unreachable" in await term.read_error()
            term.close()
        await all_closed(services)
    assert left == []


@pytest.mark.gen_test(timeout=90)
async def test_a_client_that_left_while_its_terminal_was_opening_leaves_no_cycle(client: Client, services,
                                                                                  monkeypatch) -> None:
    async def slow_engine(user):
        await asyncio.sleep(30)

    await client.dev_login("leaver@example.com")
    monkeypatch.setattr(services.backend, "ensure", slow_engine)
    with cycles_left() as left:
        for tab in ("1", "2"):
            term = await TerminalClient.open(client, tab=tab)
            await asyncio.sleep(0.2)
            term.close()
        await all_closed(services)
    assert left == []


@pytest.mark.gen_test(timeout=90)
async def test_an_upload_leaves_no_cycle(client: Client, services) -> None:
    await client.dev_login("uploads@example.com")
    assert (await upload(client, "/upload", [("warm.txt", b"w")])).code == 200
    with cycles_left() as left:
        assert (await upload(client, "/upload", [("a.txt", b"A" * 5000), ("b.txt", b"B")])).code == 200
        assert (await upload(client, "/upload", [])).code == 400  # refused: parsed, then aborted
        await asyncio.sleep(0.2)
    assert left == []
