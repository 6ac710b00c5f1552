"""Every open terminal, per user and tab: the one door both transports go through.

A transport (the WebSocket handler, the Socket.IO adapter) asks the hub to `open` a
terminal for a user's tab and gets a `Terminal`: one attached client, that is one
`PtySession` running the backend's attach command (one tmux client of the tab's session).
Several sockets on one tab are several Terminals. The hub tells the backend when a user's
first terminal opens and last one closes (the idle clock), and on close it asks the
backend to `detach` the tmux client, because Docker does not end an exec's processes when
the exec's client goes away. Where the backend offers them, a tab takes a spare attachment
started ahead of need (`spares`) instead of starting its own.

The hub is also where terminals are counted, so that both transports share the limits: at
most `max_per_user` per user and `max_total` on the server, open or being opened, and opens
per user rate-limited. A refusal is a `TerminalLimit` raised before anything is spawned.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..containers.backend import BackendError, Box, ContainerBackend, UserRef
from ..metrics import Metrics
from ..ratelimit import Rate, RateLimiter
from .session import PtySession, PtyStats, Send
from .spares import LIFETIME_SECONDS, Spares
from .terminal import Terminal, attach_env

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 10.0
# What a shutdown waits for the terminals' detaches (queued for the engine, a few at a time);
# the user's next terminal hangs up any tmux client left, as no terminal owns it.
SHUTDOWN_SECONDS = 10.0
REAP_SECONDS = 3.0  # for the PTY children, already signalled, to be reaped
REDRAW_SETTLE_SECONDS = 0.05  # for the first resize to reach the tmux client before asking again
REDRAW_TIMEOUT = 10.0
# An ensure slower than this is creating or starting the user's container: the client is told.
PROGRESS_AFTER_SECONDS = 0.2
STARTING_MESSAGE = "starting your workspace container…"
STARTED_MESSAGE = "workspace container started; attaching the terminal…"
# Per-session figures summed for /metrics: total name -> PtyStats field.
STAT_TOTALS = {"pty_bytes_out_total": "bytes_out", "pty_bytes_in_total": "bytes_in",
               "pty_frames_out_total": "frames_out", "pty_pauses_total": "pauses",
               "pty_input_overflows_total": "input_overflows", "pty_send_errors_total": "send_errors"}


def add_stats(totals: dict[str, int], stats: PtyStats) -> None:
    for total, name in STAT_TOTALS.items():
        totals[total] += getattr(stats, name)


class TerminalLimit(BackendError):
    """A terminal refused by a limit: try again later (WebSocket close 1013)."""


@dataclass(frozen=True)
class TerminalLimits:
    max_per_user: int = 20
    max_total: int = 1000
    open_rate: Rate | None = None


class LatencyWindow:
    """Recent samples of one latency, for last/avg/p50/p99 gauges.

    Unboxed, in a ring made at start: a float object per sample would leave the last 512,
    made during a class's peak, scattered over the allocator arenas that peak filled, and
    keep every one of those arenas in the server's memory after the class has gone.
    """

    def __init__(self, size: int = 512) -> None:
        self._ring = array("d", bytes(8 * size))
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self._ring[self.count % len(self._ring)] = seconds
        self.count += 1
        self.total += seconds

    def summary(self, prefix: str) -> dict[str, float]:
        if not self.count:
            return {f"{prefix}_count": 0}
        ordered = sorted(self._ring[:min(self.count, len(self._ring))])
        return {
            f"{prefix}_count": self.count,
            f"{prefix}_last_seconds": self._ring[(self.count - 1) % len(self._ring)],
            f"{prefix}_avg_seconds": self.total / self.count,
            f"{prefix}_p50_seconds": ordered[len(ordered) // 2],
            f"{prefix}_p99_seconds": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        }


class FilesNotifier:
    """Per user: tell the user's watching terminal connections that the workspace changed.

    `changed` is called by the file API after each write and fires at once. Terminal output
    (a `touch`, a compiler) may change files too, so `output` fires too, debounced: once the
    user's terminals have been quiet for QUIET seconds, or at the latest MAX_DELAY after the
    first output, so that a client can refresh its file tree without polling.
    """

    QUIET = 0.3
    MAX_DELAY = 1.5

    def __init__(self) -> None:
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._pending: dict[str, list[float]] = {}  # user id -> [first output, last output]

    def watch(self, user_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` on every change of the user's files; returns the unwatch function."""
        self._watchers.setdefault(user_id, set()).add(callback)

        def unwatch() -> None:
            watchers = self._watchers.get(user_id)
            if watchers is not None:
                watchers.discard(callback)
                if not watchers:
                    del self._watchers[user_id]
        return unwatch

    def changed(self, user_id: str) -> None:
        for callback in list(self._watchers.get(user_id, ())):
            try:
                callback()
            except Exception:  # one broken connection must not stop the others hearing of it
                log.exception("files-changed callback for %s failed", user_id)

    def output(self, user_id: str) -> None:
        if user_id not in self._watchers:
            return  # nobody listens: nothing to schedule
        now = time.monotonic()
        pending = self._pending.get(user_id)
        if pending is not None:
            pending[1] = now
            return
        self._pending[user_id] = [now, now]
        asyncio.get_running_loop().call_later(self.QUIET, self._check, user_id)

    def _check(self, user_id: str) -> None:
        first, last = self._pending[user_id]
        now = time.monotonic()
        if now - last >= self.QUIET or now - first >= self.MAX_DELAY:
            del self._pending[user_id]
            self.changed(user_id)
            return
        delay = min(last + self.QUIET, first + self.MAX_DELAY) - now
        asyncio.get_running_loop().call_later(max(delay, 0.01), self._check, user_id)


class TerminalHub:
    """All open terminals, by user; opens and closes them through the container backend."""

    def __init__(self, backend: ContainerBackend, limits: TerminalLimits | None = None,
                 metrics: Metrics | None = None, spare_seconds: float = LIFETIME_SECONDS) -> None:
        self.backend = backend
        self.metrics_out = metrics or Metrics()
        self.files = FilesNotifier()
        self.limits = limits or TerminalLimits()
        self._by_user: dict[str, dict[str, Terminal]] = {}
        # Slots held per user: registered terminals plus opens in progress (ensure can be slow,
        # and a flood of opens must be refused while the first ones still wait for it).
        self._slots: dict[str, int] = {}
        self._slots_total = 0
        self._open_rate = RateLimiter(self.limits.open_rate)
        self._shutting_down = False
        self._background: set[asyncio.Future] = set()
        self._redraws: set[asyncio.Future] = set()
        self._attach = LatencyWindow()
        self._first_output = LatencyWindow()
        self._counters = dict.fromkeys(
            ("terminals_opened_total", "terminals_closed_total", "terminals_exited_total", "spares_used_total",
             "ensure_errors_total", "spawn_errors_total", "detach_errors_total", "terminals_refused_total"), 0)
        self.spares = Spares(backend, self.close, self._background, spare_seconds)
        self._closed_totals = dict.fromkeys(STAT_TOTALS, 0)

    async def open(self, user: UserRef, tab_id: str, rows: int, cols: int, send: Send,
                   on_exit: Callable[[], None], progress: Callable[[str], None] | None = None,
                   watcher: str | None = None) -> Terminal:
        """Attach a new client to the user's tab. Raises BackendError (nothing is registered then).
        Cancel it when the client goes away first: its slot is freed at once.

        `send(text)` receives output; `on_exit()` is called once if the program inside ends
        by itself (the hub then closes the terminal; closing it again is harmless);
        `progress(message)` hears while the user's container is being started. Raises
        TerminalLimit, before anything is started, past a limit.

        `watcher`: the user id of someone who watches the tab read-only (an existing tab
        only; the program's exit then means there was none). Their limits apply, not the
        owner's.
        """
        self._refuse_if_shutting_down()
        self._take_slot(watcher or user.user_id)
        try:
            return await self._open(user, tab_id, rows, cols, send, on_exit, progress, watcher)
        except BaseException:  # registered terminals give their slot back when they close
            self._release_slot(watcher or user.user_id)
            raise

    async def _open(self, user: UserRef, tab_id: str, rows: int, cols: int, send: Send,
                    on_exit: Callable[[], None], progress: Callable[[str], None] | None,
                    watcher: str | None) -> Terminal:
        started = time.monotonic()
        tell = progress or (lambda message: None)
        notice = asyncio.get_running_loop().call_later(PROGRESS_AFTER_SECONDS, tell, STARTING_MESSAGE)
        # Shielded: a client that leaves while its container is being made cancels its open
        # (and gives its slot back at once), but the container is still made, whole, for
        # its next connection, instead of being abandoned half-way.
        try:
            box = await asyncio.shield(self._ensure(user))
        finally:
            notice.cancel()
        if box.cold:
            tell(STARTED_MESSAGE)
            self.metrics_out.container_start_seconds.observe(time.monotonic() - started)
        self._refuse_if_shutting_down()
        terminal: Terminal | None = None

        def exited() -> None:
            if terminal is not None:
                self._on_program_exit(terminal, on_exit)

        observed = self._observed(send, started, user.user_id, box.cold)
        spare = self.spares.take(user.user_id, box) if watcher is None else None
        if spare is not None:
            client_id, session = spare.client_id, spare.session
            session.adopt(observed, exited)
            session.resize(rows, cols)
            session.write(self.backend.spare_handover(tab_id))
            self._counters["spares_used_total"] += 1
        else:
            client_id = secrets.token_hex(8)
            session = self._spawn_attachment(user, box, tab_id, client_id, watcher, observed, exited, rows, cols)
        if watcher is None:
            self.spares.start_soon(user, box)
        self._attach.add(time.monotonic() - started)
        self.metrics_out.attached(box.cold, time.monotonic() - started)
        terminal = Terminal(user=user, tab_id=tab_id, client_id=client_id, box=box, session=session, watcher=watcher)
        # Not in _background: shutdown need not wait for a redraw.
        terminal.on_first_resize = lambda: self._spawn(self._redraw(terminal), self._redraws)
        self._register(terminal)
        return terminal

    def _spawn_attachment(self, user: UserRef, box: Box, tab_id: str, client_id: str, watcher: str | None,
                          send: Send, exited: Callable[[], None], rows: int, cols: int) -> PtySession:
        command = self.backend.attach_command(box, tab_id, client_id, read_only=watcher is not None)
        try:
            return PtySession(command.argv, send, on_exit=exited, env=attach_env(command), cwd=command.cwd,
                              rows=rows, cols=cols, share_cpu=command.relay)
        except OSError as exc:
            self._counters["spawn_errors_total"] += 1
            log.warning("could not start %s for user %s: %s", command.argv[:1], user.user_id, exc)
            raise BackendError(f"could not start the terminal: {exc}") from exc

    async def close(self, terminal: Terminal) -> None:
        """End the client: its PTY child, its in-container tmux client. Idempotent."""
        if terminal._closing is None:
            terminal._closing = asyncio.ensure_future(self._close(terminal))
            # Kept until the child is reaped, so that close_all also waits for closes in flight.
            self._background.add(terminal._closing)
            terminal._closing.add_done_callback(self._background.discard)
        # Shielded: a caller cancelled mid-way (a socket handler going away) must not leave
        # the terminal half closed.
        await asyncio.shield(terminal._closing)

    def terminals_of(self, user_id: str) -> list[Terminal]:
        return list(self._by_user.get(user_id, {}).values())

    def terminals(self) -> list[Terminal]:
        return [t for per_user in self._by_user.values() for t in per_user.values()]

    async def close_all(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Graceful shutdown: refuse new terminals, close every open one and wait until all
        are reaped, for at most `timeout` seconds of detaching (a slow or lost engine)."""
        self._shutting_down = True
        self.spares.discard_all()  # their closes join _background, waited for below
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sessions = [t.session for t in self.terminals()]
        closing = {asyncio.ensure_future(self.close(t)) for t in self.terminals()}
        while pending := {f for f in closing | self._background if not f.done()}:
            if loop.time() >= deadline:
                log.warning("shutdown: %d terminal close(s) still wait for the engine after %g s; not waiting",
                            len(pending), timeout)
                reaps = [asyncio.ensure_future(s.wait_closed()) for s in sessions]
                await asyncio.wait(reaps, timeout=REAP_SECONDS)
                return
            await asyncio.wait(pending, timeout=deadline - loop.time())

    def metrics(self) -> dict[str, float]:
        live = self.terminals()
        totals = dict(self._closed_totals)
        for t in live:
            add_stats(totals, t.session.stats)
        return {
            "open_terminals": len(live),
            "terminal_slots": self._slots_total,
            "terminal_users": len(self._by_user),
            "paused_terminals": sum(1 for t in live if t.session.paused),
            "spares_waiting": self.spares.waiting(),
            **self._counters,
            **totals,
            **self._attach.summary("attach"),
            **self._first_output.summary("first_output"),
        }

    # -- internals ---------------------------------------------------------------------

    def _refuse_if_shutting_down(self) -> None:
        if self._shutting_down:
            raise BackendError("the server is shutting down")

    def _ensure(self, user: UserRef) -> asyncio.Future[Box]:
        # Not a local of `_open`: its error's traceback holds that frame, and a frame holding
        # the task would make a reference cycle of the whole failed connection.
        ensuring = asyncio.ensure_future(self.backend.ensure(user))
        ensuring.add_done_callback(self._count_ensure_error)
        return ensuring

    def _count_ensure_error(self, ensuring: asyncio.Future) -> None:
        if not ensuring.cancelled() and ensuring.exception() is not None:  # also marks it retrieved
            self._counters["ensure_errors_total"] += 1

    def _take_slot(self, user_id: str) -> None:
        held = self._slots.get(user_id, 0)
        if held >= self.limits.max_per_user:
            self._refuse(user_id, f"too many terminals open: at most {self.limits.max_per_user} per user")
        if self._slots_total >= self.limits.max_total:
            self._refuse(user_id, "the server has too many terminals open; try again later")
        wait = self._open_rate.take(user_id)
        if wait > 0:
            self._refuse(user_id, f"terminals opened too fast; try again in {max(1, round(wait))} s")
        self._slots[user_id] = held + 1
        self._slots_total += 1

    def forget_idle(self) -> None:
        """Forget the open rates and refusal times that no longer change an answer."""
        self._open_rate.forget_idle()

    def _release_slot(self, user_id: str) -> None:
        held = self._slots.get(user_id, 0)
        if held <= 1:
            self._slots.pop(user_id, None)
        else:
            self._slots[user_id] = held - 1
        self._slots_total = max(0, self._slots_total - 1)

    def _refuse(self, user_id: str, message: str) -> None:
        self._counters["terminals_refused_total"] += 1
        if self._open_rate.worth_reporting(user_id):  # one line per user and interval, however many refusals
            log.warning("terminal refused for user %s: %s (%d open or opening, %d on the server)",
                        user_id, message, self._slots.get(user_id, 0), self._slots_total)
        raise TerminalLimit(message)

    def _observed(self, send: Send, started: float, user_id: str, cold: bool) -> Send:
        """Wrap `send` to record how long the user waited from connect to first output, and
        to let the files notifier know that the user's programs are doing something."""
        seen = False

        def timed(text: str) -> Awaitable[Any] | None:
            nonlocal seen
            if not seen:
                seen = True
                self._first_output.add(time.monotonic() - started)
                self.metrics_out.first_output(cold, time.monotonic() - started)
            self.files.output(user_id)
            return send(text)

        return timed

    @staticmethod
    def _spawn(coro: Awaitable[None], tasks: set[asyncio.Future]) -> None:
        """A task kept referenced in `tasks` until it ends."""
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _redraw(self, terminal: Terminal) -> None:
        """After the client's first size: make sure its tmux client has that size and redraws.

        The first resize lands while `docker exec` and tmux are still starting, so its
        SIGWINCH can reach either before it handles the signal, and be lost; tmux then
        keeps the size it read first, and the screen it drew for that size is all the
        client ever gets until the next change (see ARCHITECTURE.md, "Re-attaching").
        Asking again once tmux is attached costs one redraw and closes that window.
        """
        await asyncio.sleep(REDRAW_SETTLE_SECONDS)
        if terminal.closed:
            return
        terminal.session.signal_foreground(signal.SIGWINCH)  # docker: the CLI re-reads its size
        try:
            await asyncio.wait_for(
                self.backend.redraw(terminal.box, terminal.client_id, terminal.session.pid), REDRAW_TIMEOUT)
        except Exception as exc:  # a missed redraw is a cosmetic loss, never a broken terminal
            log.debug("redraw of %s (user %s) failed: %r", terminal.client_id, terminal.user_id, exc)

    def _register(self, terminal: Terminal) -> None:
        per_user = self._by_user.setdefault(terminal.user_id, {})
        per_user[terminal.client_id] = terminal
        self._counters["terminals_opened_total"] += 1
        if len(per_user) == 1:
            self._notify(self.backend.terminal_opened, terminal.user)

    def _unregister(self, terminal: Terminal) -> None:
        per_user = self._by_user.get(terminal.user_id, {})
        if per_user.pop(terminal.client_id, None) is None:
            return
        self._release_slot(terminal.slot_owner)
        self._counters["terminals_closed_total"] += 1
        add_stats(self._closed_totals, terminal.session.stats)
        if not per_user:
            del self._by_user[terminal.user_id]
            self.spares.user_left(terminal.user_id)
            self._notify(self.backend.terminal_closed, terminal.user)

    @staticmethod
    def _notify(event: Callable[[UserRef], None], user: UserRef) -> None:
        try:
            event(user)
        except Exception:  # the idle clock must not break terminals
            log.exception("backend %s(%s) failed", event.__name__, user.user_id)

    async def _close(self, terminal: Terminal) -> None:
        terminal.on_first_resize = None  # a closure that holds the terminal: no cycle left behind
        terminal.session.close()
        try:
            await asyncio.wait_for(self.backend.detach(terminal.box, terminal.client_id), DETACH_TIMEOUT)
        except Exception as exc:  # logged; the terminal closes regardless
            self._counters["detach_errors_total"] += 1
            log.warning("detach of %s (user %s) failed: %r", terminal.client_id, terminal.user_id, exc)
        self._unregister(terminal)
        await terminal.session.wait_closed()

    def _on_program_exit(self, terminal: Terminal, on_exit: Callable[[], None]) -> None:
        self._counters["terminals_exited_total"] += 1
        try:
            on_exit()
        except Exception:
            log.exception("on_exit of terminal %s failed", terminal.client_id)
        self._spawn(self.close(terminal), self._background)
