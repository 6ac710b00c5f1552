"""File API throughput: requests/s of `GET /list-files` and of a 4 KB `GET /file`, and a
300 MB upload's time and the server's peak memory during it.

    python -m bench.files [--backend docker|local] [--seconds 5] [--connections 8] [--upload-mb 300]

Requests go over keep-alive connections from a small asyncio HTTP/1.1 client (one process,
`--connections` sockets), so the figure is the server's, not a connection set-up's. The
workspace holds 100 files of 4 KB (a student's project) when it is listed. The upload is
one multipart `POST /upload`, streamed from a generator; the server's RSS is sampled every
20 ms in a thread meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from typing import Any

import psutil

from bench.common import (
    HttpConnection,
    ServerProcess,
    dev_login,
    machine_info,
    mib,
    request_head,
    run_main,
    running_server,
    summarize,
    write_json,
)

WORKSPACE_FILES = 100
FILE_BYTES = 4096
CHUNK = 1024 * 1024
BOUNDARY = "----3computebench7c1d"


def log(message: str) -> None:
    print(f"[files] {message}", file=sys.stderr, flush=True)


async def hammer(port: int, head: bytes, seconds: float, connections: int) -> dict[str, Any]:
    """As many requests as `connections` keep-alive sockets get answered in `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        conn = await HttpConnection.open(port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, _ = await conn.request(head)
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "requests_per_second": round(len(latencies) / elapsed, 1),
            "latency_ms": summarize(latencies), "statuses": statuses}


async def fill_workspace(port: int, cookie: str) -> None:
    """A folder `bench/` with WORKSPACE_FILES files of 4 KB."""
    conn = await HttpConnection.open(port)
    body = os.urandom(FILE_BYTES // 2).hex().encode()
    try:
        await conn.request(request_head("POST", "/file/bench/", cookie, 0))
        for i in range(WORKSPACE_FILES):
            status, _ = await conn.request(request_head("PUT", f"/file/bench/f{i}.txt", cookie, len(body)), body)
            if status != 200:
                raise RuntimeError(f"PUT /file/bench/f{i}.txt answered {status}")
    finally:
        conn.close()


class PeakSampler:
    """Samples a process's RSS every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def upload(server: ServerProcess, cookie: str, megabytes: int) -> dict[str, Any]:
    """One multipart upload of `megabytes` MB, streamed; time and the server's peak RSS."""
    head_part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail_part = f"\r\n--{BOUNDARY}--\r\n".encode()
    size = megabytes * CHUNK
    head = request_head("POST", "/upload", cookie, len(head_part) + size + len(tail_part),
                        f"multipart/form-data; boundary={BOUNDARY}")
    block = os.urandom(CHUNK)
    conn = await HttpConnection.open(server.port)
    with PeakSampler(server.pid) as sampler:
        started = time.perf_counter()
        conn.writer.write(head + head_part)
        for _ in range(megabytes):
            conn.writer.write(block)
            await conn.writer.drain()
        conn.writer.write(tail_part)
        status, body = await conn.read_response()
        elapsed = time.perf_counter() - started
    status_del, _ = await conn.request(request_head("DELETE", "/file/big.bin", cookie))
    conn.close()
    if status != 200:
        raise RuntimeError(f"upload answered {status}: {body[:200]!r}")
    return {"megabytes": megabytes, "seconds": round(elapsed, 2), "mb_per_second": round(megabytes / elapsed, 1),
            "server_rss_before_mib": mib(sampler.baseline), "server_rss_peak_mib": mib(sampler.peak),
            "server_rss_growth_mib": mib(sampler.peak - sampler.baseline), "deleted": status_del == 200}


async def run_files(server: ServerProcess, seconds: float, connections: int, upload_mb: int) -> dict[str, Any]:
    cookie = await dev_login(server.base_url, "files@example.com")
    await fill_workspace(server.port, cookie)
    listing = await hammer(server.port, request_head("GET", "/list-files", cookie), seconds, connections)
    log(f"GET /list-files: {listing['requests_per_second']} req/s, p50 {listing['latency_ms']['p50']} ms")
    read = await hammer(server.port, request_head("GET", "/file/bench/f1.txt", cookie), seconds, connections)
    log(f"GET /file (4 KB): {read['requests_per_second']} req/s, p50 {read['latency_ms']['p50']} ms")
    big = await upload(server, cookie, upload_mb)
    log(f"upload {upload_mb} MB: {big['seconds']} s, server RSS +{big['server_rss_growth_mib']} MiB at peak")
    return {"list_files": listing, "get_file_4k": read, "upload": big,
            "settings": {"seconds": seconds, "connections": connections, "workspace_files": WORKSPACE_FILES}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--upload-mb", type=int, default=300)
    args = parser.parse_args(argv)
    with running_server(args.backend) as server:
        data = asyncio.run(run_files(server, min(args.seconds, 60), min(args.connections, 64),
                                     min(args.upload_mb, 2048)))
    data |= {"backend": args.backend, "machine": machine_info()}
    print(f"wrote {write_json('files', data)}")


if __name__ == "__main__":
    run_main(main)
