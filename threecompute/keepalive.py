"""One timer that pings every terminal socket, instead of a task per socket.

Tornado's own WebSocket pings keep a task, a coroutine and a timer for every connection
(about 1.6 KiB each, and a wake-up per socket per interval). Here one PeriodicCallback walks
the open sockets each interval and asks each to `keepalive()`: send a ping, or, if the
client never answered the previous one (a whole interval ago), close.
"""

from __future__ import annotations

from typing import Protocol

from tornado.ioloop import PeriodicCallback

INTERVAL_SECONDS = 25.0


class Pinged(Protocol):
    def keepalive(self) -> None: ...


class Keepalive:
    """Runs its timer only while a socket is registered (so an idle server never wakes)."""

    def __init__(self, interval_seconds: float = INTERVAL_SECONDS) -> None:
        self.interval_seconds = interval_seconds
        self.sockets: set[Pinged] = set()
        self._timer: PeriodicCallback | None = None

    @property
    def running(self) -> bool:
        return self._timer is not None

    def add(self, socket: Pinged) -> None:
        self.sockets.add(socket)
        if self._timer is None:
            self._timer = PeriodicCallback(self.tick, self.interval_seconds * 1000)
            self._timer.start()

    def discard(self, socket: Pinged) -> None:
        self.sockets.discard(socket)
        if not self.sockets and self._timer is not None:
            self._timer.stop()
            self._timer = None

    def tick(self) -> None:
        for socket in list(self.sockets):
            socket.keepalive()
