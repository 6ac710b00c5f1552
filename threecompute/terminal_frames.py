"""What a terminal client may send, checked once for both transports.

A frame is `{"type": ..., "data": {...}}`, or the same fields at the top level. The result
is a plain dict: `{"type": "pty-input", "input": str}` or
`{"type": "resize", "rows": int, "cols": int}`. Anything else raises `FrameError` with a
message for the client.
"""

from __future__ import annotations

import json
import logging

from .pty import PtyInputOverflow, ReadOnlyTerminal, Terminal

MAX_DIMENSION = 1000
MAX_PENDING_FRAMES = 64  # frames typed before the terminal is attached
# The attach command failed (its engine, its node or its container gone): both transports say so.
LOST_TERMINAL_MESSAGE = "the terminal lost its container; reconnect to get a fresh one"

log = logging.getLogger("threecompute.terminal")


def lost_its_container(terminal: Terminal) -> bool:
    """Whether the program ended by failing rather than by the user's `exit`."""
    return terminal.session.exit_status not in (0, None)


def log_lost_terminal(terminal: Terminal) -> None:
    """The operator's record of a terminal whose program failed while its client was there."""
    log.warning("tab %s of %s: its program ended with status %s", terminal.tab_id, terminal.user_id,
                terminal.session.exit_status)


class FrameError(ValueError):
    pass


def parse_frame(message: str | bytes) -> dict:
    try:
        frame = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested deeper than Python's stack
        raise FrameError("frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("frame must be a JSON object")
    payload = frame.get("data", frame)
    if not isinstance(payload, dict):
        raise FrameError("data must be an object")
    return parse_event(frame.get("type"), payload)


def parse_event(kind: object, payload: object) -> dict:
    if not isinstance(payload, dict):
        raise FrameError(f"{kind} payload must be an object")
    if kind == "pty-input":
        text = payload.get("input")
        if not isinstance(text, str):
            raise FrameError("pty-input needs a string 'input'")
        return {"type": kind, "input": text}
    if kind == "resize":
        rows, cols = payload.get("rows"), payload.get("cols")
        if not all(type(v) is int and 1 <= v <= MAX_DIMENSION for v in (rows, cols)):
            raise FrameError(f"resize needs integer rows and cols between 1 and {MAX_DIMENSION}")
        return {"type": kind, "rows": rows, "cols": cols}
    raise FrameError(f"unknown frame type {kind!r}")


class InputRouter:
    """Checked frames to one terminal: held while it is being attached, then replayed in order.

    Both transports use it. A problem is returned, for the transport to send as an `error`
    frame: the router holds nothing of its transport, so that a closed connection is freed at
    once instead of waiting, in a reference cycle, for the collector.
    """

    def __init__(self) -> None:
        self._terminal: Terminal | None = None
        self._pending: list[dict] = []

    def attach(self, terminal: Terminal) -> list[str]:
        """Replay the frames held; their problems, if any."""
        self._terminal = terminal
        pending, self._pending = self._pending, []
        return [problem for frame in pending if (problem := self._apply(frame))]

    def receive(self, frame: dict) -> str | None:
        if self._terminal is not None:
            return self._apply(frame)
        if len(self._pending) >= MAX_PENDING_FRAMES:
            return "the terminal is still starting; input dropped"
        self._pending.append(frame)
        return None

    def _apply(self, frame: dict) -> str | None:
        if frame["type"] == "resize":
            self._terminal.resize(frame["rows"], frame["cols"])
            return None
        try:
            self._terminal.write(frame["input"])
        except (PtyInputOverflow, ReadOnlyTerminal) as exc:
            return str(exc)
        return None
