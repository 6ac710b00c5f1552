"""The thread pool whose threads leave once idle: work is done, bounded, and no thread stays."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from threecompute.threadpool import ThreadPool


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_threads_grow_to_the_bound_with_the_work_and_leave_once_idle() -> None:
    pool = ThreadPool(3, "t", idle_seconds=0.2)
    release, running, peak = threading.Event(), [], []
    lock = threading.Lock()

    def work(n: int) -> int:
        with lock:
            running.append(n)
            peak.append(len(running))
        release.wait(5)
        with lock:
            running.remove(n)
        return n * n

    futures = [pool.submit(work, n) for n in range(10)]
    assert wait_until(lambda: len(running) == 3)
    assert pool.threads() == 3
    release.set()
    assert [f.result(5) for f in futures] == [n * n for n in range(10)]
    assert max(peak) == 3
    assert wait_until(lambda: pool.threads() == 0), "idle threads stayed"
    assert not [t for t in threading.enumerate() if t.name.startswith("t_")]
    assert pool.submit(work, 4).result(5) == 16, "a pool whose threads left starts new ones"
    pool.shutdown()
    assert pool.threads() == 0


def test_work_arriving_as_a_thread_gives_up_is_still_done() -> None:
    pool = ThreadPool(1, "edge", idle_seconds=0.001)
    for round_ in range(300):
        assert pool.submit(lambda r=round_: r).result(5) == round_
        time.sleep(0.001 * (round_ % 3))
    pool.shutdown()


def test_errors_reach_the_caller_and_the_thread_keeps_working() -> None:
    pool = ThreadPool(1, "err")
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    assert pool.submit(lambda: "next").result(5) == "next"
    pool.shutdown()


def test_shutdown_waits_for_running_work_cancels_queued_and_refuses_more() -> None:
    pool = ThreadPool(1, "stop")
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "done"

    running = pool.submit(slow)
    queued = pool.submit(lambda: "never")
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result(0) == "done"
    assert queued.cancelled()
    assert pool.threads() == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_queued_work_runs_before_the_threads_end_without_cancelling() -> None:
    pool = ThreadPool(2, "drain")
    futures = [pool.submit(time.sleep, 0.02) for _ in range(6)]
    pool.shutdown(wait=True)
    assert all(f.done() and f.exception() is None for f in futures)


def test_the_event_loop_runs_calls_in_its_threads() -> None:
    pool = ThreadPool(2, "loop")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(pool, lambda: threading.current_thread().name)
                                      for _ in range(4)))

    assert all(name.startswith("loop_") for name in asyncio.run(main()))
    pool.shutdown()
