"""Spare attachments: one attachment per user started ahead of need.

Starting a `docker exec` is most of a tab's attach (~70 of ~100 ms). Tabs are opened in
bursts (a page opens all of its tabs, a reload reopens them, a user adds one and then
another), so after each attach the hub starts one more attachment of that user's and keeps
it for LIFETIME_SECONDS: the backend's `spare_command`, a program that prints SPARE_READY
and then waits for one line saying which tab to attach. The user's next tab takes it, sends
it that line, and a new spare is started behind it. A user who opened no tab for a minute
has none, so a class that is just typing holds no spare `docker exec` clients; nor does one
who closed their last tab GRACE_SECONDS ago (time enough for a reload).

A spare is an ordinary attachment otherwise: its client is recorded in the container like
any other, and it ends the same way (`TerminalHub.close`: hang up, detach, reap).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..containers.backend import SPARE_READY, Box, ContainerBackend, UserRef
from .session import PtySession
from .terminal import Terminal, attach_env

log = logging.getLogger(__name__)

LIFETIME_SECONDS = 60.0  # a spare nobody took by then ends (SPARE_ATTACH_SECONDS; 0: no spares)
GRACE_SECONDS = 5.0  # ... or by this long after its user's last terminal closed (a reload)
START_DELAY_SECONDS = 0.05  # after an attach, so that starting the spare does not delay its output


@dataclass(eq=False)
class Spare:
    terminal: Terminal
    expiry: asyncio.TimerHandle
    heard: str = ""  # the end of its output, until SPARE_READY is in it
    ready: bool = False

    def hear(self, text: str) -> None:
        self.heard = (self.heard + text)[-2 * len(SPARE_READY):]
        self.ready = self.ready or SPARE_READY in self.heard


class Spares:
    """At most one waiting attachment per user."""

    def __init__(self, backend: ContainerBackend, close: Callable[[Terminal], Awaitable[None]],
                 background: set[asyncio.Future], lifetime_seconds: float = LIFETIME_SECONDS) -> None:
        self.lifetime_seconds = lifetime_seconds
        self._backend = backend
        self._close = close
        self._background = background
        self._by_user: dict[str, Spare] = {}
        self._closed = False  # shutting down: no spare starts any more

    def take(self, user_id: str, box: Box) -> Terminal | None:
        """The user's spare, ready and in `box`, for a tab to adopt; None otherwise (a spare
        not yet ready stays for the next tab)."""
        spare = self._by_user.get(user_id)
        if spare is None or not spare.ready:
            return None
        del self._by_user[user_id]
        spare.expiry.cancel()
        if spare.terminal.closed or spare.terminal.box.ref != box.ref:
            self._end(spare)
            return None
        return spare.terminal

    def start_soon(self, user: UserRef, box: Box) -> None:
        asyncio.get_running_loop().call_later(START_DELAY_SECONDS, self._start, user, box)

    def user_left(self, user_id: str) -> None:
        """The user's last terminal closed: their spare ends within GRACE_SECONDS."""
        spare = self._by_user.get(user_id)
        if spare is None:
            return
        loop = asyncio.get_running_loop()
        left = min(GRACE_SECONDS, spare.expiry.when() - loop.time())
        spare.expiry.cancel()
        spare.expiry = loop.call_later(left, self._expire, user_id, spare.terminal.session)

    def discard(self, user_id: str) -> None:
        spare = self._by_user.pop(user_id, None)
        if spare is not None:
            self._end(spare)

    def discard_all(self) -> None:
        """Shutdown: end every spare, and start none from now on."""
        self._closed = True
        for user_id in list(self._by_user):
            self.discard(user_id)

    def waiting(self) -> int:
        """Spares ready to be taken."""
        return sum(1 for spare in self._by_user.values() if spare.ready)

    def _start(self, user: UserRef, box: Box) -> None:
        if self._closed or self.lifetime_seconds <= 0 or user.user_id in self._by_user:
            return
        client_id = secrets.token_hex(8)
        command = self._backend.spare_command(box, client_id)
        if command is None:
            return
        spare: Spare | None = None

        def heard(text: str) -> None:
            if spare is not None:
                spare.hear(text)

        try:
            session = PtySession(command.argv, heard, on_exit=lambda: self._ended(user.user_id, spare),
                                 env=attach_env(command), cwd=command.cwd, share_cpu=command.relay)
        except OSError as exc:  # only the speed-up is lost
            log.warning("could not start a spare attachment for user %s: %s", user.user_id, exc)
            return
        expiry = asyncio.get_running_loop().call_later(self.lifetime_seconds, self._expire, user.user_id, session)
        spare = Spare(Terminal(user=user, tab_id="", client_id=client_id, box=box, session=session), expiry)
        self._by_user[user.user_id] = spare

    def _expire(self, user_id: str, session: PtySession) -> None:
        spare = self._by_user.get(user_id)
        if spare is not None and spare.terminal.session is session:
            self.discard(user_id)

    def _ended(self, user_id: str, spare: Spare | None) -> None:
        """A spare's program ended by itself (its container stopped, say)."""
        if spare is not None and self._by_user.get(user_id) is spare:
            del self._by_user[user_id]
        if spare is not None:
            self._end(spare)

    def _end(self, spare: Spare) -> None:
        spare.expiry.cancel()
        task = asyncio.ensure_future(self._close(spare.terminal))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
