"""Freed memory goes back to the system: a heap left full of holes (what a class leaving
leaves behind) shrinks in resident size when trimmed. In a child process, so the test's own
heap plays no part."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
