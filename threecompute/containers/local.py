"""The local backend (`--backend local`): tmux on the host, for development and demos only.

Each user gets a tmux server of their own, on a socket named for this deployment and the
user (`tmux -L 3c-<deployment>-<hash of the user id>`: the whole id, so that two ids sharing
a prefix never share a server), configured with the image's tmux.conf, running as
the server's user with the workspace as its home and working folder. Nothing isolates it
from the host: that is why the settings refuse it without `--dev` and a loopback host.

There is nothing to create, adopt or reap. Sessions outlive the server on purpose, exactly
like containers do, so a reconnect resumes them.

`detach` is a no-op: the tmux client is the PTY's own child here, so ending the PTY (which
the terminal layer does before calling `detach`) ends the client; there is no `docker exec`
in between whose processes could be left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
from pathlib import Path

from threecompute.containers import clean_folder, deployment_id
from threecompute.containers.backend import (
    AttachCommand,
    Box,
    ContainerBackend,
    UserRef,
    tmux_attach_args,
    tmux_session_name,
)
from threecompute.containers.reaper import SHELLS
from threecompute.settings import Settings

log = logging.getLogger(__name__)

REDRAW_TRIES, REDRAW_POLL_SECONDS = 30, 0.1  # how long a new tmux client may take to attach
TMUX_CONF = Path(__file__).resolve().parent / "image" / "tmux.conf"
TMUX_TIMEOUT = 10.0


class LocalBackend(ContainerBackend):
    """tmux sessions on the host, one tmux server per user."""

    name = "local"

    def __init__(self, settings: Settings, tmux_conf: Path = TMUX_CONF) -> None:
        self.settings = settings
        self.deployment = deployment_id(settings.data_dir)
        self.tmux = shutil.which("tmux") or "tmux"
        self.tmux_conf = str(tmux_conf)

    def socket_name(self, user_id: str) -> str:
        return f"3c-{self.deployment}-{hashlib.sha256(user_id.encode()).hexdigest()[:24]}"

    def socket_dir(self) -> Path:
        return Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.geteuid()}"

    async def purge(self) -> None:
        for sock in self.socket_dir().glob(f"3c-{self.deployment}-*"):
            proc = await asyncio.create_subprocess_exec(
                self.tmux, "-L", sock.name, "kill-server",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            await proc.wait()
            sock.unlink(missing_ok=True)  # tmux leaves the socket file behind

    async def remove_user(self, user: UserRef) -> None:
        await self._tmux(user, "kill-server")
        (self.socket_dir() / self.socket_name(user.user_id)).unlink(missing_ok=True)

    async def ensure(self, user: UserRef) -> Box:
        user.workspace.mkdir(parents=True, exist_ok=True)
        return Box(user=user, ref=str(user.workspace))

    def attach_command(self, box: Box, tab_id: str, client_id: str, read_only: bool = False) -> AttachCommand:
        argv = [*self._tmux_argv(box.user), *tmux_attach_args(tab_id, read_only)]
        env = {
            "TERM": "xterm-256color",
            "HOME": box.ref,
            "LANG": "C.UTF-8",
            "PATH": os.environ.get("PATH", os.defpath),
            "TMUX": "",  # a server started from inside tmux must not refuse to nest
        }
        return AttachCommand(argv=argv, env=env, cwd=box.ref)

    async def detach(self, box: Box, client_id: str) -> None:
        """Nothing to do: the tmux client ended with the PTY (see the module docstring)."""

    async def redraw(self, box: Box, client_id: str, pid: int) -> None:
        """SIGWINCH to the tmux client (the PTY's own child) once it is attached (see DockerBackend)."""
        for _ in range(REDRAW_TRIES):
            if str(pid) in (await self._tmux(box.user, "list-clients", "-F", "#{client_pid}")).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGWINCH)
                return
            await asyncio.sleep(REDRAW_POLL_SECONDS)

    async def close_tab(self, user: UserRef, tab_id: str) -> None:
        await self._tmux(user, "kill-session", "-t", f"={tmux_session_name(tab_id)}")

    async def cd_all_tabs(self, user: UserRef, folder: str) -> None:
        target = user.workspace / clean_folder(folder)
        keys = f"cd {shlex.quote(str(target))}"
        listing = await self._tmux(user, "list-sessions", "-F", "#{session_name} #{pane_current_command}")
        for line in listing.splitlines():
            session, _, command = line.partition(" ")
            if command in SHELLS:  # never type into vim or a running program
                await self._tmux(user, "send-keys", "-t", f"={session}:", "-l", keys)
                await self._tmux(user, "send-keys", "-t", f"={session}:", "Enter")

    async def health(self) -> dict:
        ok = shutil.which("tmux") is not None
        info: dict = {"ok": ok, "backend": "local"}
        if not ok:
            info["error"] = "tmux is not installed"
        elif not Path(self.tmux_conf).is_file():
            info.update(ok=False, error=f"tmux configuration missing: {self.tmux_conf}")
        return info

    def _tmux_argv(self, user: UserRef) -> list[str]:
        return [self.tmux, "-L", self.socket_name(user.user_id), "-f", self.tmux_conf]

    async def _tmux(self, user: UserRef, *args: str) -> str:
        """Run one tmux command on the user's socket; its output, or "" if it failed."""
        proc = await asyncio.create_subprocess_exec(
            *self._tmux_argv(user), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TMUX_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("tmux %s timed out", args[0])
            return ""
        if proc.returncode != 0:
            log.debug("tmux %s: %s", args[0], err.decode(errors="replace").strip())
            return ""
        return out.decode(errors="replace")
