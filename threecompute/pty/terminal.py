"""One attached client of a tab (`Terminal`), and the environment its command runs with."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..containers.backend import AttachCommand, Box, UserRef
from .session import PtySession

# Server settings must not leak into users' shells (the local backend runs tmux with this
# environment; `docker exec -e NAME` without a value would copy it into the container).
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def attach_env(command: AttachCommand) -> dict[str, str]:
    """The environment an attach command runs with: the server's, minus secrets, plus the command's."""
    env = {k: v for k, v in os.environ.items() if not _SECRET_NAME.search(k)}
    env["TERM"] = "xterm-256color"  # the far end is xterm.js, whatever started the server
    if not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LANG"] = "C.UTF-8"  # tmux draws non-ASCII as '_' unless the locale says UTF-8
    env.update(command.env)
    return env


class ReadOnlyTerminal(ValueError):
    """Input for a watcher's terminal."""


@dataclass(eq=False)
class Terminal:
    """One attached client of a tab: its PTY, who owns it and how to detach it."""

    user: UserRef
    tab_id: str
    client_id: str
    box: Box
    session: PtySession
    watcher: str | None = None  # who watches, read-only (an instructor), charged for the slot
    opened_at: float = field(default_factory=time.monotonic)
    on_first_resize: Callable[[], None] | None = field(default=None, repr=False)
    _closing: asyncio.Future | None = field(default=None, repr=False)

    @property
    def user_id(self) -> str:
        return self.user.user_id

    @property
    def slot_owner(self) -> str:
        return self.watcher or self.user.user_id

    @property
    def closed(self) -> bool:
        """True once closing started (by the hub) or the program inside ended."""
        return self._closing is not None or self.session.closed

    def write(self, text: str) -> None:
        """Keyboard input. Raises PtyInputOverflow if the program stopped reading."""
        if self.watcher is not None:
            raise ReadOnlyTerminal("this terminal is shown read-only; input is not sent")
        self.session.write(text)

    def resize(self, rows: int, cols: int) -> None:
        self.session.resize(rows, cols)
        hook, self.on_first_resize = self.on_first_resize, None
        if hook is not None:
            hook()
