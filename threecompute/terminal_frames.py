"""What a terminal client may send, checked once for both transports.

A frame is `{"type": ..., "data": {...}}`, or the same fields at the top level. The result
is a plain dict: `{"type": "pty-input", "input": str}` or
`{"type": "resize", "rows": int, "cols": int}`. Anything else raises `FrameError` with a
message for the client.
"""

from __future__ import annotations

import json

MAX_DIMENSION = 1000


class FrameError(ValueError):
    pass


def parse_frame(message: str | bytes) -> dict:
    try:
        frame = json.loads(message)
    except (ValueError, UnicodeDecodeError):
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
