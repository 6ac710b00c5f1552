"""make_app: the one table of routes, wired to the services it is given."""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from typing import Any

import tornado.httputil
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPMessageDelegate, HTTPServerRequest
from tornado.log import access_log

from .handlers import auth, files, ops, terminal, webhook
from .handlers.base import BaseHandler, HTTPError, PreflightHandler
from .handlers.classrooms import classroom_routes
from .handlers.socketio import socketio_routes
from .handlers.web import web_routes
from .services import Services
from .settings import host_name

# What the HTTP server reads of a body at most. Every BaseHandler lowers it for its request
# (16 KiB; uploads raise it only after authentication); Socket.IO's polling POSTs carry
# terminal frames of up to 1 MiB.
MAX_BODY_BYTES = 2 * terminal.MAX_FRAME_BYTES
IDLE_CONNECTION_SECONDS = 60.0  # headers of a new request, and keep-alive between requests
BODY_TIMEOUT_SECONDS = 30.0  # a whole body; uploads get longer, and an idle limit of their own


def server_options() -> dict[str, float]:
    """The HTTPServer's limits on slow or large requests (server.py and the tests' server)."""
    return {"max_body_size": MAX_BODY_BYTES, "idle_connection_timeout": IDLE_CONNECTION_SECONDS,
            "body_timeout": BODY_TIMEOUT_SECONDS}


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a proxy's X-Request-Id, when it sets a sane one
QUIET_PATHS = {"/list-files", "/healthz", "/metrics"}  # polled: 100 lines a second for a class of 30


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, with the successful answers to polled paths at DEBUG."""
    status, request = handler.get_status(), handler.request
    app = handler.application
    route = app.route_of(handler) if isinstance(app, Application) else "other"
    if isinstance(app, Application):
        app.services.metrics.request_done(route, request.method or "", status, request.request_time())
    # 429s are logged once per client and interval by the limiter, not once per request.
    if status < 400 and request.path.removeprefix("/api") in QUIET_PATHS or status == 429:
        level = logging.DEBUG
    else:
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    user = getattr(handler, "_current_user", None)  # only if the handler authenticated: no decode here
    given = request.headers.get("X-Request-Id", "")
    fields = {"request_id": given[:64] if REQUEST_ID.fullmatch(given) else secrets.token_hex(8),
              "user_id": getattr(user, "user_id", None), "route": route, "method": request.method,
              "path": request.path, "status": status, "duration_ms": round(1000.0 * request.request_time(), 2)}
    access_log.log(level, "%d %s %.2fms", status, handler._request_summary(), fields["duration_ms"], extra=fields)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise HTTPError(404, "not found")


@tornado.web.stream_request_body  # refused from the headers: no body is read for it
class MisdirectedHandler(BaseHandler):
    def prepare(self) -> None:
        raise HTTPError(421, "this server does not answer for that Host")


class Application(tornado.web.Application):
    """Tornado's application with two checks routed before the table.

    Only the configured host names reach a handler (HTTP, WebSocket and Socket.IO alike): a
    page on a rebound name (`evil.example` resolving to this server) is same-origin with
    itself, so Origin checks alone would let it in; its `Host` header gives it away.
    Every OPTIONS request is the CORS preflight, so that no route's own prepare
    (authentication, the Origin rule, streamed bodies, WebSocket upgrades, the 404 handler)
    ever sees one.
    """

    def __init__(self, services: Services, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.services = services
        self.handler_args = {"services": services}
        # The metrics' route label: the pattern, never the raw path (one series per route).
        self._routes: dict[type, str] = {NotFoundHandler: "unmatched", MisdirectedHandler: "misdirected",
                                         PreflightHandler: "preflight"}
        for pattern, handler, *_ in (args[0] if args else kwargs.get("handlers", [])):
            self._routes.setdefault(handler, pattern)

    def route_of(self, handler: tornado.web.RequestHandler) -> str:
        return self._routes.get(type(handler), "other")

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> HTTPMessageDelegate:
        if not host_allowed(request.host, self.services.settings.allowed_hosts):
            return self.get_handler_delegate(request, MisdirectedHandler, self.handler_args)
        if request.method == "OPTIONS":
            return self.get_handler_delegate(request, PreflightHandler, self.handler_args)
        return super().find_handler(request, **kwargs)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """A configured name, or any IP address: a rebinding page can only use a name of its own."""
    name = host_name(host)
    if name is None:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name in allowed
    return True


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
    routes: list[tuple[str, type[tornado.web.RequestHandler]]] = []
    for name, handler in AUTH_ROUTES:
        # The existing frontend calls the short forms; the seed documents /auth/...
        routes += [(rf"/auth/{name}", handler), (rf"/{name}", handler)]
    routes += [
        (r"/list-files", files.ListFilesHandler),
        (r"/upload", files.UploadHandler),
        (r"/upload-folder", files.UploadFolderHandler),
        (r"/move", files.MoveHandler),
        (r"/file/(.*)", files.FileHandler),
        (r"/download/(.*)", files.DownloadHandler),
        (r"/terminal/ws", terminal.TerminalSocket),
        (r"/terminal/close-tab", terminal.CloseTabHandler),
        (r"/classrooms/([^/]+)/students/([^/]+)/terminal/ws", terminal.TerminalWatchSocket),
        (r"/github-webhook", webhook.GithubWebhookHandler),
        (r"/healthz", ops.HealthHandler),
        (r"/metrics", ops.MetricsHandler),
    ]
    routes += classroom_routes()
    api = [(pattern, handler, {"services": services}) for pattern, handler in routes] + socketio_routes(services)
    return Application(
        services,
        # Every API route under /api/ too (the frontend's convention); the pages stay where they are.
        api + [(f"/api{pattern}", handler, args) for pattern, handler, args in api] + web_routes(services),
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        websocket_max_message_size=terminal.MAX_FRAME_BYTES,
        websocket_ping_interval=terminal.PING_INTERVAL_SECONDS,
        websocket_ping_timeout=terminal.PING_TIMEOUT_SECONDS,
        debug=False,
        log_function=log_request,
    )


def make_http_server(app: tornado.web.Application, options: dict[str, float] | None = None) -> HTTPServer:
    """The HTTP server for `app`, as `server.py` runs it and the tests do (with `server_options`).

    No `xheaders`: Tornado would then take X-Forwarded-For and X-Real-Ip from any client.
    The client's address is worked out per request from TRUSTED_PROXIES (proxies.py).
    """
    return HTTPServer(app, **(server_options() if options is None else options))
