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
from ..services import Services
from ..store import StoreError, StoreFull, User
from ..workspace import WorkspaceError

log = logging.getLogger("threecompute.http")
T = TypeVar("T")
MAX_JSON_BYTES = 64 * 1024
UNSAFE_METHODS = {"POST", "PUT", "DELETE", "PATCH"}


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


class BaseHandler(tornado.web.RequestHandler):
    services: Services

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
        self.check_origin_for_unsafe_method()

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
        limiter = self.services.limits[kind]
        wait = limiter.take(key)
        if wait > 0:
            if limiter.worth_reporting(key):
                log.warning("rate limit %s (%s) reached by %s: %s %s answered 429",
                            kind, limiter.rate, key, self.request.method, self.request.path)
            raise RateLimited(wait)

    def options(self, *args: Any) -> None:
        """CORS preflight: only the frontend origin gets an answer that allows anything."""
        if self.request.headers.get("Origin") == self.services.settings.frontend_origin:
            self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", "Content-Type")
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)

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

    # -- bodies and answers ---------------------------------------------------------------

    def json_body(self) -> dict:
        if len(self.request.body) > MAX_JSON_BYTES:
            raise HTTPError(413, f"body larger than {MAX_JSON_BYTES} bytes")
        return json_object(self.request.body)

    def answer(self, payload: dict | list, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload))

    async def in_executor(self, fn: Callable[..., T], *args: Any) -> T:
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
        original = e
        if isinstance(e, WorkspaceError):
            e = HTTPError(e.status, e.message)
        elif isinstance(e, BackendError):
            e = HTTPError(503, str(e))
        elif isinstance(e, StoreFull):
            log.error("store failure: %s", e)
            e = HTTPError(507, "no space left on the server's disk")
        elif isinstance(e, StoreError):
            log.error("store failure: %s", e)
            e = HTTPError(503, "the server's database is unavailable")
        if e is original:
            super()._handle_request_exception(e)
            return
        try:  # tornado answers from sys.exc_info(): make it the mapped error
            raise e from original
        except HTTPError:
            super()._handle_request_exception(e)


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
    if identity is None or services.store.is_revoked(identity.jti):
        return None
    return identity
