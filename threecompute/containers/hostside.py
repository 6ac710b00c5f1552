"""Ending a container's tmux clients from the host, with no new process inside it.

`docker exec` starts a process in the container, and a container at its pids limit cannot
have one more: that is exactly when its tmux clients most need ending. So, when the server
runs as root, it does it from outside. The attach wrapper records its pid (the tmux client's,
after `exec`) in `/tmp/.3compute-clients/<client id>` inside the container; the host reads
that file through `/proc/<init pid>/root/tmp` (the container's own tmpfs, a mount point the
user cannot replace), maps the in-container pid to the host pid by the `NSpid` line of
`/proc/<pid>/status` among the processes of the container's cgroup (all of /proc when the
cgroup cannot be read), checks the process is in the container's pid namespace and is a tmux
client or the wrapper, and sends it SIGHUP.

The user controls the clients folder, so nothing there is trusted: the folder and each file
are opened without following links, a file must be a regular file and is read non-blocking
(a FIFO cannot stall the server), and a pid in it can only ever reach a process of that
same container that is a tmux client or a shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from dataclasses import dataclass

SIGNALLED_NAMES = ("tmux", "sh", "dash")  # a tmux client, or the wrapper before its `exec`
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def available() -> bool:
    """Only root may read another namespace's /tmp and signal the container's user."""
    return os.geteuid() == 0


@dataclass
class Recorded:
    client_id: str
    pid: int  # inside the container's pid namespace
    age: float  # seconds since the wrapper recorded it


class ContainerClients:
    """The recorded tmux clients of one running container, seen from the host."""

    def __init__(self, container_id: str, init_pid: int, clients_dir: str, is_client_id) -> None:  # noqa: ANN001
        """Raises OSError unless `init_pid` is, on this host, the init of that container (an
        engine elsewhere, in a VM say, reports pids that mean nothing here)."""
        self.init_pid = init_pid
        self.clients_dir = clients_dir.removeprefix("/tmp/")
        self.is_client_id = is_client_id
        with open(f"/proc/{init_pid}/cgroup") as cgroups:
            if container_id not in cgroups.read():
                raise OSError(f"pid {init_pid} is not container {container_id[:12]} on this host")
        self.namespace = os.readlink(f"/proc/{init_pid}/ns/pid")

    def _open_dir(self) -> int | None:
        tmp = os.open(f"/proc/{self.init_pid}/root/tmp", _DIR_FLAGS)
        try:
            return os.open(self.clients_dir, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=tmp)
        except OSError:  # none yet, or not a plain folder: nothing recorded that can be trusted
            return None
        finally:
            os.close(tmp)

    def recorded(self, now: float) -> list[Recorded]:
        folder = self._open_dir()
        if folder is None:
            return []
        try:
            found = []
            for name in os.listdir(folder):
                if self.is_client_id(name):
                    pid, mtime = _read_pid(folder, name)
                    if pid is not None:
                        found.append(Recorded(name, pid, now - mtime))
            return found
        finally:
            os.close(folder)

    def hang_up(self, clients: list[Recorded]) -> list[str]:
        """SIGHUP each client that is still what it was; forget its record. The ids ended."""
        if not clients:
            return []
        host_pids = self._host_pids()
        ended = []
        for client in clients:
            host = host_pids.get(client.pid)
            if host is not None and _name(host).startswith(SIGNALLED_NAMES):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host, signal.SIGHUP)
                ended.append(client.client_id)
            self.forget(client.client_id)
        return ended

    def forget(self, client_id: str) -> None:
        folder = self._open_dir()
        if folder is None:
            return
        try:
            for name in (client_id, f"{client_id}.gone"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)

    def _host_pids(self) -> dict[int, int]:
        """In-container pid → host pid, for the processes in the container's pid namespace."""
        mapping = {}
        for host in self._candidates():
            try:
                if os.readlink(f"/proc/{host}/ns/pid") != self.namespace:
                    continue
                with open(f"/proc/{host}/status") as status:
                    for line in status:
                        if line.startswith("NSpid:"):
                            mapping[int(line.split()[-1])] = host
                            break
            except (OSError, ValueError):
                continue  # ended meanwhile
        return mapping

    def _candidates(self) -> list[int]:
        """Host pids to look at: the container's cgroup when it can be read, else every process."""
        paths = []
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.init_pid}/cgroup") as cgroups:
            for line in cgroups.read().splitlines():
                _, controllers, path = line.split(":", 2)
                if "pids" in controllers.split(","):  # cgroup v1
                    paths.insert(0, f"/sys/fs/cgroup/pids{path}/cgroup.procs")
                elif controllers == "" and path != "/":  # cgroup v2
                    paths += [f"/sys/fs/cgroup{path}/cgroup.procs", f"/sys/fs/cgroup/unified{path}/cgroup.procs"]
        for path in paths:
            with contextlib.suppress(OSError, ValueError):
                with open(path) as procs:
                    found = [int(pid) for pid in procs.read().split()]
                if found:
                    return found
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read_pid(folder: int, name: str) -> tuple[int | None, float]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None, 0.0
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, 0.0
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return (int(text) if text.isdigit() else None), info.st_mtime
    finally:
        os.close(fd)


def _name(host_pid: int) -> str:
    try:
        with open(f"/proc/{host_pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""
