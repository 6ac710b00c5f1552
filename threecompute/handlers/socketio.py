"""Socket.IO at `/socket.io/`: the existing React frontend's terminal transport.

The frontend does `io(backend, {withCredentials: true, query: {tabId}})`, emits `pty-input`
`{input}` and `resize` `{cols, rows}`, and listens for `pty-output` `{output}` and `error`
`{message}`. This module is a thin adapter from those events to the same `TerminalHub` the
WebSocket (`handlers/terminal.py`) uses: payloads are checked by `terminal_frames.parse_event`,
UTF-8, coalescing and clean-up come from the shared `PtySession`.

Handshake. Identity is the session JWT cookie of the Engine.IO handshake request (the
`connect` environ). The connection is accepted at once (`always_connect`), so that a refusal
can be an `error` event the frontend understands (`Unauthorized` sends it to the login page)
followed by a Socket.IO disconnect; both go through the connection's ordered output path, so
the error always reaches the client before the disconnect. Origin: the frontend's or the
server's own, checked on every HTTP request and WebSocket upgrade, like the WebSocket
handler (requests without an Origin pass, unless `Sec-Fetch-Site` says cross-site).

Flow control. `emit` only appends the packet to the Engine.IO socket's unbounded
`asyncio.Queue` and returns. The queue is emptied by `AsyncSocket.poll()`: for polling, when
the client's next GET arrives (after it read the previous answer); for WebSocket, by a
writer task that passes each packet to the transport's `send`. Two things make that a real
signal of "the client has taken it":

1. Every output frame's awaitable (the one `PtySession` counts as in flight) resolves only
   once the socket's queue is empty again (`queue.join()`; `poll()` calls `task_done()` as it
   takes packets), or the client has gone.
2. The stock Tornado WebSocket wrapper calls `write_message` without awaiting it, which would
   empty the queue into Tornado's unbounded write buffer. `FlushingWebSocket` replaces it on
   this server only and awaits each write until it has reached the kernel, so the writer task
   stops taking packets while the client is not reading.

So a client that stops reading leaves the frames in the queue, the session stops reading the
PTY after its high mark (8 frames / 256 KiB), and at most about two such batches sit in the
server (one being written, one queued) until the client catches up.

What this relies on in python-engineio (pinned in requirements.txt, each covered by
tests/test_socketio.py): `eio.sockets`, a socket's `queue` (an `asyncio.Queue` whose
`task_done` is called by `poll`) and `close(wait=False)`, and the private driver table
`eio._async`, where the WebSocket wrapper is swapped.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

import socketio
import tornado.websocket
from engineio.async_drivers import tornado as engineio_tornado
from engineio.exceptions import EngineIOError
from tornado.httputil import parse_cookie

from ..containers.backend import TAB_ID, BackendError
from ..identity import COOKIE_NAME, Identity
from ..pty import Terminal
from ..services import Services
from ..terminal_frames import (
    LOST_TERMINAL_MESSAGE,
    FrameError,
    InputRouter,
    log_lost_terminal,
    lost_its_container,
    parse_event,
)
from .base import origin_allowed
from .terminal import MAX_FRAME_BYTES, wants_files_changed
from .ws_protocol import ClosingWebSocketHandler

log = logging.getLogger("threecompute.socketio")
NAMESPACE = "/"
UNAUTHORIZED = "Unauthorized"  # the exact text the frontend checks for
CLOSE_GRACE_SECONDS = 5.0  # for a client to take its last packets before its connection is closed


def identity_from_cookie_header(header: str | None, services: Services) -> Identity | None:
    """`current_identity` for a raw Cookie header (Socket.IO hands us an environ, not a handler)."""
    if not header:
        return None
    try:
        token = parse_cookie(header).get(COOKIE_NAME)
    except Exception:  # a malformed header is no identity, as for Tornado's own parsing
        return None
    identity = services.tokens.decode(token)
    if identity is None or services.store.refuses(identity):
        return None
    return identity


def origin_refused(origin: str | None, fetch_site: str | None, frontend: str, host: str) -> bool:
    """The WebSocket handler's rule: the frontend or this server; no Origin means no browser.

    Browsers send Origin on every cross-site request they make; one that says it is
    cross-site (Sec-Fetch-Site) without an Origin is refused, as Tornado does for WebSockets.
    """
    if origin is None:
        return fetch_site in ("cross-site", "same-site")
    return not origin_allowed(origin, frontend, host)


class FlushingWebSocket(engineio_tornado.WebSocket):
    """Engine.IO's Tornado WebSocket wrapper, with `send` waiting until the frame is written out."""

    async def send(self, message: str | bytes) -> None:
        try:
            await self.tornado_handler.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            raise EngineIOError() from None


def make_handler_class(sio: socketio.AsyncServer) -> type[tornado.websocket.WebSocketHandler]:
    """python-socketio's Tornado handler, with our Origin rule on every request and upgrade."""
    base: type[tornado.websocket.WebSocketHandler] = socketio.get_tornado_handler(sio)

    class SocketIOHandler(ClosingWebSocketHandler, base):  # type: ignore[valid-type, misc]
        def initialize(self, services: Services) -> None:
            self.services = services

        def prepare(self) -> None:
            headers = self.request.headers
            if origin_refused(headers.get("Origin"), headers.get("Sec-Fetch-Site"),
                              self.services.settings.frontend_origin, self.request.host):
                self.set_status(403)
                self.set_header("Content-Type", "application/json; charset=utf-8")
                self.finish('{"error": "cross-origin request refused"}')

        def check_origin(self, origin: str) -> bool:
            # The stock check does `origin in cors_allowed_origins`, which is a function here.
            return origin_allowed(origin, self.services.settings.frontend_origin, self.request.host)

    return SocketIOHandler


class SocketIOTerminal:
    """One Socket.IO client on one tab: what `TerminalSocket` is for the WebSocket."""

    def __init__(self, transport: SocketIOTransport, sid: str, user_id: str, tab_id: str) -> None:
        self.transport = transport
        self.services = transport.services
        self.sio = transport.sio
        self.sid = sid
        self.eio_sid: str | None = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        self.user_id = user_id
        self.tab_id = tab_id
        self.terminal: Terminal | None = None
        self.attaching: asyncio.Task | None = None
        self.input = InputRouter()
        self.unwatch_files: Callable[[], None] | None = None
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        # Frames must reach the Engine.IO queue in the order they were produced; a lock is
        # FIFO, so it orders them whatever `emit` awaits inside.
        self._order = asyncio.Lock()

    # -- lifetime ------------------------------------------------------------------------

    async def attach(self) -> None:
        try:
            user = await self.services.terminal_user(self.user_id)
            if user is None:  # signed in, then removed from the store
                await self.refuse(UNAUTHORIZED)
                return
            self.terminal = await self.services.hub.open(
                user, self.tab_id, rows=24, cols=80,
                send=self.send_output, on_exit=self.on_terminal_exit, progress=self.send_progress)
        except BackendError as exc:
            await self.refuse(str(exc))
            return
        except Exception:
            log.exception("attaching tab %s of %s failed", self.tab_id, self.user_id)
            await self.refuse("the terminal could not be started")
            return
        if self.gone.done():  # the client left while the container was being made
            await self.services.hub.close(self.terminal)
            return
        for problem in self.input.attach(self.terminal):
            self.send_error(problem)

    def on_disconnect(self) -> None:
        if self.unwatch_files is not None:
            self.unwatch_files()
        if not self.gone.done():
            self.gone.set_result(None)  # releases the frames the session still counts in flight
        if self.attaching is not None and self.terminal is None:
            self.attaching.cancel()  # still waiting for the container: stop waiting, free the slot
        self.transport.spawn(self.release())

    async def release(self) -> None:
        if self.attaching is not None:
            await asyncio.wait([self.attaching])
            self.attaching = None  # if cancelled, it keeps its error, whose traceback holds this object
        if self.terminal is not None:
            await self.services.hub.close(self.terminal)

    def on_terminal_exit(self) -> None:
        """The shell ended (the user typed `exit`): the tab is over. A failed attach command
        (its engine, node or container gone) is an `error` event and then the Engine.IO
        connection dropped, as at shutdown, so that the client reconnects by itself."""
        self.transport.spawn(self._after_exit())

    async def _after_exit(self) -> None:
        if self.terminal is not None:
            await self.terminal.session.wait_closed()
            if lost_its_container(self.terminal):
                log_lost_terminal(self.terminal)
                await self._deliver("error", {"message": LOST_TERMINAL_MESSAGE}, wait=False)
                await self._queue_taken(timeout=CLOSE_GRACE_SECONDS)
                await self.close_engine()
                return
        await self.disconnect()

    def close(self, code: int = 1001, reason: str = "") -> None:
        """Server shutdown (`close_all_sockets`): drop the Engine.IO connection itself.

        Not a Socket.IO disconnect: after that the client would not reconnect by itself, and
        after a restart it should.
        """
        self.transport.spawn(self.close_engine())

    # -- events --------------------------------------------------------------------------

    def receive(self, kind: str, args: tuple) -> None:
        try:
            problem = self.input.receive(parse_event(kind, args[0] if len(args) == 1 else None))
        except FrameError as exc:
            problem = str(exc)
        if problem:
            self.send_error(problem)

    # -- output --------------------------------------------------------------------------

    def send_output(self, text: str) -> asyncio.Task:
        """The session's sink: the task ends when the frame has left the server (see above)."""
        return self.transport.spawn(self._deliver("pty-output", {"output": text}))

    def send_progress(self, message: str) -> None:
        """A dim status line in the terminal itself: the existing frontend shows it as it is."""
        line = f"\x1b[2m[3compute] {message}\x1b[0m\r\n"
        self.transport.spawn(self._deliver("pty-output", {"output": line}, wait=False))

    def send_error(self, message: str) -> None:
        self.transport.spawn(self._deliver("error", {"message": message}, wait=False))

    def send_files_changed(self) -> None:
        self.transport.spawn(self._deliver("files-changed", {}, wait=False))

    async def refuse(self, message: str) -> None:
        await self._deliver("error", {"message": message}, wait=False)
        await self.disconnect()

    async def disconnect(self) -> None:
        """Socket.IO disconnect, after every frame already produced; then the connection itself.

        Closing the Engine.IO socket too means a client that ignores or misses the disconnect
        is not left holding a connection. Only once the client has taken what was queued (or
        after a grace period): a polling GET that comes after the close is refused, packets
        and all.
        """
        async with self._order:
            await self.sio.disconnect(self.sid, namespace=NAMESPACE)
        await self._queue_taken(timeout=CLOSE_GRACE_SECONDS)
        await self.close_engine()

    async def close_engine(self) -> None:
        socket = self.sio.eio.sockets.get(self.eio_sid)
        if socket is not None and not socket.closed:
            # wait=False: a polling client that never comes back would hold `close` forever.
            await socket.close(wait=False, reason=self.sio.eio.reason.SERVER_DISCONNECT)

    async def _deliver(self, event: str, payload: dict, wait: bool = True) -> None:
        async with self._order:
            await self.sio.emit(event, payload, to=self.sid, namespace=NAMESPACE)
        if wait:
            await self._queue_taken(until=self.gone)  # the client leaving releases the frame too

    async def _queue_taken(self, until: asyncio.Future | None = None, timeout: float | None = None) -> None:
        """Until the Engine.IO socket's queue is empty (all handed to the transport), `until`, or `timeout`."""
        socket = self.sio.eio.sockets.get(self.eio_sid)
        if socket is None or socket.closed:
            return
        emptied = asyncio.ensure_future(socket.queue.join())
        try:
            await asyncio.wait([emptied] if until is None else [emptied, until], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            emptied.cancel()


class SocketIOTransport:
    """The Socket.IO server: checks each connection and routes its events to its terminal."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.connections: dict[str, SocketIOTerminal] = {}
        self._background: set[asyncio.Future] = set()
        frontend = services.settings.frontend_origin
        self.sio = socketio.AsyncServer(
            async_mode="tornado",
            always_connect=True,
            # Engine.IO's own check, which also writes the CORS answer: frontend or ourselves.
            cors_allowed_origins=lambda origin, environ: origin_allowed(
                origin, frontend, environ.get("HTTP_HOST", "")),
            cors_credentials=True,
            max_http_buffer_size=MAX_FRAME_BYTES,
        )
        # The driver table is shared by every Engine.IO server: this one gets its own copy.
        self.sio.eio._async = {**self.sio.eio._async, "websocket": FlushingWebSocket}
        self._socketio_eio_disconnect = self.sio.eio.handlers["disconnect"]
        self.sio.eio.on("disconnect", self.on_eio_disconnect)
        self.sio.on("connect", self.on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self.on_disconnect, namespace=NAMESPACE)
        self.sio.on("*", self.on_event, namespace=NAMESPACE)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """A background task that is kept referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        identity = identity_from_cookie_header(environ.get("HTTP_COOKIE"), self.services)
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        tab_id = query.get("tabId", ["1"])[-1]
        connection = SocketIOTerminal(self, sid, identity.user_id if identity else "", tab_id)
        if identity is None:
            await connection.refuse(UNAUTHORIZED)
        elif not TAB_ID.match(tab_id):
            await connection.refuse("tabId must be 1-32 letters or digits")
        else:
            self.connections[sid] = connection
            self.services.open_sockets.add(connection)
            if wants_files_changed(query.get("events", [""])[-1]):
                connection.unwatch_files = self.services.hub.files.watch(
                    identity.user_id, connection.send_files_changed)
            connection.attaching = self.spawn(connection.attach())

    def on_disconnect(self, sid: str, reason: Any = None) -> None:
        connection = self.connections.pop(sid, None)
        if connection is not None:
            self.services.open_sockets.discard(connection)
            connection.on_disconnect()

    async def on_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        await self._socketio_eio_disconnect(eio_sid, reason)
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is not None and reason == self.sio.eio.reason.CLIENT_DISCONNECT:
            # The client sent CLOSE. python-engineio's AsyncSocket.close(abort=True) does not
            # wake a long-poll GET still waiting for packets (its threaded twin does), which
            # would then hang for ping_interval + ping_timeout; an empty answer ends it now.
            socket.queue.put_nowait(None)

    def on_event(self, event: str, sid: str, *args: Any) -> None:
        # Every event but connect/disconnect lands here; parse_event names unknown ones.
        connection = self.connections.get(sid)
        if connection is not None:
            connection.receive(event, args)


def socketio_routes(services: Services) -> list[tuple[str, type, dict]]:
    """The route(s) to add to the application's table."""
    transport = SocketIOTransport(services)
    return [(r"/socket\.io/?", make_handler_class(transport.sio), {"services": services})]
