"""Terminals: one PTY per attached client (`session`), and the hub that tracks them (`hub`)."""

from .hub import ReadOnlyTerminal, Terminal, TerminalHub, TerminalLimit, TerminalLimits
from .session import FlowLimits, PtyInputOverflow, PtySession, PtyStats

__all__ = ["FlowLimits", "PtyInputOverflow", "PtySession", "PtyStats", "ReadOnlyTerminal", "Terminal", "TerminalHub",
           "TerminalLimit", "TerminalLimits"]
