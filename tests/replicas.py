"""Server replicas as real processes (`server.py`) on one DATA_DIR and one DATABASE_URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tornado.testing

from threecompute.containers import make_backend
from threecompute.settings import Settings, load_settings

from .conftest import ROOT


@dataclass
class Replica:
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    return port


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_healthy(replica: Replica, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise AssertionError(f"replica on {replica.port} exited:\n{replica.output()[-3000:]}")
        with contextlib.suppress(OSError):
            if health(replica.url)[0] == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"replica on {replica.port} never became healthy:\n{replica.output()[-3000:]}")


def start_replica(env: dict[str, str], folder: Path, flags: list[str]) -> Replica:
    port = free_port()
    log = folder / f"replica-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), *flags, "--port", str(port)],
                                   cwd=folder, env=os.environ | env | {"PYTHONUNBUFFERED": "1"},
                                   stdout=out, stderr=subprocess.STDOUT)
    return Replica(port, process, log)


def stop_replica(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(20)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(10)


@contextlib.contextmanager
def replicas(count: int, env: dict[str, str], folder: Path, flags: list[str]) -> Iterator[list[Replica]]:
    """`count` healthy replicas; all stopped at the end, and the terminals they left removed."""
    started: list[Replica] = []
    try:
        for _ in range(count):
            started.append(start_replica(env, folder, flags))
        for replica in started:
            wait_healthy(replica)
        yield started
    finally:
        for replica in started:
            stop_replica(replica)
        purge(load_settings(flags, env, dotenv=folder / "none.env"))


def purge(settings: Settings) -> None:
    """Remove the deployment's containers or tmux servers (from a thread: a loop may be running here)."""
    worker = threading.Thread(target=lambda: asyncio.run(make_backend(settings).purge()))
    worker.start()
    worker.join(120)
