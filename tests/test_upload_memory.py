"""A 300 MB upload streams to disk: the server process does not grow by the upload's size."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from bench.common import free_port
from threecompute.handlers.auth import dev_user_id

from .conftest import ROOT

UPLOAD_BYTES = 300 * 1024 * 1024
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB
GROWTH_BOUND_BYTES = 32 * 1024 * 1024  # a tenth of the upload; streaming keeps it near zero


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, psutil.Process, Path]]:
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "FLASK_SECRET": "x" * 32}
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--dev", "--backend", "local",
                                "--port", str(port)], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            requests.get(f"{base}/healthz", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield base, psutil.Process(process.pid), tmp_path / "data"
    process.terminate()
    process.wait(timeout=20)


class PeakRss:
    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.peak = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def multipart_stream(boundary: str, filename: str) -> Iterator[bytes]:
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for _ in range(UPLOAD_BYTES // len(CHUNK)):
        yield CHUNK
    yield f"\r\n--{boundary}--\r\n".encode()


def test_a_300_mb_upload_streams_to_disk(server):
    base, process, data_dir = server
    session = requests.Session()
    session.get(f"{base}/auth/dev-login?email=big@example.com", allow_redirects=False)
    session.get(f"{base}/list-files")  # warm up: the first request imports and allocates a little
    boundary = uuid.uuid4().hex
    before = process.memory_info().rss
    with PeakRss(process) as rss:
        answer = session.post(f"{base}/upload", data=multipart_stream(boundary, "big.bin"),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    growth = rss.peak - before
    print(f"\n300 MB upload: server RSS {before / 2**20:.1f} MiB -> peak {rss.peak / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.1f} MiB)")
    assert answer.status_code == 200, answer.text
    saved = data_dir / "workspaces" / dev_user_id("big@example.com") / "big.bin"
    assert saved.stat().st_size == UPLOAD_BYTES
    assert growth < GROWTH_BOUND_BYTES, f"server grew by {growth / 2**20:.1f} MiB"


def test_a_300_mb_put_streams_to_disk(server):
    base, process, data_dir = server
    session = requests.Session()
    session.get(f"{base}/auth/dev-login?email=big@example.com", allow_redirects=False)
    session.get(f"{base}/list-files")
    before = process.memory_info().rss
    with PeakRss(process) as rss:
        answer = session.put(f"{base}/file/big.bin", data=(CHUNK for _ in range(UPLOAD_BYTES // len(CHUNK))))
    growth = rss.peak - before
    print(f"\n300 MB PUT: server RSS +{growth / 2**20:.1f} MiB at peak")
    assert answer.status_code == 200, answer.text
    assert (data_dir / "workspaces" / dev_user_id("big@example.com") / "big.bin").stat().st_size == UPLOAD_BYTES
    assert growth < GROWTH_BOUND_BYTES, f"server grew by {growth / 2**20:.1f} MiB"
