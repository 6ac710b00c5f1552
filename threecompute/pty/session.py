"""One pseudo-terminal: a child process under a PTY, its output streamed on the IOLoop.

`PtySession` spawns an argv (for us `docker exec -it ... tmux new-session -A`) under a PTY
(`spawn_pty`: posix_spawn, no fork of the server; a ptyprocess `PtyProcess` as the child's
handle) and hands the PTY's master descriptor to Tornado's IOLoop: no thread per
terminal, no polling. Output is decoded as UTF-8 incrementally (a character split between
two reads arrives whole), coalesced into frames (tmux writes in many tiny chunks) and
passed to a sink given by the transport, `send(text) -> Awaitable | None`.

Flow control: every awaitable the sink returns is a frame in flight. When too many frames
or bytes are in flight the session stops reading the PTY; the kernel's PTY buffer then
fills and the program inside simply blocks until the client catches up. Bytes alone are
not enough to bound memory: thousands of tiny frames cost far more than their payload.

Closing hangs the terminal up, then escalates SIGHUP -> SIGTERM -> SIGKILL on a timer,
reaping with `waitpid(WNOHANG)` from IOLoop callbacks, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import functools
import inspect
import io
import logging
import os
import shutil
import signal
import termios
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ptyprocess import PtyProcess
from ptyprocess.ptyprocess import _make_eof_intr
from tornado.ioloop import IOLoop

from .. import scheduling

log = logging.getLogger(__name__)

Send = Callable[[str], "Awaitable[Any] | None"]

READ_CHUNK = 64 * 1024
# Every terminal reads into this one buffer (reads happen on the IOLoop's thread only): a
# read of its own would allocate READ_CHUNK bytes each time, also for the read that finds
# nothing, and shrink them to the output's size, churning the heap that lasting objects share.
_READ_BUFFER = memoryview(bytearray(READ_CHUNK))
# Per readable event at most this many bytes, and this many reads (a program writing a byte
# at a time could otherwise keep us reading forever); then we yield to the rest of the loop.
READ_BUDGET = 256 * 1024
READS_PER_EVENT = 32
# Pending output this large is sent at once instead of waiting for the coalescing window.
MAX_FRAME_BYTES = 64 * 1024
# Window after a flush during which further output is gathered into one frame. The first
# output after a quiet spell, and the first after input (an echo), is sent at once: a timer
# shorter than this window still costs a whole millisecond (epoll waits in milliseconds),
# which measured as 60% of a keystroke's round trip when echoes came back to back.
COALESCE_SECONDS = 0.001
# While output streams (the last frame was gathered by the timer, not sent at once) the
# window is this many times longer: a program printing without pause gets a third of the
# frames, each costing the server about the same whatever its size, and a 4 ms wait is not
# seen between screen refreshes.
STREAMING_WINDOW_FACTOR = 4
MAX_INPUT_BYTES = 1024 * 1024
# How long a child that closed its side of the PTY gets to exit before we signal it.
EXIT_GRACE = 0.2
HANGUP_GRACE = 0.5  # after SIGHUP, before SIGTERM
TERM_GRACE = 1.0  # after SIGTERM, before SIGKILL
MAX_POLL_INTERVAL = 0.05


class PtyInputOverflow(Exception):
    """Input arrives faster than the program reads it; the excess was dropped."""


@dataclass(frozen=True)
class FlowLimits:
    """When to stop reading the PTY (either high mark) and when to resume (both low marks)."""

    high_frames: int = 8
    high_bytes: int = 256 * 1024
    low_frames: int = 2
    low_bytes: int = 64 * 1024


@dataclass
class PtyStats:
    bytes_out: int = 0  # read from the PTY
    reads: int = 0  # os.read calls that returned output (reads / frames_out shows the coalescing)
    frames_out: int = 0  # handed to the sink
    bytes_in: int = 0  # written to the PTY
    pauses: int = 0  # times reading stopped for flow control
    input_overflows: int = 0  # writes refused because the program stopped reading
    dropped_input: int = 0  # bytes refused because the input buffer was full
    send_errors: int = 0  # frames the sink raised on
    started_at: float = field(default_factory=time.monotonic)
    first_output_at: float | None = None


# Python ignores SIGPIPE (and the server may ignore or handle others); ignored signals
# survive exec, so without this `yes | head` inside the terminal would print EPIPE errors.
CHILD_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                         signal.SIGCHLD, signal.SIGXFSZ)


def spawn_pty(argv: Sequence[str], env: dict[str, str] | None, cwd: str | None, rows: int, cols: int) -> _Pty:
    """Start `argv` on a new PTY as ptyprocess would (a session of its own, the PTY its
    controlling terminal, default signals), without forking the server.

    A fork copies the server's page tables, then turns each page the server writes into a
    copy-on-write fault until the child has exec'd: under load, 10-30 ms of the IOLoop for
    every terminal opened. posix_spawn (a vfork underneath) costs the same whatever the
    server's size; util-linux's `setsid --ctty` and coreutils' `env --chdir` then do in the
    child what ptyprocess did between its fork and exec.
    """
    environ = os.environ if env is None else env
    if shutil.which(argv[0], path=environ.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
    command = [_helper("setsid"), "--ctty", *([_helper("env"), "--chdir", cwd] if cwd else []), *argv]
    master, slave = os.openpty()  # neither is inherited: only the copies made below are
    try:
        termios.tcsetwinsize(master, (rows, cols))
        pid = os.posix_spawn(command[0], command, environ, setsigdef=CHILD_DEFAULT_SIGNALS, setsigmask=(),
                             file_actions=[(os.POSIX_SPAWN_DUP2, slave, fd) for fd in (0, 1, 2)])
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return _Pty(pid, master)


@functools.cache
def _helper(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(errno.ENOENT, f"{name} (util-linux, coreutils) is needed to start terminals", name)
    return path


class _Pty(PtyProcess):
    """A PtyProcess around a child that `spawn_pty` started."""

    def __init__(self, pid: int, fd: int) -> None:
        # PtyProcess.__init__ (ptyprocess 0.7.0) wraps the fd in a BufferedRWPair: two 8 KiB
        # buffers per terminal, half of the server's memory per terminal, that nothing here
        # uses (the session reads and writes the fd itself). An unbuffered file closes it alike.
        _make_eof_intr()
        self.pid, self.fd = pid, fd
        self.fileobj = io.FileIO(fd, "r+", closefd=True)
        self.terminated = self.closed = self.flag_eof = False
        self.exitstatus = self.signalstatus = self.status = None
        self.delayafterclose = self.delayafterterminate = 0.1


def _sent_nowhere(text: str) -> None:
    """The sink of a session that has ended."""


class PtySession:
    """A child process under a PTY, read on the IOLoop, with flow control towards `send`.

    Must be created and used on the IOLoop's thread. Raises OSError (FileNotFoundError for
    a missing program or cwd) when the child cannot be started.
    """

    def __init__(self, argv: Sequence[str], send: Send, *, on_exit: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None, rows: int = 24, cols: int = 80,
                 limits: FlowLimits | None = None, coalesce_seconds: float = COALESCE_SECONDS,
                 share_cpu: bool = False) -> None:
        self._loop = IOLoop.current()
        self._share_cpu = share_cpu  # the child relays the terminal: it gets the server's CPU share
        self._send = send
        self._on_exit = on_exit
        self._limits = limits or FlowLimits()
        self._coalesce = coalesce_seconds
        self._window = coalesce_seconds  # the current one: longer while output streams
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._flush_timer: object | None = None
        self._last_flush = -1e9
        self._frames_in_flight = 0
        self._bytes_in_flight = 0
        self._paused = False
        self._input = bytearray()
        self._typed_since_flush = False  # output that follows input is an echo: not held back
        self._events = 0
        self._user_closed = False
        self._torn_down = False
        self._exit_status: int | None = None
        self._reaped = self._loop.asyncio_loop.create_future()
        self._reaper_started = 0.0
        self._signal_plan: list[tuple[float, int]] = []  # (seconds after teardown, signal)
        self._poll_interval = 0.001
        self.stats = PtyStats()
        if cwd is not None and not os.path.isdir(cwd):
            raise FileNotFoundError(errno.ENOENT, "no such folder", cwd)
        self._proc = spawn_pty(argv, env, cwd, rows, cols)
        self._fd: int = self._proc.fd
        os.set_blocking(self._fd, False)
        self._events = IOLoop.READ
        self._loop.add_handler(self._fd, self._on_events, IOLoop.READ)

    # -- public surface ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def fd(self) -> int:
        """The PTY master's descriptor while open (it stays valid until `closed`)."""
        return self._fd

    @property
    def closed(self) -> bool:
        """True once the PTY is closed, by `close()` or because the child ended."""
        return self._torn_down

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def frames_in_flight(self) -> int:
        return self._frames_in_flight

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes_in_flight

    @property
    def exit_status(self) -> int | None:
        """Once reaped: the exit code, or minus the signal number (as in subprocess)."""
        return self._exit_status

    def adopt(self, send: Send, on_exit: Callable[[], None] | None) -> None:
        """Send the output from now on to `send`, and report the child's end to `on_exit`
        (a session started ahead of need, handed to the terminal that needs it)."""
        self._send, self._on_exit = send, on_exit

    def write(self, text: str) -> None:
        """Type `text` into the terminal. Never blocks; raises PtyInputOverflow past 1 MiB queued."""
        if self._torn_down or not text:
            return
        data = text.encode("utf-8", errors="replace")
        if len(self._input) + len(data) > MAX_INPUT_BYTES:
            self.stats.dropped_input += len(data)
            self.stats.input_overflows += 1
            raise PtyInputOverflow("the terminal is not reading its input; some input was dropped")
        self._input += data
        self._typed_since_flush = True
        self._drain_input()

    def resize(self, rows: int, cols: int) -> None:
        if self._torn_down:
            return
        try:
            self._proc.setwinsize(rows, cols)
        except OSError as exc:  # the child may be gone already
            log.debug("resize of pid %s failed: %s", self.pid, exc)

    def signal_foreground(self, sig: int) -> None:
        """Send `sig` to the terminal's foreground process group (what a key like ^C would reach)."""
        if self._torn_down:
            return
        with contextlib.suppress(OSError):  # no foreground group, or it is gone already
            os.killpg(os.tcgetpgrp(self._fd), sig)

    def close(self) -> None:
        """Hang up and end the child (in the background; see `wait_closed`). Idempotent."""
        if self._user_closed:
            return
        self._user_closed = True
        self._on_exit = None  # not called once closed
        self._cancel_flush()
        self._pending.clear()  # nobody is listening any more
        self._pending_bytes = 0
        if not self._torn_down:
            self._teardown(hangup_now=True)

    async def wait_closed(self) -> None:
        """Wait until the child has been reaped (after `close()` or its own exit)."""
        await asyncio.shield(self._reaped)

    # -- reading and output ------------------------------------------------------------

    def _on_events(self, fd: int, events: int) -> None:
        if events & IOLoop.WRITE:
            self._drain_input()
        if events & IOLoop.READ and not self._torn_down and not self._paused:
            self._read()

    def _read(self) -> None:
        budget = READ_BUDGET
        for _ in range(READS_PER_EVENT):
            try:
                count = os.readv(self._fd, [_READ_BUFFER])
            except BlockingIOError:
                break
            except OSError as exc:
                # EIO is how Linux reports that every slave descriptor is closed.
                if exc.errno != errno.EIO:
                    log.warning("reading pty of pid %s: %s", self.pid, exc)
                self._child_gone()
                return
            if not count:
                self._child_gone()
                return
            budget -= count
            self._take_output(_READ_BUFFER[:count])
            if self._pending_bytes >= MAX_FRAME_BYTES:
                self._flush()
                if self._paused:
                    return
            if budget <= 0:
                break
        self._schedule_flush()

    def _take_output(self, data: memoryview) -> None:
        if self.stats.first_output_at is None:
            self.stats.first_output_at = time.monotonic()
            if self._share_cpu:  # it runs, so it leads its session (setsid --ctty) by now
                scheduling.share_cpu_share(self.pid)
        self.stats.bytes_out += len(data)
        self.stats.reads += 1
        self._pending_bytes += len(data)
        text = self._decoder.decode(data)
        if text:
            self._pending.append(text)

    def _schedule_flush(self) -> None:
        if self._flush_timer is not None or not self._pending:
            return
        delay = self._last_flush + self._window - self._loop.time()
        if delay <= 0 or self._typed_since_flush:
            # A quiet spell ended, or this answers a keystroke, and _read has drained the PTY:
            # waiting gathers nothing.
            self._window = self._coalesce
            self._flush()
            return
        self._flush_timer = self._loop.call_later(delay, self._flush_streaming)

    def _flush_streaming(self) -> None:
        """The window's timer: output kept coming, so the next window is the streaming one."""
        self._flush_timer = None
        self._window = self._coalesce * STREAMING_WINDOW_FACTOR
        self._flush()

    def _cancel_flush(self) -> None:
        if self._flush_timer is not None:
            self._loop.remove_timeout(self._flush_timer)
            self._flush_timer = None

    def _flush(self, force: bool = False) -> None:
        self._cancel_flush()
        if not self._pending or self._user_closed:
            return
        if self._frames_in_flight >= self._limits.high_frames and not force:
            return  # sent when the frames in flight drain (we are paused meanwhile)
        text = "".join(self._pending)
        nbytes = self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0
        self._last_flush = self._loop.time()
        self._typed_since_flush = False
        self._emit(text, nbytes)

    def _emit(self, text: str, nbytes: int) -> None:
        self.stats.frames_out += 1
        try:
            result = self._send(text)
        except Exception as exc:
            # Typically the socket closed and its transport has yet to close us: say it once.
            self.stats.send_errors += 1
            log.log(logging.WARNING if self.stats.send_errors == 1 else logging.DEBUG,
                    "terminal output sink failed (pid %s): %r", self.pid, exc)
            return
        if result is None or not inspect.isawaitable(result):
            return
        future = asyncio.ensure_future(result, loop=self._loop.asyncio_loop)
        self._frames_in_flight += 1
        self._bytes_in_flight += nbytes
        future.add_done_callback(partial(self._frame_done, nbytes))
        if self._over_high_mark():
            self._pause()

    def _frame_done(self, nbytes: int, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            # The socket went away; its transport will close us. Retrieved so asyncio stays quiet.
            log.debug("terminal output frame failed: %s", future.exception())
        self._frames_in_flight -= 1
        self._bytes_in_flight -= nbytes
        if self._paused and self._under_low_mark():
            self._resume()

    # -- flow control ------------------------------------------------------------------

    def _over_high_mark(self) -> bool:
        return (self._frames_in_flight >= self._limits.high_frames
                or self._bytes_in_flight >= self._limits.high_bytes)

    def _under_low_mark(self) -> bool:
        return (self._frames_in_flight <= self._limits.low_frames
                and self._bytes_in_flight <= self._limits.low_bytes)

    def _pause(self) -> None:
        if self._paused or self._torn_down:
            return
        self._paused = True
        self.stats.pauses += 1
        self._update_events()

    def _resume(self) -> None:
        if self._torn_down:
            return
        self._flush()  # output read before the pause goes first
        if self._over_high_mark():
            return
        self._paused = False
        self._update_events()

    def _update_events(self) -> None:
        if self._torn_down:
            return
        wanted = (0 if self._paused else IOLoop.READ) | (IOLoop.WRITE if self._input else 0)
        if wanted != self._events:
            self._events = wanted
            self._loop.update_handler(self._fd, wanted)

    # -- input -------------------------------------------------------------------------

    def _drain_input(self) -> None:
        while self._input and not self._torn_down:
            try:
                written = os.write(self._fd, self._input[:READ_CHUNK])
            except BlockingIOError:
                break  # the line discipline is full: wait for WRITE readiness
            except OSError as exc:
                log.debug("writing pty of pid %s: %s", self.pid, exc)
                self._input.clear()
                break
            self.stats.bytes_in += written
            del self._input[:written]
        self._update_events()

    # -- the end -----------------------------------------------------------------------

    def _child_gone(self) -> None:
        """The child closed its side of the PTY: deliver what is left, then tell the owner."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._pending.append(tail)
        self._flush(force=True)
        self._teardown(hangup_now=False)
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None and not self._user_closed:
            try:
                on_exit()
            except Exception:
                log.exception("terminal on_exit callback failed (pid %s)", self.pid)

    def _teardown(self, hangup_now: bool) -> None:
        self._torn_down = True
        # Nothing is sent from now on. The sink belongs to the connection, which holds this
        # session: dropped, the two are freed when the connection ends, not in a later
        # collection of reference cycles (a class's worth of them, after a reconnect storm).
        self._send = _sent_nowhere
        self._cancel_flush()
        self._input.clear()
        self._loop.remove_handler(self._fd)
        # Closing the master hangs the terminal up for everything still using it. The
        # PtyProcess owns the descriptor (its file object closes it); marking it closed
        # stops its __del__ from closing the same number again later.
        self._proc.fileobj.close()
        self._proc.closed = True
        self._proc.fd = -1
        self._reaper_started = self._loop.time()
        first = 0.0 if hangup_now else EXIT_GRACE
        self._signal_plan = [(first, signal.SIGHUP), (first + HANGUP_GRACE, signal.SIGTERM),
                             (first + HANGUP_GRACE + TERM_GRACE, signal.SIGKILL)]
        self._poll_interval = 0.001
        self._reap()

    def _reap(self) -> None:
        if self._try_waitpid():
            return
        elapsed = self._loop.time() - self._reaper_started
        while self._signal_plan and self._signal_plan[0][0] <= elapsed:
            self._signal(self._signal_plan.pop(0)[1])
        delay = self._poll_interval
        if self._signal_plan:
            delay = min(delay, self._signal_plan[0][0] - elapsed)
        self._poll_interval = min(self._poll_interval * 2, MAX_POLL_INTERVAL)
        self._loop.call_later(max(delay, 0.0), self._reap)

    def _try_waitpid(self) -> bool:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it
            pid, status = self.pid, None
        if pid == 0:
            return False
        if status is not None:
            self._exit_status = os.waitstatus_to_exitcode(status)
        self._proc.terminated = True
        if not self._reaped.done():
            self._reaped.set_result(None)
        return True

    def _signal(self, sig: int) -> None:
        # The child leads its own session and process group (setsid --ctty); signal the
        # group so helpers it started go too. The pid cannot be reused: it is not reaped yet.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
