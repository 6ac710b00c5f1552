"""Terminals: one PTY per attached client (`session`, `terminal`), the hub that tracks them
(`hub`), and the attachments it starts ahead of need (`spares`)."""

from .hub import TerminalHub, TerminalLimit, TerminalLimits
from .session import FlowLimits, PtyInputOverflow, PtySession, PtyStats
from .terminal import ReadOnlyTerminal, Terminal

__all__ = ["FlowLimits", "PtyInputOverflow", "PtySession", "PtyStats", "ReadOnlyTerminal", "Terminal", "TerminalHub",
           "TerminalLimit", "TerminalLimits"]
