"""One keystroke's time, hop by hop, through a real server in this process.

    python -m bench.keystroke [--backend docker|local] [--keystrokes 300]

The server (build_services + make_app, as server.py runs them) and one WebSocket client share
this process and its clock, so each hop is timed with the same `perf_counter`:

  client send → server on_message   the WebSocket frame over loopback, Tornado's frame reader
  on_message → PTY written          JSON parse, the input queue, os.write to the PTY master
  PTY written → PTY read            outside the server: the kernel PTY, `docker exec`, tmux, bash
  PTY read → frame written          UTF-8 decode, coalescing, the JSON frame, write_text
  frame written → client echo       the WebSocket frame back over loopback and the client's read

Both ends run on one loop here, so the client's own work shows in the first and last hops;
the middle three are the server's and the program's. Writes results/keystroke.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    OurTerminal,
    dev_login,
    echo_once,
    free_port,
    free_port_block,
    machine_info,
    run_main,
    summarize,
    wait_first_output,
    write_json,
)
from threecompute.app import make_app, make_http_server
from threecompute.handlers.terminal import TerminalSocket, close_all_sockets
from threecompute.pty.session import PtySession
from threecompute.services import build_services
from threecompute.settings import load_settings

HOPS = ("ws_in", "parse_and_write", "program", "read_to_frame", "ws_out")
LETTERS = "abcdefgijknopqrstuvwxyz"


class Marks:
    """perf_counter at each hop of the keystroke in flight (the first mark of each kind wins)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.t.setdefault(name, time.perf_counter())


def instrument(marks: Marks) -> None:
    on_message, write, take, send = (TerminalSocket.on_message, PtySession.write, PtySession._take_output,
                                     TerminalSocket.write_text)

    def on_message_timed(self: TerminalSocket, message: str | bytes) -> None:
        marks.mark("received")
        on_message(self, message)

    def write_timed(self: PtySession, text: str) -> None:
        write(self, text)
        marks.mark("written")

    def take_timed(self: PtySession, data: bytes) -> None:
        marks.mark("read")
        take(self, data)

    def send_timed(self: TerminalSocket, text: str) -> Any:
        result = send(self, text)
        marks.mark("sent")
        return result

    TerminalSocket.on_message, PtySession.write = on_message_timed, write_timed  # type: ignore[method-assign]
    PtySession._take_output, TerminalSocket.write_text = take_timed, send_timed  # type: ignore[method-assign]


async def measure(backend: str, keystrokes: int, root: Path) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(root / "data"), "PORT_BASE": str(free_port_block(50)),
           "FLASK_SECRET": "keystroke-bench-secret-" + "x" * 16}
    settings = load_settings(["--dev", "--host", "127.0.0.1", "--port", str(port), "--backend", backend],
                             env, dotenv=root / "no.env")
    services = build_services(settings)
    await services.backend.start()
    server = make_http_server(make_app(services))
    server.listen(port, "127.0.0.1")
    marks = Marks()
    try:
        cookie = await dev_login(f"http://127.0.0.1:{port}", "keystroke@example.com")
        term = await OurTerminal.open(f"ws://127.0.0.1:{port}", cookie, "k1")
        await wait_first_output(term, 60)
        await term.settle(0.5)
        instrument(marks)
        hops: dict[str, list[float]] = {h: [] for h in HOPS}
        totals: list[float] = []
        missed = 0
        for i in range(keystrokes):
            if i % 40 == 0:
                await term.send("\x15")
                await term.settle(0.05, 2.0)
            marks.t.clear()
            started = time.perf_counter()
            total = await echo_once(term, LETTERS[i % len(LETTERS)])
            t = marks.t
            if not all(k in t for k in ("received", "written", "read", "sent")):
                missed += 1
                continue
            ended = started + total
            points = [started, t["received"], t["written"], t["read"], t["sent"], ended]
            for hop, a, b in zip(HOPS, points, points[1:], strict=False):
                hops[hop].append(b - a)
            totals.append(total)
        term.close()
        if not totals:
            raise RuntimeError(f"no keystroke passed every hop ({missed} missed; last marks {sorted(marks.t)})")
    finally:
        await close_all_sockets(services)
        server.stop()
        await services.backend.stop()
        with contextlib.suppress(Exception):
            await services.backend.purge()
        services.close()
    summary = {h: summarize(v) for h, v in hops.items()}
    p50_total = summarize(totals)["p50"]
    return {"backend": backend, "keystrokes": len(totals), "total_ms": summarize(totals), "hops_ms": summary,
            "share_of_p50": {h: round(summary[h]["p50"] / p50_total, 3) for h in HOPS},
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--keystrokes", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="3compute-keystroke-") as root:
        data = asyncio.run(measure(args.backend, min(args.keystrokes, 5000), Path(root)))
    data["machine"] = machine_info()
    for hop in HOPS:
        s = data["hops_ms"][hop]
        print(f"{hop:<16} p50 {s['p50']:7.3f} ms  p95 {s['p95']:7.3f}  share of p50 {data['share_of_p50'][hop]}")
    print(f"{'total':<16} p50 {data['total_ms']['p50']:7.3f} ms  p95 {data['total_ms']['p95']:7.3f}; "
          f"load average {data['load_average']}")
    print(f"wrote {write_json('keystroke', data)}")


if __name__ == "__main__":
    run_main(main)
