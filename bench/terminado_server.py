"""terminado serving the very command our server runs, for a side-by-side comparison.

    python -m bench.terminado_server --port P --spec-dir DIR

`ws://127.0.0.1:P/ws/<name>` spawns, for each connection, the command described by
`DIR/<name>.json` (`{"argv": [...], "env": {...}, "cwd": ...}`), written by the benchmark
from the backend's own `attach_command` (the same `docker exec -it ... tmux new-session -A`).
Stock terminado otherwise: its `TermSocket`, its read loop, one terminal per connection
ended with SIGHUP when the socket closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import tornado.web
from terminado import TermSocket, UniqueTermManager
from terminado.management import PtyWithClients


class SpecTermManager(UniqueTermManager):
    """One new terminal per connection, its argv/env/cwd read from `<spec_dir>/<name>.json`."""

    def __init__(self, spec_dir: Path, **kwargs: Any) -> None:
        super().__init__(shell_command=["false"], term_settings={"type": "xterm-256color"}, **kwargs)
        self.spec_dir = spec_dir

    def get_terminal(self, url_component: Any = None) -> PtyWithClients:
        name = str(url_component)
        if not name.isalnum():
            raise tornado.web.HTTPError(400, "bad terminal name")
        spec = json.loads((self.spec_dir / f"{name}.json").read_text())
        term = self.new_terminal(shell_command=spec["argv"], extra_env=spec.get("env") or {},
                                 cwd=spec.get("cwd"))
        self.start_reading(term)
        return term


async def serve(port: int, spec_dir: Path) -> None:
    manager = SpecTermManager(spec_dir)
    app = tornado.web.Application([(r"/ws/([A-Za-z0-9]+)", TermSocket, {"term_manager": manager})])
    server = app.listen(port, "127.0.0.1")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.stop()
    await manager.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec-dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.port, args.spec_dir))


if __name__ == "__main__":
    main()
