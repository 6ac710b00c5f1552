"""What every HTTP handler shares: JSON errors, CORS, the Origin rule and the session cookie.

Handlers stay thin: they parse, ask a service, and answer. Any exception becomes a JSON
`{"error": ...}` with a status; a traceback never reaches the client.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import tornado.web
from tornado.ioloop import IOLoop

from ..containers.backend import BackendError
from ..identity import COOKIE_NAME, Identity
from ..proxies import client_address
from ..services import Services
from ..store import NoPortsLeft, StoreError, StoreFull, User
from ..workspace import WorkspaceError

log = logging.getLogger("threecompute.http")
T = TypeVar("T")
MAX_JSON_BYTES = 16 * 1024  # every body unless a handler allows more (after authentication)
UNSAFE_METHODS = {"POST", "PUT", "DELETE", "PATCH"}
# Request headers a frontend page may send; nothing here reads an identity from a header.
PREFLIGHT_HEADERS = {"content-type", "accept", "accept-language", "content-language", "x-requested-with",
                     "cache-control", "pragma"}
STORE_DOWN = "the server's database is unavailable"


class HTTPError(tornado.web.HTTPError):
    """An error whose message is meant for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, reason=None, log_message=message)
        self.message = message


class RateLimited(HTTPError):
    """429 with a Retry-After of `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(429, "too many requests; slow down")
        self.retry_after = max(1, math.ceil(retry_after))


def origin_allowed(origin: str, frontend_origin: str, request_host: str) -> bool:
    """The frontend, or this server itself; `null` and everything else is foreign."""
    if origin == frontend_origin:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == request_host


@tornado.web.stream_request_body  # so that a body's size is judged before any of it is read
class BaseHandler(tornado.web.RequestHandler):
    services: Services
    max_body_bytes = MAX_JSON_BYTES
    _body: bytearray | None = None

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        services = getattr(self, "services", None)  # tornado calls this before initialize()
        if services is not None:
            self.set_cors_headers(services.settings.frontend_origin)

    def initialize(self, services: Services) -> None:
        self.services = services
        self.set_cors_headers(services.settings.frontend_origin)

    def set_cors_headers(self, frontend: str) -> None:
        if self.request.headers.get("Origin") == frontend:
            self.set_header("Access-Control-Allow-Origin", frontend)
            self.set_header("Access-Control-Allow-Credentials", "true")
        self.set_header("Vary", "Origin")

    def prepare(self) -> None:
        self.request.connection.set_max_body_size(self.max_body_bytes)
        self.check_origin_for_unsafe_method()
        self.check_body_length()

    def check_body_length(self) -> None:
        """Handlers that allow a large body after authentication make this a no-op."""
        self.allow_body(self.max_body_bytes)

    def allow_body(self, limit: int) -> None:
        """Read at most `limit` bytes of body: a larger Content-Length is answered 413 before
        any is read (and the connection closed); a chunked body past it ends the connection."""
        self.request.connection.set_max_body_size(limit)
        try:
            length = int(self.request.headers.get("Content-Length", "0"))
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        if length > limit:
            self.set_header("Connection", "close")
            raise HTTPError(413, f"body larger than {limit} bytes")

    def data_received(self, chunk: bytes) -> None:
        # Handlers that do not stream keep the body, as Tornado would, in `request.body`.
        if self._body is None:
            self._body = bytearray()
            self.request.body = self._body  # type: ignore[assignment]  # bytes-like, grows in place
        self._body += chunk

    def check_origin_for_unsafe_method(self) -> None:
        origin = self.request.headers.get("Origin")
        if (
            self.request.method in UNSAFE_METHODS
            and origin is not None
            and not origin_allowed(origin, self.services.settings.frontend_origin, self.request.host)
        ):
            raise HTTPError(403, "cross-origin request refused")

    def limit(self, kind: str, key: str) -> None:
        """Take a token from the `kind` bucket of `key` (a user id, an IP), else answer 429."""
        limiter = self.services.rate_limits[kind]
        wait = limiter.take(key)
        if wait > 0:
            if limiter.worth_reporting(key):
                log.warning("rate limit %s (%s) reached by %s: %s %s answered 429",
                            kind, limiter.rate, key, self.request.method, self.request.path)
            raise RateLimited(wait)

    # -- identity -------------------------------------------------------------------------

    def get_current_user(self) -> Identity | None:
        return current_identity(self, self.services)

    def require_identity(self) -> Identity:
        identity = self.current_user
        if identity is None:
            raise HTTPError(401, "unauthenticated")
        return identity

    async def require_user(self) -> User:
        """The caller's stored record; a valid token for a user the store lacks is no identity."""
        user = await self.services.store.get_user(self.require_identity().user_id)
        if user is None:
            raise HTTPError(401, "unauthenticated")
        return user

    def client_ip(self) -> str:
        """The peer's address; `X-Forwarded-For` only when the peer is in TRUSTED_PROXIES."""
        return client_address(self.request.remote_ip, self.request.headers.get_list("X-Forwarded-For"),
                              self.services.settings.trusted_proxies)

    # -- bodies and answers ---------------------------------------------------------------

    def json_body(self) -> dict:
        return json_object(self.request.body)

    def answer(self, payload: dict | list, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload))

    async def in_executor(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the file executor, within the caller's share of its threads."""
        identity = self.current_user
        if identity is None:
            return await IOLoop.current().run_in_executor(self.services.file_executor, fn, *args)
        async with self.services.limits.file_thread(identity.user_id):
            return await IOLoop.current().run_in_executor(self.services.file_executor, fn, *args)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        exc = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(exc, RateLimited):
            self.set_header("Retry-After", str(exc.retry_after))
        self.finish(json.dumps({"error": error_message(status_code, kwargs.get("exc_info"))}))

    def log_exception(self, typ, value, tb) -> None:  # noqa: ANN001 - tornado's signature
        if isinstance(value, tornado.web.HTTPError | WorkspaceError | BackendError | StoreError):
            return
        super().log_exception(typ, value, tb)

    def _handle_request_exception(self, e: BaseException) -> None:
        # Map service errors onto statuses here, once, instead of in every handler.
        mapped = as_http_error(e)
        if mapped is None:
            super()._handle_request_exception(e)
            return
        # Tornado's error path reads sys.exc_info(), not `e`: raise the mapped error so that
        # its message is the one the client gets.
        try:
            raise mapped from e
        except HTTPError as current:
            super()._handle_request_exception(current)
        finally:
            del mapped, e  # the raised error's traceback holds this frame: no cycle through it


def as_http_error(e: BaseException) -> HTTPError | None:
    """The client-facing error for a service layer's exception; None for anything else."""
    if isinstance(e, WorkspaceError):
        return HTTPError(e.status, e.message)
    if isinstance(e, BackendError):
        return HTTPError(503, str(e))
    if isinstance(e, NoPortsLeft):
        return HTTPError(503, str(e))
    if isinstance(e, StoreFull):
        log.error("store failure: %s", e)
        return HTTPError(507, "no space left on the server's disk")
    if isinstance(e, StoreError):
        log.error("store failure: %s", e)
        return HTTPError(503, STORE_DOWN)
    return None


class PreflightHandler(BaseHandler):
    """Every OPTIONS request, whatever its path (the application routes them all here).

    A browser's preflight carries no cookie, so it is answered before any authentication,
    Origin or body check a route's own handler makes. Only the frontend origin gets the
    Access-Control-Allow-* headers; any other gets the same 204 without them, which the
    browser takes as a refusal.
    """

    def prepare(self) -> None:
        pass

    def options(self, *args: Any) -> None:
        self.set_header("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        if self.request.headers.get("Origin") == self.services.settings.frontend_origin:
            self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", allowed_request_headers(
                self.request.headers.get("Access-Control-Request-Headers", "")))
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()


def allowed_request_headers(requested: str) -> str:
    """The requested headers this API reads or ignores harmlessly; Content-Type at least."""
    names = {name.strip().lower() for name in requested.split(",")} & PREFLIGHT_HEADERS
    return ", ".join(sorted(names | {"content-type"}))


def json_object(body: bytes) -> dict:
    """A request body that must be one JSON object; HTTPError(400) for anything else."""
    try:
        parsed = json.loads(body or b"null")
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested deeper than Python's stack
        raise HTTPError(400, "body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise HTTPError(400, "body must be a JSON object")
    return parsed


def error_message(status_code: int, exc_info: Any) -> str:
    if exc_info:
        exc = exc_info[1]
        if isinstance(exc, HTTPError):
            return exc.message
        if isinstance(exc, tornado.web.MissingArgumentError):
            return f"missing argument {exc.arg_name}"
        if isinstance(exc, StoreError):
            return STORE_DOWN
    if status_code == 401:
        return "unauthenticated"
    if status_code == 404:
        return "not found"
    if status_code == 405:
        return "method not allowed"
    if status_code >= 500:
        return "internal server error"
    return "bad request"


def current_identity(handler: tornado.web.RequestHandler, services: Services) -> Identity | None:
    """The identity in the session cookie, if valid and not revoked (shared with WebSockets)."""
    identity = services.tokens.decode(handler.get_cookie(COOKIE_NAME))
    if identity is None or services.store.refuses(identity):
        return None
    return identity
