"""make_app: the one table of routes, wired to the services it is given."""

from __future__ import annotations

import logging

import tornado.web
from tornado.log import access_log

from .handlers import auth, files, ops, terminal, webhook
from .handlers.base import BaseHandler, HTTPError
from .handlers.socketio import socketio_routes
from .services import Services

MAX_BODY_BYTES = 32 * 1024 * 1024  # non-streamed bodies; uploads raise their own limit


QUIET_PATHS = {"/list-files", "/healthz", "/metrics"}  # polled: 100 lines a second for a class of 30


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, with the successful answers to polled paths at DEBUG."""
    status = handler.get_status()
    # 429s are logged once per client and interval by the limiter, not once per request.
    if status < 400 and handler.request.path in QUIET_PATHS or status == 429:
        level = logging.DEBUG
    else:
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access_log.log(level, "%d %s %.2fms", status, handler._request_summary(), 1000.0 * handler.request.request_time())


class IndexHandler(BaseHandler):
    def get(self) -> None:
        self.answer({"service": "3compute", "status": "/healthz"})


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise HTTPError(404, "not found")


AUTH_ROUTES = [
    ("login", auth.LoginHandler),
    ("callback", auth.CallbackHandler),
    ("logout", auth.LogoutHandler),
    ("me", auth.MeHandler),
    ("users", auth.UsersHandler),
    ("tabs", auth.TabsHandler),
    ("dev-login", auth.DevLoginHandler),
]


def make_app(services: Services) -> tornado.web.Application:
    routes: list[tuple[str, type[tornado.web.RequestHandler]]] = [(r"/", IndexHandler)]
    for name, handler in AUTH_ROUTES:
        # The existing frontend calls the short forms; the seed documents /auth/...
        routes += [(rf"/auth/{name}", handler), (rf"/{name}", handler)]
    routes += [
        (r"/list-files", files.ListFilesHandler),
        (r"/upload", files.UploadHandler),
        (r"/upload-folder", files.UploadFolderHandler),
        (r"/move", files.MoveHandler),
        (r"/file/(.*)", files.FileHandler),
        (r"/terminal/ws", terminal.TerminalSocket),
        (r"/terminal/close-tab", terminal.CloseTabHandler),
        (r"/github-webhook", webhook.GithubWebhookHandler),
        (r"/healthz", ops.HealthHandler),
        (r"/metrics", ops.MetricsHandler),
    ]
    return tornado.web.Application(
        [(pattern, handler, {"services": services}) for pattern, handler in routes]
        + socketio_routes(services),
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        websocket_max_message_size=terminal.MAX_FRAME_BYTES,
        websocket_ping_interval=terminal.PING_INTERVAL_SECONDS,
        websocket_ping_timeout=terminal.PING_TIMEOUT_SECONDS,
        debug=False,
        log_function=log_request,
    )
