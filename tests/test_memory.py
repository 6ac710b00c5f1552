"""Freed memory goes back to the system: a heap left full of holes (what a class leaving
leaves behind) shrinks in resident size when trimmed. In a child process, so the test's own
heap plays no part."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

import server
from threecompute import memory

CHILD = r"""
import json, threading
from threecompute import memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

kept = []
def fill():
    blocks = [bytes(4096) + bytes([i % 256]) for i in range(20000)]  # ~80 MB in one thread's arena
    kept.extend(blocks[::16])  # a few live blocks everywhere: nothing at the top to give back
memory.limit_arenas()
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


@pytest.mark.parametrize("terminals, full_collections", [([], 1), ([object()], 0)])
def test_housekeeping_collects_fully_only_when_no_terminal_is_open(terminals, full_collections):
    """A full collection (which also empties the interpreter's free lists) pauses every
    terminal for as long as it runs: only once nobody has one open."""
    seen = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    services = _Services(terminals)
    automatic = gc.isenabled()
    gc.disable()  # only the collections housekeeping asks for
    gc.callbacks.append(record)
    try:
        server.keep_house(services)
    finally:
        gc.callbacks.remove(record)
        if automatic:
            gc.enable()
    assert services.forgotten == 1
    assert seen.count(2) == full_collections
