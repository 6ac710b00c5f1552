"""A thread pool whose threads leave once idle.

The standard library's pool keeps every thread it ever started: after a class, the threads
its peak needed stay, each with its glibc cache of freed blocks and a few small objects that
keep otherwise empty allocator arenas in the server's resident memory. Here a thread that
found no work for `idle_seconds` ends, and the next burst starts new ones.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

IDLE_SECONDS = 60.0

_Work = tuple[Future, Callable[..., Any], tuple, dict]


class ThreadPool(Executor):
    """At most `max_workers` threads; a thread is started when more work waits than threads
    wait for work. Threads are daemons: `shutdown` is what ends them in order."""

    def __init__(self, max_workers: int, name: str, idle_seconds: float = IDLE_SECONDS) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers, self._name, self._idle_seconds = max_workers, name, idle_seconds
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads blocked on the queue
        self._shut_down = False
        self._numbers = itertools.count()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if self._queue.qsize() > self._waiting and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._name}_{next(self._numbers)}", daemon=True)
                self._threads.add(thread)
                thread.start()
        return future

    def threads(self) -> int:
        return len(self._threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                while not self._queue.empty():
                    work = self._queue.get_nowait()
                    if work is not None:
                        work[0].cancel()
            self._queue.put(None)  # each thread passes it on to the next, then ends
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _work(self) -> None:
        while (work := self._next()) is not None:
            future, fn, args, kwargs = work
            del work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # the caller gets it through the future
                    future.set_exception(exc)
            del future, fn, args, kwargs  # nothing of the last call stays alive while idle

    def _next(self) -> _Work | None:
        """The next work, or None once this thread should end (idle, or the pool shut down)."""
        while True:
            with self._lock:
                self._waiting += 1
            try:
                work = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                work = None
            with self._lock:
                self._waiting -= 1
                if work is None and not self._shut_down and not self._queue.empty():
                    continue  # work came just as this thread gave up waiting
                if work is None:
                    if self._shut_down:
                        self._queue.put(None)
                    self._threads.discard(threading.current_thread())
                return work
