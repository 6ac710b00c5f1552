"""Runs the deploy command for the GitHub webhook: in the background, one at a time.

A request that arrives while a run is going queues exactly one more run, however many
arrive: the queued run will see every commit that triggered them.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import Callable

log = logging.getLogger("threecompute.deploy")


class Deployer:
    def __init__(self, command: str, on_done: Callable[[int | None, float], None] | None = None) -> None:
        self.command = command
        self.on_done = on_done  # (exit code, -1 if it could not start; seconds) after each run
        self.running = False
        self.queued = False
        self.runs_started = 0
        self.last_exit_code: int | None = None
        self._task: asyncio.Task | None = None

    def trigger(self) -> bool:
        """Start a run now (True), or queue one to follow the current run (False)."""
        if self.running:
            self.queued = True
            return False
        self.running = True
        self._task = asyncio.get_running_loop().create_task(self._run_until_no_more_queued())
        return True

    async def _run_until_no_more_queued(self) -> None:
        try:
            while True:
                self.queued = False
                await self._run_once()
                if not self.queued:
                    return
        finally:
            self.running = False

    async def _run_once(self) -> None:
        started = time.monotonic()
        try:
            await self._run_command()
        finally:
            if self.on_done is not None:
                self.on_done(self.last_exit_code, time.monotonic() - started)

    async def _run_command(self) -> None:
        self.runs_started += 1
        log.info("deploy: starting %s", self.command)
        try:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(self.command),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await process.communicate()
        except OSError as exc:
            self.last_exit_code = -1
            log.error("deploy: could not start %s: %s", self.command, exc)
            return
        self.last_exit_code = process.returncode
        tail = output.decode("utf-8", "replace")[-2000:].strip()
        log.info("deploy: exited %s%s", process.returncode, f"\n{tail}" if tail else "")

    async def wait_idle(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
