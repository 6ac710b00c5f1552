"""Sign-in, sign-out and the small per-user records: /auth/* (and the short Flask-era paths)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

from tornado.ioloop import IOLoop

from ..containers.backend import TAB_ID
from ..identity import COOKIE_NAME, EmailNotVerified, SignInError
from ..store import NoPortsLeft
from .base import BaseHandler, HTTPError

log = logging.getLogger("threecompute.auth")

STATE_COOKIE = "3compute_oauth_state"
NEXT_COOKIE = "3compute_oauth_next"  # where the callback goes when sign-in began at this server's page
MAX_TABS = 50
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


class SessionCookieMixin(BaseHandler):
    def start_session(self, user_id: str, email: str) -> None:
        settings = self.services.settings
        self.set_cookie(
            COOKIE_NAME,
            self.services.tokens.issue(user_id, email),
            expires_days=settings.session_days,
            httponly=True,
            samesite="Lax",
            secure=settings.secure_cookies,
        )

    async def sign_in(self, user_id: str, email: str, method: str) -> None:
        await self.services.store.record_login(user_id, email, self.client_ip())
        await self.in_executor(self.services.workspaces.for_user, user_id)
        self.start_session(user_id, email)
        self.services.metrics.sign_ins.labels(method).inc()


class SignInHandler(SessionCookieMixin):
    """The sign-in paths: rate-limited per client IP (each may reach the provider and the store)."""

    def prepare(self) -> None:
        super().prepare()
        self.limit("signin", self.client_ip())


class LoginHandler(SignInHandler):
    def get(self) -> None:
        url, state = self.services.oauth.authorization_url()
        self.set_cookie(STATE_COOKIE, state, expires_days=1 / 144, httponly=True, samesite="Lax",
                        secure=self.services.settings.secure_cookies)
        next_path = self.get_query_argument("next", "")
        if next_path:
            self.set_cookie(NEXT_COOKIE, safe_next_path(next_path), expires_days=1 / 144, httponly=True,
                            samesite="Lax", secure=self.services.settings.secure_cookies)
        elif self.get_cookie(NEXT_COOKIE) is not None:
            self.clear_cookie(NEXT_COOKIE, httponly=True, samesite="Lax",
                              secure=self.services.settings.secure_cookies)
        self.redirect(url)


class CallbackHandler(SignInHandler):
    async def get(self) -> None:
        expected = self.get_cookie(STATE_COOKIE) or ""
        state = self.get_query_argument("state", "")
        if not expected or not hmac.compare_digest(state.encode(), expected.encode()):
            raise HTTPError(400, "sign-in state is missing or does not match")
        code = self.get_query_argument("code", "")
        if not code:
            raise HTTPError(400, "sign-in code is missing")
        secure = self.services.settings.secure_cookies
        self.clear_cookie(STATE_COOKIE, httponly=True, samesite="Lax", secure=secure)
        next_path = self.get_cookie(NEXT_COOKIE)
        if next_path is not None:
            self.clear_cookie(NEXT_COOKIE, httponly=True, samesite="Lax", secure=secure)
        frontend = self.services.settings.frontend_origin
        try:
            profile = await IOLoop.current().run_in_executor(None, self.services.oauth.finish, code)
        except EmailNotVerified:
            self.redirect("/sign-in?error=email_not_verified" if next_path
                          else f"{frontend}/login?error=email_not_verified")
            return
        except SignInError as exc:
            raise HTTPError(400, str(exc)) from None
        try:
            await self.sign_in(profile.user_id, profile.email, "oauth")
        except NoPortsLeft as exc:
            log.warning("sign-in of %s refused: %s", profile.email, exc)
            self.redirect(f"{frontend}/login?error=no_ports_left")
            return
        # Sign-in from the built-in workspace returns there; otherwise to the frontend.
        self.redirect(safe_next_path(next_path) if next_path else f"{frontend}/")


class DevLoginHandler(SignInHandler):
    async def get(self) -> None:
        if not self.services.settings.dev:
            raise HTTPError(404, "not found")
        email = self.get_query_argument("email", "").strip().lower()
        if not EMAIL.match(email):
            raise HTTPError(400, "email must be an address like student@example.com")
        await self.sign_in(dev_user_id(email), email, "dev")
        self.redirect(safe_next_path(self.get_query_argument("next", "/")))


def dev_user_id(email: str) -> str:
    """A stable id for a dev-login address, shaped like a provider id (alphanumeric)."""
    return "dev" + hashlib.sha256(email.encode()).hexdigest()[:20]


def safe_next_path(candidate: str) -> str:
    """Only paths on this server: no scheme, no host, no `//` or backslash tricks."""
    plain = not any(ord(ch) < 32 or ch == "\\" for ch in candidate)
    return candidate if plain and candidate.startswith("/") and not candidate.startswith("//") else "/"


class LogoutHandler(BaseHandler):
    async def get(self) -> None:
        identity = self.current_user
        if identity is not None:
            await self.services.store.revoke(identity.jti, identity.expires_at)
        self.clear_cookie(COOKIE_NAME)
        self.answer({"success": True})

    post = get


class MeHandler(BaseHandler):
    async def get(self) -> None:
        user = await self.require_user()
        self.answer({"email": user.email, "port_start": user.port_start, "port_end": user.port_end})


class UsersHandler(BaseHandler):
    async def get(self) -> None:
        identity = self.require_identity()
        if identity.email.lower() not in self.services.settings.admin_emails:
            raise HTTPError(403, "admins only")
        users = await self.services.store.list_users()
        self.answer({"users": [u.to_json() for u in users]})


class TabsHandler(BaseHandler):
    async def get(self) -> None:
        user = await self.require_user()
        self.answer({"tabs": user.tabs, "active_tab": user.active_tab})

    async def post(self) -> None:
        self.limit("tabs", self.require_identity().user_id)  # 401, then 429, before any complaint about the body
        tabs, active_tab = parse_tabs(self.json_body())
        user = await self.require_user()
        await self.services.store.save_tabs(user.id, tabs, active_tab)
        self.answer({"success": True})


def parse_tabs(body: dict) -> tuple[list[str], str]:
    tabs, active_tab = body.get("tabs"), body.get("active_tab")
    if not isinstance(tabs, list) or not tabs:
        raise HTTPError(400, "tabs must be a non-empty list of tab ids")
    if len(tabs) > MAX_TABS:
        raise HTTPError(400, f"at most {MAX_TABS} tabs")
    for tab in tabs:
        if not isinstance(tab, str) or not TAB_ID.match(tab):
            raise HTTPError(400, "each tab id must be 1-32 letters or digits")
    if len(set(tabs)) != len(tabs):
        raise HTTPError(400, "tab ids must be unique")
    if not isinstance(active_tab, str) or active_tab not in tabs:
        raise HTTPError(400, "active_tab must be one of tabs")
    return tabs, active_tab
