"""Giving freed memory back to the system.

CPython's buffers and larger objects come from glibc's malloc, which keeps what is freed for
reuse: after a class of two hundred terminals leaves, the heap pages their buffers used stay
in the server's resident size. One malloc arena for every thread (glibc gives each thread
its own by default, up to eight per core) leaves one heap, whose free pages `malloc_trim`
hands back, instead of several half-empty ones; the GIL serialises most allocations anyway.
A page goes back only once nothing in it is alive, so large buffers are kept out of the heap:
glibc maps a block apart only from a threshold that it raises to the size of every mapped
block freed (up to 32 MiB), after which a class's 1 MiB frames and 256 KiB file chunks grow
the heap at its peak, and the few lasting objects made meanwhile land all over it. A fixed
threshold keeps glibc's first one. All of this is glibc's; elsewhere these do nothing.
server.py runs the interpreter on malloc for its small objects too (PYTHONMALLOC=malloc):
CPython's own 1 MiB arenas go back only once empty, which a few objects left over from a
busy hour prevent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import urllib.parse

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)
ARENAS = 1
MMAP_THRESHOLD = 128 * 1024  # glibc's own, before it first raises it


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def tune_malloc(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """At most `arenas` malloc arenas from now on (threads started later share them), and every
    block of `mmap_threshold` bytes or more mapped apart, whatever sizes were freed before."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def trim() -> bool:
    """Return the free pages of every arena to the system; True if any were."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


def clear_url_cache() -> None:
    """Empty the standard library's cache of parsed URLs. Every Docker engine call parses its
    URL, most of which name a container, so the cache holds the last 128 calls' URLs: made
    during a burst (a class signing in, the engine coming back), they are spread over the
    allocator arenas the burst needed and keep every one of them."""
    clear = getattr(urllib.parse.urlsplit, "cache_clear", None)
    if clear is not None:
        clear()


def clear_lookup_cache() -> None:
    """Empty CPython's attribute lookup cache. Each of its 4096 slots keeps the name it was
    last looked up by, and names made at run time (Tornado's `getattr(handler, method.lower())`
    per request, the codec's method names per text-mode `open`) are new strings each time, so
    it holds thousands of small strings from the last burst, each keeping the page it lies in."""
    clear = getattr(sys, "_clear_type_cache", None)
    if clear is not None:
        clear()
