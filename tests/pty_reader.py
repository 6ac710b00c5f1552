"""Reading a ptyprocess child's output in tests, with a deadline."""

from __future__ import annotations

import select
import time

import ptyprocess


def read_until(proc: ptyprocess.PtyProcess, needle: str, timeout: float = 15.0) -> str:
    """Everything read until `needle` appeared; fails with what was seen on timeout or EOF."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.fd], [], [], left)[0]:
            raise AssertionError(f"{needle!r} not seen within {timeout} s; got {seen[-300:]!r}")
        try:
            seen += proc.read(65536)
        except EOFError:
            raise AssertionError(f"{needle!r} not seen before EOF; got {seen[-300:]!r}") from None
    return seen.decode(errors="replace")
