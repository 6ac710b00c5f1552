"""The server's share of the CPU on a crowded host.

Every keystroke of every student passes through the server's one event loop. On a busy host
that loop waits for a CPU behind hundreds of per-student processes (`docker exec` relays,
container shims, tmux servers), and Linux serves each of them as the server's equal: it
schedules by session (autogroup), giving every session the same share whatever the nice
values inside it, and each relay leads a session of its own. Lowering the server's own nice
value therefore changes nothing; the nice value of its session's group does. The relays
carry every keystroke and echo too, so theirs get the same value (`share_cpu_share`); the
students' own programs, in their containers, do not.

The group is shared by the whole session, so it is set only when the server leads a session
of its own, as under systemd or Docker or when started with `setsid`. Started from a shell,
the server leaves the shell's group alone: a priority given to it would outlive the server.
Where the kernel does not group by session, or the server runs in a cgroup of its own, the
service manager's CPU weight (systemd's `CPUWeight=`) does the same job.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")
_claimed: int | None = None  # the nice value claim_cpu_share gave the server's group


def claim_cpu_share(nice: int) -> str:
    """Put the server's session group at `nice` (-20 the largest share, 19 the smallest) if
    the server leads its session; what was done, for the log."""
    if nice == 0:
        return "scheduling group left as it is (SERVER_NICE=0)"
    if os.getsid(0) != os.getpid():
        return ("scheduling group not changed: the server shares its session with what started it "
                "(run it under a service manager or with setsid for SERVER_NICE to apply)")
    try:
        if AUTOGROUP_ENABLED.read_text().strip() != "1":
            return "scheduling group not changed: the kernel does not group by session (give the service a CPU weight)"
        AUTOGROUP.write_text(f"{nice}\n")
    except OSError as exc:  # EACCES/EPERM without CAP_SYS_NICE; ENOENT without autogroup
        return f"scheduling group not changed: {exc.strerror or exc} (SERVER_NICE={nice})"
    global _claimed
    _claimed = nice
    return f"scheduling group at nice {nice} (SERVER_NICE)"


def share_cpu_share(pid: int) -> None:
    """Give the session group that `pid` leads the nice value the server claimed for its own.

    For a terminal's relay (`docker exec`, a session of its own): every keystroke and echo
    passes through it as well as through the server, and at nice 0 it waits for a CPU as
    long as any other session. Nothing happens if the server claimed no share, or if `pid`
    does not lead a session (yet): the group would then be the server's own."""
    if _claimed is None:
        return
    with contextlib.suppress(OSError):  # the relay is gone already
        if os.getsid(pid) == pid:
            Path(f"/proc/{pid}/autogroup").write_text(f"{_claimed}\n")


def session_group_nice(pid: int | str = "self") -> int | None:
    """The nice value of a process's session group; None where the kernel keeps none."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None
