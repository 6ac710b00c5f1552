"""Freed memory goes back to the system: a heap left full of holes (what a class leaving
leaves behind) shrinks in resident size when trimmed, threads share one heap, and a large
buffer is mapped apart from the heap (each in a child process, so the test's own heap plays
no part); the interpreter's caches are emptied, and housekeeping's full collection runs only
while no terminal is open, on a fake hub and on the test server with a real one."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

import server
from threecompute import memory

from .terminal_client import TerminalClient
from .test_terminal import wait_for

CHILD = r"""
import json, threading
from threecompute import memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

kept = []
def fill():
    blocks = [bytes(4096) + bytes([i % 256]) for i in range(20000)]  # ~80 MB in one thread's arena
    kept.extend(blocks[::16])  # a few live blocks everywhere: nothing at the top to give back
memory.tune_malloc()
worker = threading.Thread(target=fill)
worker.start()
worker.join()
before = rss()
trimmed = memory.trim()
print(json.dumps({"before": before, "after": rss(), "trimmed": trimmed}))
"""


@pytest.mark.skipif(memory._libc() is None, reason="needs glibc malloc_trim")
def test_a_heap_full_of_holes_is_given_back():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    figures = json.loads(done.stdout)
    assert figures["trimmed"] is True
    assert figures["before"] - figures["after"] > 40 * 1024 * 1024, figures


MAPPED_APART = r"""
import ctypes, json, sys
from threecompute import memory

libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
if sys.argv[1] == "tuned":
    memory.tune_malloc()
freed = bytes(4 * 2**20)
del freed  # a mapped block freed: glibc's own threshold rises to its size
top = libc.sbrk(0)
held = bytes(2**20)
print(json.dumps({"heap_growth": libc.sbrk(0) - top}))
"""


@pytest.mark.skipif(memory._libc() is None, reason="needs glibc mallopt")
@pytest.mark.parametrize("how, grows", [("as glibc starts", True), ("tuned", False)])
def test_a_large_buffer_stays_out_of_the_heap_after_a_larger_one_was_freed(how, grows):
    done = subprocess.run([sys.executable, "-c", MAPPED_APART, how], capture_output=True, text=True,
                          timeout=60, check=True)
    growth = json.loads(done.stdout)["heap_growth"]
    assert (growth >= 2**20) is grows, f"{how}: the heap grew {growth} bytes for a 1 MiB buffer"


ARENAS_USED = r"""
import ctypes, sys, threading
from threecompute import memory

if sys.argv[1] == "tuned":
    memory.tune_malloc()
kept = []
def work():
    kept.append([bytes(200) + bytes([i % 256]) for i in range(2000)])
threads = [threading.Thread(target=work) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()  # a section per arena, on stderr
"""


@pytest.mark.skipif(memory._libc() is None, reason="needs glibc mallopt")
@pytest.mark.parametrize("how, many", [("as glibc starts", True), ("tuned", False)])
def test_threads_share_one_heap(how, many):
    done = subprocess.run([sys.executable, "-c", ARENAS_USED, how], capture_output=True, text=True,
                          timeout=60, check=True)
    arenas = done.stderr.count("Arena ")
    assert (arenas > 1) is many, f"{how}: {arenas} malloc arena(s) for 6 threads"


@pytest.mark.skipif(not hasattr(sys, "_clear_type_cache"), reason="CPython's attribute lookup cache")
def test_names_looked_up_at_run_time_are_let_go():
    class Handler:
        def get(self) -> None: ...

    name = "GET".lower()  # a new string, as a request's method name is
    held = sys.getrefcount(name)
    getattr(Handler(), name)
    assert sys.getrefcount(name) == held + 1  # the lookup cache keeps the last name of its slot
    memory.clear_lookup_cache()
    assert sys.getrefcount(name) == held


class _Hub:
    def __init__(self, terminals: list[object]) -> None:
        self.open = terminals

    def terminals(self) -> list[object]:
        return self.open


class _Services:
    def __init__(self, terminals: list[object]) -> None:
        self.hub = _Hub(terminals)
        self.forgotten = 0

    def forget_idle(self) -> None:
        self.forgotten += 1


def full_collections_in_a_sweep(services) -> int:  # noqa: ANN001
    """How many full collections one housekeeping sweep runs (automatic collection off)."""
    seen = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    automatic = gc.isenabled()
    gc.disable()  # only the collections housekeeping asks for
    gc.callbacks.append(record)
    try:
        server.keep_house(services)
    finally:
        gc.callbacks.remove(record)
        if automatic:
            gc.enable()
    return seen.count(2)


@pytest.mark.parametrize("terminals, full_collections", [([], 1), ([object()], 0)])
def test_housekeeping_collects_fully_only_when_no_terminal_is_open(terminals, full_collections):
    """A full collection (which also empties the interpreter's free lists) pauses every
    terminal for as long as it runs: only once nobody has one open."""
    services = _Services(terminals)
    assert full_collections_in_a_sweep(services) == full_collections
    assert services.forgotten == 1


@pytest.mark.gen_test(timeout=60)
async def test_the_servers_sweep_skips_the_full_collection_while_a_real_terminal_is_open(client, services):
    assert full_collections_in_a_sweep(services) == 1
    await client.dev_login("sweep@example.com")
    term = await TerminalClient.open(client)
    try:
        await term.run("echo open-$((1+1))", "open-2")
        assert full_collections_in_a_sweep(services) == 0
    finally:
        term.close()
    await wait_for(lambda: not services.hub.terminals())  # the terminal has closed
    assert full_collections_in_a_sweep(services) == 1
