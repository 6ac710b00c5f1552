"""Who is calling: the session JWT in a cookie, and the OAuth2 sign-in that issues it.

The cookie holds an HS256 JWT (subject = the provider's user id, email, issued-at, expiry and
a random `jti` so that logout can revoke exactly this token; deleting a user revokes every
token of theirs issued until then). Anything that fails to verify
is simply no identity. The OAuth flow uses requests-oauthlib, which is blocking, so the
callback handler runs `OAuthClient.finish` in an executor.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import jwt
from requests_oauthlib import OAuth2Session

from .settings import Settings

COOKIE_NAME = "3compute_session"
SCOPES = ["openid", "email", "profile"]
HTTP_TIMEOUT_SECONDS = 10
# Tokens verified lately: a page polls every 300 ms with the same cookie, and checking its
# HMAC and claims anew each time was a third of a small request's cost.
VERIFIED_TOKENS_KEPT = 1024


@dataclass(frozen=True)
class Identity:
    user_id: str
    email: str
    jti: str
    expires_at: float


class TokenCodec:
    def __init__(self, secret: str, lifetime_seconds: float) -> None:
        self._secret = secret
        self.lifetime_seconds = lifetime_seconds
        # Only tokens that passed every check, in two generations: those used since the last
        # `forget_idle` and those used in the period before it. A token unused for a whole
        # period is forgotten, so the cache holds the people working now. Each generation holds
        # at most VERIFIED_TOKENS_KEPT.
        self._verified: dict[str, Identity] = {}
        self._verified_before: dict[str, Identity] = {}

    def issue(self, user_id: str, email: str) -> str:
        # To the millisecond: a user's tokens issued before a given moment can be told apart
        # from those issued just after it (see Store.revoke_user).
        now = round(time.time(), 3)
        claims = {
            "sub": user_id,
            "email": email,
            "iat": now,
            "exp": now + int(self.lifetime_seconds),
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def decode(self, token: str | None) -> Identity | None:
        """The identity in a valid token; None for anything expired, forged or malformed."""
        if not token:
            return None
        known = self._verified.get(token) or self._verified_before.pop(token, None)
        if known is not None:
            # Its signature and claims cannot change; only the clock moves (PyJWT: exp <= now fails).
            if time.time() >= known.expires_at:
                self._verified.pop(token, None)
                return None
            identity: Identity | None = known
        else:
            identity = self._verify(token)
        if identity is not None and token not in self._verified:  # on the IOLoop thread only: no lock
            if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[token] = identity
        return identity

    def forget_idle(self) -> None:
        """Start a new period: tokens not used since the previous call are forgotten."""
        self._verified_before, self._verified = self._verified, {}

    def _verify(self, token: str) -> Identity | None:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["sub", "exp", "iat", "jti"]}
            )
        except jwt.PyJWTError:
            return None
        sub, email, jti = claims.get("sub"), claims.get("email", ""), claims.get("jti")
        if not (isinstance(sub, str) and sub and isinstance(email, str) and isinstance(jti, str)):
            return None
        return Identity(user_id=sub, email=email, jti=jti, expires_at=float(claims["exp"]))


def is_loopback_http(url: str) -> bool:
    parsed = urlsplit(url)
    return parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost", "::1")


class SignInError(Exception):
    """The provider refused, failed, or sent something unusable."""


class EmailNotVerified(SignInError):
    pass


@dataclass(frozen=True)
class ProviderUser:
    user_id: str
    email: str


class OAuthClient:
    """The authorization-code flow against Google (or any provider with the same endpoints)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        if is_loopback_http(settings.oauth_token_url):
            # oauthlib refuses plain HTTP; a provider on this machine (a test double) has no TLS.
            os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"

    def _session(self, state: str | None = None) -> OAuth2Session:
        return OAuth2Session(
            self._settings.google_client_id,
            scope=SCOPES,
            redirect_uri=self._settings.redirect_uri,
            state=state,
        )

    def authorization_url(self) -> tuple[str, str]:
        """(url to send the browser to, state to remember in a cookie)."""
        url, state = self._session().authorization_url(
            self._settings.oauth_authorize_url, access_type="online", prompt="select_account"
        )
        return url, state

    def finish(self, code: str) -> ProviderUser:
        """Exchange the code and read the user's profile. Blocking: run in an executor.

        The caller has already compared `state` with the one it issued.
        """
        session = self._session()
        try:
            session.fetch_token(
                self._settings.oauth_token_url,
                client_secret=self._settings.google_client_secret,
                code=code,
                timeout=HTTP_TIMEOUT_SECONDS,
                include_client_id=True,
            )
            response = session.get(self._settings.oauth_userinfo_url, timeout=HTTP_TIMEOUT_SECONDS)
            response.raise_for_status()
            profile = response.json()
        except Exception as exc:  # oauthlib, requests and JSON errors all mean "sign-in failed"
            raise SignInError(f"sign-in with the provider failed: {type(exc).__name__}") from exc
        return self._profile_user(profile)

    @staticmethod
    def _profile_user(profile: object) -> ProviderUser:
        if not isinstance(profile, dict):
            raise SignInError("the provider sent an unusable profile")
        user_id = profile.get("sub") or profile.get("id")
        email = profile.get("email")
        if not (isinstance(user_id, str | int) and str(user_id) and isinstance(email, str) and email):
            raise SignInError("the provider's profile lacks an id or email")
        verified = profile.get("email_verified", profile.get("verified_email"))
        if verified is not True and str(verified).lower() != "true":
            raise EmailNotVerified(email)
        return ProviderUser(user_id=str(user_id), email=email.lower())
