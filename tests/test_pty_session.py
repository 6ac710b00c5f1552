"""PtySession with real PTYs and real processes: echo, resize, UTF-8, coalescing, flow
control, input buffering, and clean-up (no zombies, no leaked descriptors)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil
import pytest

from threecompute.pty.session import (
    CHILD_DEFAULT_SIGNALS,
    COALESCE_SECONDS,
    FlowLimits,
    PtyInputOverflow,
    PtySession,
)

PROMPT = "PROMPT> "
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color", "LANG": "C.UTF-8",
       "HOME": "/tmp", "PS1": PROMPT, "INPUTRC": "/dev/null"}
BASH = ["bash", "--norc", "--noprofile", "-i"]


class Recorder:
    """A sink that keeps every frame and lets a test wait for some text to show up."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.changed = asyncio.Event()
        self.exits = 0

    def __call__(self, text: str) -> None:
        self.frames.append(text)
        self.changed.set()

    def on_exit(self) -> None:
        self.exits += 1
        self.changed.set()

    @property
    def text(self) -> str:
        return "".join(self.frames)

    async def wait_for(self, predicate: Callable[[str], bool] | str, timeout: float = 5.0) -> str:
        check = predicate if callable(predicate) else (lambda text: predicate in text)
        deadline = time.monotonic() + timeout
        while not check(self.text):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; saw {len(self.frames)} frames: {self.text[-2000:]!r}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return self.text


def spawn(argv: list[str], sink: Recorder, **kwargs) -> PtySession:
    return PtySession(argv, sink, on_exit=sink.on_exit, env=ENV, **kwargs)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def assert_reaped(pid: int) -> None:
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return
    raise AssertionError(f"child {pid} still exists, status {status}")


@pytest.mark.gen_test(timeout=10)
async def test_keystrokes_echo_through_bash():
    sink = Recorder()
    session = spawn(BASH, sink)
    await sink.wait_for(PROMPT)
    session.write("echo hel''lo\n")
    await sink.wait_for("hello\r\n")
    session.close()
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_resize_is_seen_by_stty():
    sink = Recorder()
    session = spawn(BASH, sink, rows=24, cols=80)
    await sink.wait_for(PROMPT)
    session.write("stty size\n")
    await sink.wait_for("24 80\r\n")
    session.resize(40, 123)
    session.write("stty size\n")
    await sink.wait_for("40 123\r\n")
    session.close()
    await session.wait_closed()


MULTIBYTE = "àéîõü ñç ß Ωλ 中文字符 日本語 한국어 😀🎉🚀 👩‍💻 "


@pytest.mark.gen_test(timeout=10)
async def test_9000_multibyte_characters_arrive_whole():
    # Written in odd-sized byte slices, so writes (and therefore reads) split characters.
    code = (f"import os, sys, time\ntext = ({MULTIBYTE!r} * 1000)[:9000]\ndata = text.encode()\n"
            "for i in range(0, len(data), 997):\n    os.write(1, data[i:i + 997]); time.sleep(0.0005)\n")
    expected = (MULTIBYTE * 1000)[:9000]
    sink = Recorder()
    session = spawn(python(code), sink)
    await sink.wait_for(lambda _: sink.exits == 1)
    text = sink.text.replace("\r\n", "\n")
    assert "\ufffd" not in text, f"replacement character in output: {text[:300]!r}"
    assert text == expected, f"got {len(text)} chars, first difference near {_first_difference(text, expected)}"
    assert session.stats.reads > 1, session.stats
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_characters_fed_one_byte_per_read_are_decoded_whole():
    # One byte per write, with a pause between, so every read holds a fraction of a character.
    sample = "é€😀中"
    code = (f"import os, time\nfor b in {sample!r}.encode():\n"
            "    os.write(1, bytes([b])); time.sleep(0.01)\n")
    sink = Recorder()
    session = spawn(python(code), sink)
    await sink.wait_for(lambda _: sink.exits == 1)
    assert sink.text == sample, f"frames: {sink.frames!r}"
    assert session.stats.reads >= 8, f"reads did not split characters: {session.stats}"
    await session.wait_closed()


def _first_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"index {i}: {a[i:i + 20]!r} vs {b[i:i + 20]!r}"
    return f"index {min(len(a), len(b))} (lengths {len(a)} vs {len(b)})"


@pytest.mark.gen_test(timeout=10)
async def test_many_small_writes_are_coalesced_into_few_frames():
    sink = Recorder()
    session = spawn(python("for i in range(2000): print(i, flush=True)"), sink)
    await sink.wait_for(lambda _: sink.exits == 1)
    lines = sink.text.split("\r\n")
    assert lines[:-1] == [str(i) for i in range(2000)], f"output: {sink.text[-300:]!r}"
    print(f"2000 lines: {len(sink.frames)} frames, {session.stats.reads} reads")
    assert len(sink.frames) < 200, f"{len(sink.frames)} frames for 2000 lines ({session.stats})"
    await session.wait_closed()


@pytest.mark.gen_test(timeout=20)
async def test_output_that_keeps_streaming_is_gathered_over_the_longer_window():
    # A line every 0.5 ms for 0.6 s: about one frame a millisecond with the 1 ms window alone,
    # about one per 4 ms once the session sees that the output streams.
    code = ("import time\nend = time.monotonic() + 0.6\nn = 0\n"
            "while time.monotonic() < end:\n    print(n, flush=True); n += 1; time.sleep(0.0005)\n")
    sink = Recorder()
    session = spawn(python(code), sink)
    await sink.wait_for(lambda _: sink.exits == 1)
    lines = sink.text.split("\r\n")[:-1]
    assert lines == [str(i) for i in range(len(lines))] and len(lines) > 300, f"{len(lines)} lines"
    print(f"{len(lines)} lines in 0.6 s: {len(sink.frames)} frames")
    assert len(sink.frames) < 0.6 / (COALESCE_SECONDS * 2), f"{len(sink.frames)} frames ({session.stats})"
    await session.wait_closed()


class StalledSink:
    """A transport whose socket stops draining: futures stay pending until `release()`."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future] = []
        self.max_pending = 0
        self.frames = 0
        self.chars = 0
        self.tail = ""
        self.stalled = True
        self.changed = asyncio.Event()

    def __call__(self, text: str) -> asyncio.Future:
        self.frames += 1
        self.chars += len(text)
        self.tail = (self.tail + text)[-200:]
        self.changed.set()
        future = asyncio.get_running_loop().create_future()
        if self.stalled:
            self.pending.append(future)
            self.max_pending = max(self.max_pending, len(self.pending))
        else:
            future.set_result(None)
        return future

    def release(self) -> None:
        self.stalled = False
        for future in self.pending:
            future.set_result(None)
        self.pending.clear()


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.gen_test(timeout=20)
async def test_flood_to_a_stalled_client_pauses_reading_and_resumes():
    limits = FlowLimits()
    sink = StalledSink()
    session = PtySession(BASH, sink, env=ENV, limits=limits)
    await asyncio.sleep(0.2)
    sink.release()  # the prompt, then stall for the flood
    sink.stalled = True
    before = rss()
    session.write("yes\n")
    peak = before
    read_at_1s = 0
    for tick in range(30):  # 3 s of a client that reads nothing
        await asyncio.sleep(0.1)
        peak = max(peak, rss())
        if tick == 9:
            read_at_1s = session.stats.bytes_out
    growth = (peak - before) / 2**20
    print(f"stalled 3 s: RSS growth {growth:.2f} MiB, {session.stats}, max frames in flight {sink.max_pending}")
    assert session.paused, session.stats
    assert sink.max_pending <= limits.high_frames, f"{sink.max_pending} frames in flight"
    assert session.stats.bytes_out == read_at_1s, "kept reading while the client was stalled"
    assert growth < 5, f"RSS grew {growth:.2f} MiB"

    frames_before = sink.frames
    sink.release()
    await asyncio.sleep(0.3)
    assert sink.frames > frames_before + 10, f"reading did not resume: {session.stats}"
    assert "y\r\ny\r\n" in sink.tail

    session.write("\x03")
    deadline = time.monotonic() + 5
    while not sink.tail.rstrip().endswith(PROMPT.rstrip()):
        assert time.monotonic() < deadline, f"yes did not stop; tail {sink.tail!r}"
        sink.changed.clear()
        await asyncio.wait_for(sink.changed.wait(), 5)
    settled = session.stats.bytes_out
    await asyncio.sleep(0.2)
    assert session.stats.bytes_out == settled, "output continued after Ctrl-C"
    session.close()
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_many_tiny_frames_are_bounded_by_count_not_only_bytes():
    limits = FlowLimits()
    sink = StalledSink()
    code = "import time\nwhile True:\n    print('y', flush=True); time.sleep(0.003)\n"
    session = PtySession(python(code), sink, env=ENV, limits=limits)
    await asyncio.sleep(0.5)  # ~160 lines written, a few bytes per frame
    print(f"tiny frames: {session.stats}, max frames in flight {sink.max_pending}")
    assert session.paused and sink.max_pending == limits.high_frames, session.stats
    assert session.bytes_in_flight < 4096
    sink.release()
    frames = sink.frames
    await asyncio.sleep(0.1)
    assert sink.frames > frames and not session.paused, session.stats
    session.close()
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_coroutine_sink_is_flow_controlled_too():
    seen: list[str] = []

    async def send(text: str) -> None:  # like python-socketio's emit
        await asyncio.sleep(0.001)
        seen.append(text)

    done = asyncio.Event()
    session = PtySession(python("print('x' * 200000)"), send, on_exit=done.set, env=ENV)
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0.05)
    assert "".join(seen).rstrip() == "x" * 200000, f"got {sum(map(len, seen))} chars"
    assert session.frames_in_flight == 0 and session.bytes_in_flight == 0
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_large_input_is_buffered_without_blocking_the_loop():
    size = 300_000
    # Raw mode, and it only starts reading 0.3 s later: the PTY's input buffer fills first.
    code = (f"import sys, time, tty, hashlib\ntty.setraw(0)\nprint('raw', flush=True)\ntime.sleep(0.3)\n"
            f"data = b''\nwhile len(data) < {size}:\n    data += sys.stdin.buffer.read1({size} - len(data))\n"
            "print('got', len(data), hashlib.sha256(data).hexdigest(), flush=True)\n")
    payload = "".join(chr(ord("a") + i % 26) for i in range(size))
    sink = Recorder()
    session = spawn(python(code), sink)
    await sink.wait_for("raw")  # canonical mode would cut lines at 4095 bytes
    started = time.monotonic()
    session.write(payload)
    took = time.monotonic() - started
    assert took < 0.1, f"write blocked for {took:.3f} s"
    await sink.wait_for(f"got {size} {hashlib.sha256(payload.encode()).hexdigest()}")
    with pytest.raises(PtyInputOverflow):
        blocked = spawn(["sleep", "5"], Recorder())
        try:
            for _ in range(20):
                blocked.write("z" * 100_000)
        finally:
            blocked.close()
    await blocked.wait_closed()
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_close_reaps_the_child_and_closes_the_descriptor():
    sink = Recorder()
    session = spawn(BASH, sink)
    await sink.wait_for(PROMPT)
    pid, fd = session.pid, session.fd
    session.close()
    session.close()  # idempotent
    await asyncio.wait_for(session.wait_closed(), 3)
    assert session.closed
    assert_reaped(pid)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert sink.exits == 0, "on_exit is for the program ending by itself, not for close()"


@pytest.mark.gen_test(timeout=10)
async def test_close_escalates_to_sigkill_for_a_child_that_ignores_hangups():
    sink = Recorder()
    session = spawn(["bash", "-c", "trap '' HUP TERM; echo ready; sleep 30 & wait"], sink)
    await sink.wait_for("ready")
    grandchildren = psutil.Process(session.pid).children(recursive=True)
    started = time.monotonic()
    session.close()
    await asyncio.wait_for(session.wait_closed(), 5)
    print(f"escalation took {time.monotonic() - started:.2f} s, exit status {session.exit_status}")
    assert session.exit_status == -9
    await asyncio.sleep(0.05)
    assert not [p for p in grandchildren if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], grandchildren


@pytest.mark.gen_test(timeout=20)
async def test_spawn_close_cycles_leak_no_descriptors_or_children():
    me = psutil.Process()

    async def cycle() -> None:
        sink = Recorder()
        session = spawn(["cat"], sink)
        session.write("ping\n")
        await sink.wait_for("ping\r\nping\r\n")
        session.close()
        await session.wait_closed()

    await cycle()  # warm up: the loop creates its own descriptors lazily
    fds, children = me.num_fds(), len(me.children())
    for _ in range(30):
        await cycle()
    assert (me.num_fds(), len(me.children())) == (fds, children), os.listdir("/proc/self/fd")


@pytest.mark.gen_test(timeout=10)
async def test_program_ending_by_itself_calls_on_exit_once():
    sink = Recorder()
    session = spawn(["sh", "-c", "echo bye; exit 3"], sink)
    await sink.wait_for(lambda _: sink.exits >= 1)
    assert "bye" in sink.text
    assert session.closed
    session.close()
    await asyncio.wait_for(session.wait_closed(), 3)
    await asyncio.sleep(0.05)
    assert sink.exits == 1
    assert session.exit_status == 3
    assert_reaped(session.pid)
    session.write("ignored after exit")  # no error


@pytest.mark.gen_test(timeout=10)
async def test_the_child_leads_a_session_on_its_pty_in_its_folder_and_the_server_never_forks(tmp_path, monkeypatch):
    def no_fork(*args: object) -> None:
        raise AssertionError("the server forked: a copy of its whole memory for each terminal")
    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(os, "forkpty", no_fork)
    check = ("import os; os.close(os.open('/dev/tty', os.O_RDWR)); "  # fails without a controlling terminal
             "print('leader', os.getsid(0) == os.getpid(), os.tcgetpgrp(0) == os.getpgrp(), os.getcwd())")
    sink = Recorder()
    session = spawn(["sh", "-c", f'grep SigIgn /proc/$$/status; exec {sys.executable} -c "{check}"'], sink,
                    cwd=str(tmp_path))
    text = await sink.wait_for(lambda t: sink.exits == 1)
    ignored = int(text.split("SigIgn:")[1].split()[0], 16)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # in the server: Python ignores it
    assert [sig for sig in CHILD_DEFAULT_SIGNALS if ignored & 1 << (sig - 1)] == []  # in the child: nothing
    assert f"leader True True {tmp_path}" in text
    await session.wait_closed()


@pytest.mark.gen_test(timeout=10)
async def test_missing_program_or_folder_raises_and_leaks_nothing(tmp_path):
    me = psutil.Process()
    fds, children = me.num_fds(), {c.pid for c in me.children()}
    with pytest.raises(FileNotFoundError):
        PtySession(["no-such-program-3compute"], Recorder(), env=ENV)
    with pytest.raises(FileNotFoundError):
        PtySession(["cat"], Recorder(), env=ENV, cwd=str(tmp_path / "missing"))
    await asyncio.sleep(0.2)
    gc.collect()
    # Earlier tests' clean-up may still be closing descriptors: a leak is only ever growth.
    assert me.num_fds() <= fds, os.listdir("/proc/self/fd")
    new_zombies = [c for c in me.children() if c.pid not in children and c.status() == psutil.STATUS_ZOMBIE]
    assert new_zombies == []
