"""The echo benchmark: its turn order between the clients it compares, and the Python floor
it measures beside our server."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import websocket

from bench.common import AttachSpec, FloorTerminal, running_spec_server
from bench.echo import turn_order
from bench.floor_server import next_frame

KINDS = ["3compute", "ttyd", "terminado", "raw"]


def test_each_round_gives_every_client_one_keystroke():
    for keystroke in range(12):
        assert sorted(turn_order(KINDS, keystroke)) == sorted(KINDS)


def test_every_client_goes_first_in_turn():
    assert [turn_order(KINDS, keystroke)[0] for keystroke in range(8)] == KINDS * 2


# -- the Python floor (bench/floor_server.py), a real relay of a real PTY -------------------

def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame: masked, as RFC 6455 requires of clients (websocket-client's encoder)."""
    return websocket.ABNF.create_frame(payload, opcode).format()


@pytest.mark.parametrize("size", [0, 5, 125, 126, 200, 70_000])
def test_the_floor_takes_whole_frames_only(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = masked(0x1, payload) + masked(0x8, b"\x03\xe8")
    buffer = bytearray(wire[:-7])  # the close frame cut short
    assert next_frame(buffer) == (0x1, payload)
    assert next_frame(buffer) is None
    buffer += wire[-7:]
    assert next_frame(buffer) == (0x8, b"\x03\xe8")
    assert buffer == bytearray()


@pytest.mark.gen_test(timeout=60)
async def test_the_floor_relays_a_terminal_in_our_frames(tmp_path):
    spec = AttachSpec(argv=["/bin/sh"], env={"PATH": os.environ["PATH"], "PS1": "$ ", "TERM": "xterm"},
                      cwd=str(tmp_path))
    with running_spec_server("bench.floor_server", FloorTerminal, tmp_path) as floor:
        term = await floor.open("f1", spec)
        await term.resize(30, 100)
        term.mark()
        await term.send("echo floor-$((20+22)); stty size\r")
        await term.wait_for(lambda out: "floor-42" in out and "30 100" in out, 10)
        await term.send("exit\r")
        deadline = time.monotonic() + 10
        while not term.closed:
            assert time.monotonic() < deadline, "the floor kept the socket open after its program ended"
            await asyncio.sleep(0.05)
