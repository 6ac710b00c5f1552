"""The terminal WebSocket (`/terminal/ws?tabId=`), an instructor's read-only view of a
student's tab, and `POST /terminal/close-tab`.

The socket only translates JSON frames to and from the terminal hub: identity, Origin and
tab id are checked before the upgrade; the container is made ready after it (so a slow or
failing engine is reported in an `error` frame rather than a refused handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.websocket

from .. import keepalive
from ..containers.backend import TAB_ID, BackendError, UserRef
from ..pty import Terminal, TerminalLimit
from ..services import Services
from ..terminal_frames import (
    LOST_TERMINAL_MESSAGE,
    FrameError,
    InputRouter,
    log_lost_terminal,
    lost_its_container,
    parse_frame,
)
from .base import BaseHandler, HTTPError, current_identity, origin_allowed
from .ws_protocol import ClosingWebSocketHandler

log = logging.getLogger("threecompute.terminal")
MAX_FRAME_BYTES = 1024 * 1024
# Tornado's own pings, for the Socket.IO sockets; the terminal sockets share services.keepalive.
PING_INTERVAL_SECONDS = keepalive.INTERVAL_SECONDS
PING_TIMEOUT_SECONDS = 20  # a client silent this long after a ping is gone (tornado: at most the interval)
GOING_AWAY = 1001
TERMINAL_UNAVAILABLE = 1011
TRY_AGAIN_LATER = 1013


def output_frame(text: str) -> str:
    return json.dumps({"type": "pty-output", "data": {"output": text}}, ensure_ascii=False)


def progress_frame(message: str) -> str:
    return json.dumps({"type": "progress", "data": {"message": message}}, ensure_ascii=False)


def error_frame(message: str) -> str:
    return json.dumps({"type": "error", "data": {"message": message}})


FILES_CHANGED_FRAME = json.dumps({"type": "files-changed", "data": {}})


def wants_files_changed(events: str) -> bool:
    """`events=files-changed` in the query: the client asks for that frame too (existing
    clients never see a frame type they do not know)."""
    return "files-changed" in events.split(",")


class TerminalSocket(ClosingWebSocketHandler):
    # Slots, not the instance dict: Tornado's handler fills that dict to CPython's limit for
    # key sharing, and eight more keys would make every socket's dict a private 1.5 KiB one.
    __slots__ = ("services", "user", "tab_id", "terminal", "attaching", "input", "unwatch_files", "watcher",
                 "pong_awaited")
    services: Services
    user: UserRef
    tab_id: str

    def initialize(self, services: Services) -> None:
        self.services = services
        self.terminal: Terminal | None = None
        self.attaching: asyncio.Task | None = None
        self.input = InputRouter()
        self.unwatch_files: Callable[[], None] | None = None
        self.watcher: str | None = None  # set for a read-only view: who watches
        self.pong_awaited = False

    def tab_argument(self) -> str:
        tab_id = self.get_query_argument("tabId", "1")
        if not TAB_ID.match(tab_id):
            raise HTTPError(400, "tabId must be 1-32 letters or digits")
        return tab_id

    async def prepare(self) -> None:
        identity = current_identity(self, self.services)
        if identity is None:
            raise HTTPError(401, "unauthenticated")
        self.tab_id = self.tab_argument()
        user = await self.services.terminal_user(identity.user_id)
        if user is None:
            raise HTTPError(401, "unauthenticated")
        self.user = user

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(origin, self.services.settings.frontend_origin, self.request.host)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # A refused upgrade: answer like every other endpoint, in JSON.
        BaseHandler.write_error(self, status_code, **kwargs)  # type: ignore[arg-type]

    # -- lifetime ------------------------------------------------------------------------

    def open(self, *path_args: str) -> None:
        self.set_nodelay(True)  # so a 1009 close frame is not lost in the reset that follows it
        self.services.open_sockets.add(self)
        if self.watcher is None and wants_files_changed(self.get_query_argument("events", "")):
            self.unwatch_files = self.services.hub.files.watch(self.user.user_id, self.send_files_changed)
        self.forget_handshake()
        self.services.keepalive.add(self)
        self.attaching = asyncio.ensure_future(self.attach())

    async def attach(self) -> None:
        try:
            self.terminal = await self.services.hub.open(
                self.user, self.tab_id, rows=24, cols=80, send=self.send_output, on_exit=self.on_terminal_exit,
                progress=self.send_progress, watcher=self.watcher)
        except TerminalLimit as exc:
            self.send_error_frame(str(exc))
            self.close(TRY_AGAIN_LATER, "try again later")
            return
        except BackendError as exc:
            self.send_error_frame(str(exc))
            self.close(TERMINAL_UNAVAILABLE, "terminal unavailable")
            return
        except Exception:
            log.exception("attaching tab %s of %s failed", self.tab_id, self.user.user_id)
            self.send_error_frame("the terminal could not be started")
            self.close(TERMINAL_UNAVAILABLE, "terminal unavailable")
            return
        if self.ws_connection is None:  # the client left while the container was being made
            await self.services.hub.close(self.terminal)
            return
        for problem in self.input.attach(self.terminal):
            self.send_error_frame(problem)
        self.attaching = None  # done: nothing left to wait for or cancel

    def on_close(self) -> None:
        self.services.open_sockets.discard(self)
        self.services.keepalive.discard(self)
        if self.unwatch_files is not None:
            self.unwatch_files()
        if self.attaching is not None and self.terminal is None:
            self.attaching.cancel()  # still waiting for the container: stop waiting, free the slot
        asyncio.ensure_future(self.release())

    async def release(self) -> None:
        if self.attaching is not None:
            await asyncio.wait([self.attaching])
            self.attaching = None  # if cancelled, it keeps its error, whose traceback holds this object
        if self.terminal is not None:
            await self.services.hub.close(self.terminal)

    def on_terminal_exit(self) -> None:
        """The shell ended (the user typed `exit`): the tab is over. A failed `docker exec`
        (its engine gone, e.g. the node died) is an error the client may retry."""
        asyncio.ensure_future(self._close_after_exit())

    async def _close_after_exit(self) -> None:
        if self.terminal is not None:
            await self.terminal.session.wait_closed()
            if lost_its_container(self.terminal) and self.watcher is not None:
                self.send_error_frame(f"tab {self.tab_id} is not open")  # a watcher never makes one
            elif lost_its_container(self.terminal):
                log_lost_terminal(self.terminal)
                self.send_error_frame(LOST_TERMINAL_MESSAGE)
                self.close(TERMINAL_UNAVAILABLE, "terminal lost")
                return
        self.close(1000, "terminal exited")

    @property
    def ping_interval(self) -> float | None:
        return None  # no ping task per socket: services.keepalive pings them all

    def keepalive(self) -> None:
        """Each keepalive interval: a ping, or the end for a client that never answered the last."""
        if self.pong_awaited:
            self.close(reason="ping timed out")
            return
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.ping()
            self.pong_awaited = True

    def on_pong(self, data: bytes) -> None:
        self.pong_awaited = False

    # -- frames --------------------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        try:
            problem = self.input.receive(parse_frame(message))
        except FrameError as exc:
            problem = str(exc)
        if problem:
            self.send_error_frame(problem)

    def send_output(self, text: str) -> Awaitable[None] | None:
        try:
            return self.write_text(output_frame(text))
        except tornado.websocket.WebSocketClosedError:
            return None

    def send_progress(self, message: str) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(progress_frame(message))

    def send_error_frame(self, message: str) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(error_frame(message))

    def send_files_changed(self) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(FILES_CHANGED_FRAME)


class TerminalWatchSocket(TerminalSocket):
    """`/classrooms/{id}/students/{user_id}/terminal/ws?tabId=`: an instructor of the
    classroom watches one existing tab of one of its students. Output and resize only: input
    frames are answered with an error frame, and the student's window keeps its size."""

    async def prepare(self) -> None:
        identity = current_identity(self, self.services)
        if identity is None:
            raise HTTPError(401, "unauthenticated")
        self.tab_id = self.tab_argument()
        classroom_id, student_id = self.path_args
        viewer = await self.services.store.get_user(identity.user_id)
        if viewer is None:
            raise HTTPError(401, "unauthenticated")
        if not await self.services.classrooms.may_watch(viewer, classroom_id, student_id):
            raise HTTPError(404, "no such student in your classrooms")
        user = await self.services.terminal_user(student_id)
        if user is None:
            raise HTTPError(404, "no such student in your classrooms")
        self.user, self.watcher = user, viewer.id


class CloseTabHandler(BaseHandler):
    async def post(self) -> None:
        self.require_identity()  # 401 before any complaint about the body
        tab_id = self.json_body().get("tabId")
        if not isinstance(tab_id, str) or not TAB_ID.match(tab_id):
            raise HTTPError(400, "tabId must be 1-32 letters or digits")
        user = await self.require_user()
        await self.services.backend.close_tab(self.services.user_ref(user), tab_id)
        self.answer({"success": True})


async def close_all_sockets(services: Services) -> None:
    """Graceful shutdown: every socket gets 1001, then every PTY child is ended."""
    for socket in list(services.open_sockets):
        socket.close(GOING_AWAY, "server shutting down")
    await services.hub.close_all()

