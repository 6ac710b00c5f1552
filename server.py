"""3Compute backend entry point: flags -> Settings -> services -> app -> IOLoop.

    python server.py [--host HOST] [--port PORT] [--debug] [--dev] [--backend docker|swarm|local]
"""

# ruff: noqa: E402 - the allocator is chosen before the imports, which would otherwise run twice
from __future__ import annotations

import os
import sys


def run_on_the_system_allocator() -> None:
    """Start again with PYTHONMALLOC=malloc unless the environment chose an allocator.

    CPython's own allocator gives a 1 MiB arena back only once nothing in it is alive, and the
    few objects a class leaves behind (a departed user's reaper record, a metric's value) keep
    every arena its peak filled. glibc's malloc keeps 4 KiB pages instead, whose free ones
    `memory.trim()` hands back once housekeeping has emptied the interpreter's caches: in a
    short soak, 100 users x 2 terminals left the server 8 % larger than they found it rather
    than 17 %, for the same CPU (PERFORMANCE.md, "What the interpreter keeps")."""
    if "PYTHONMALLOC" in os.environ or not sys.executable:
        return
    os.environ["PYTHONMALLOC"] = "malloc"
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        del os.environ["PYTHONMALLOC"]  # run on as started


if __name__ == "__main__":
    run_on_the_system_allocator()

import asyncio
import gc
import logging
import resource
import signal
import threading

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from threecompute import logs, memory, scheduling
from threecompute.app import make_app, make_http_server
from threecompute.handlers.terminal import close_all_sockets
from threecompute.services import Services, build_services
from threecompute.settings import ConfigError, Settings, load_settings
from threecompute.store import StoreError

log = logging.getLogger("threecompute")
# Idle users' records are let go 30 to 60 s after their last use; freed memory goes back as often.
HOUSEKEEPING_SECONDS = 30.0


async def serve(settings: Settings) -> None:
    try:
        services = build_services(settings)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    await services.backend.start()
    server = make_http_server(make_app(services))
    try:
        server.listen(settings.port, settings.host)
    except OSError as exc:
        await services.backend.stop()
        services.close()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    log.info("3compute listening on http://%s:%d (backend %s%s)", settings.host, settings.port,
             services.backend.name, ", dev mode" if settings.dev else "")
    log.info("%s", scheduling.claim_cpu_share(settings.server_nice))
    freeze_startup_objects()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, log_resources, services)
    housekeeping = PeriodicCallback(lambda: keep_house(services), HOUSEKEEPING_SECONDS * 1000)
    housekeeping.start()
    await stopping.wait()
    housekeeping.stop()
    log.info("shutting down: closing terminals; user containers keep running")
    await shutdown(server, services)


async def shutdown(server: HTTPServer, services: Services) -> None:
    server.stop()
    await close_all_sockets(services)
    await services.backend.stop()
    await server.close_all_connections()
    services.close()


def freeze_startup_objects() -> None:
    """Move everything made at startup (modules, routes, settings: most of the heap) out of
    the collector's reach: a full collection then scans only what terminals and requests
    made since, and pauses every terminal for that much less."""
    gc.collect()
    gc.freeze()


def keep_house(services: Services) -> None:
    """Every HOUSEKEEPING_SECONDS: forget what people who stopped working left behind, then
    give the freed memory back to the system."""
    services.forget_idle()
    memory.clear_url_cache()
    memory.clear_lookup_cache()
    if not services.hub.terminals():
        gc.collect()  # a full collection also empties the interpreter's free lists
    memory.trim()


def log_resources(services: Services) -> None:
    """SIGUSR1: a full garbage collection, then what the process holds. Resources that only
    wait for a collection (connections kept in reference cycles by a failed call's
    traceback, say) are released by it, so what the line counts is what is really held."""
    collected = gc.collect()
    memory.trim()
    log.info("resources: %d terminal(s), %d descriptor(s), %d thread(s); %d unreachable object(s) collected, "
             "%d tracked, %d frozen at startup", len(services.hub.terminals()), len(os.listdir("/proc/self/fd")),
             threading.active_count(), collected, len(gc.get_objects()), gc.get_freeze_count())


def raise_open_file_limit() -> None:
    """Each terminal holds a PTY and each connection a socket: allow the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"3compute: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.debug)
    raise_open_file_limit()
    memory.tune_malloc()  # before the executors start their threads
    if settings.secret_generated:
        log.warning("FLASK_SECRET is not set: using a random one for this run (--dev); sessions end with it")
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"3compute: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
