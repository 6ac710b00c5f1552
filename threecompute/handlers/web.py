"""The built-in web workspace: `/` (the page), `/sign-in`, and its bundle under `/assets/`.

The page's sources live in `web/` and are built by esbuild into `web/dist/` (see
`web/build.mjs`): `index.html`, `manifest.json` and content-hashed files in `assets/`. A
hashed name never changes meaning, so assets are cached for a year (`immutable`); the HTML
is `no-cache`, so a rebuild is picked up at the next load. Assets are read and gzipped once,
into memory (the bundle is a few hundred KiB), when the manifest changes.
"""

from __future__ import annotations

import gzip
import json
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from tornado.escape import xhtml_escape

from .base import BaseHandler, HTTPError

DIST = Path(__file__).resolve().parents[2] / "web" / "dist"
SIGN_IN_ERRORS = {"email_not_verified": "Your Google account's email address is not verified."}
IMMUTABLE = "public, max-age=31536000, immutable"
COMPRESSIBLE = (".js", ".css", ".html", ".json", ".svg", ".map", ".txt")


def page_policy(host: str) -> str:
    """No inline script, nothing from elsewhere. Inline styles are allowed: xterm.js and
    CodeMirror set element styles and add `<style>` rules at run time."""
    return ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            f"img-src 'self' data: blob:; connect-src 'self' ws://{host} wss://{host}; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@dataclass
class Asset:
    body: bytes
    gzipped: bytes | None
    media_type: str


@dataclass
class Bundle:
    """What `web/dist` holds, reloaded when its manifest changes (a rebuild)."""

    folder: Path
    stamp: float = -1.0
    index: bytes | None = None
    manifest: dict[str, str] = field(default_factory=dict)
    assets: dict[str, Asset] = field(default_factory=dict)

    def current(self) -> Bundle:
        try:
            stamp = (self.folder / "manifest.json").stat().st_mtime
        except OSError:
            stamp = -1.0
        if stamp != self.stamp:
            self._load(stamp)
        return self

    def _load(self, stamp: float) -> None:
        self.stamp, self.index, self.manifest, self.assets = stamp, None, {}, {}
        if stamp < 0:
            return
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.index = (self.folder / "index.html").read_bytes()
        for path in (self.folder / "assets").iterdir():
            body = path.read_bytes()
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if media.startswith("text/") or media == "application/javascript":
                media += "; charset=utf-8"
            packed = gzip.compress(body, 9, mtime=0) if path.name.endswith(COMPRESSIBLE) else None
            self.assets[path.name] = Asset(body, packed, media)


class WebHandler(BaseHandler):
    bundle: Bundle

    def initialize(self, services, bundle: Bundle) -> None:  # noqa: ANN001 - BaseHandler's
        super().initialize(services)
        self.bundle = bundle

    def page(self, body: bytes) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Security-Policy", page_policy(self.request.host))
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")
        self.send(body, None)

    def send(self, body: bytes, gzipped: bytes | None) -> None:
        self.add_header("Vary", "Accept-Encoding")
        if gzipped is not None and "gzip" in self.request.headers.get("Accept-Encoding", ""):
            self.set_header("Content-Encoding", "gzip")
            body = gzipped
        self.finish(body)


class IndexHandler(WebHandler):
    """`/`: the workspace for a signed-in browser; JSON for API clients that ask for it."""

    def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if "application/json" in accept and "text/html" not in accept:
            self.answer({"service": "3compute", "status": "/healthz"})
            return
        if self.current_user is None:
            self.redirect("/sign-in")
            return
        bundle = self.bundle.current()
        if bundle.index is None:
            self.set_status(503)
            self.page(b"<!doctype html><title>3Compute</title><p>The web workspace is not built: "
                      b"run <code>make web</code> and reload.</p>")
            return
        self.page(bundle.index)


class SignInHandler(WebHandler):
    """`/sign-in`: a dev form (`--dev`) or the provider's button; no script at all."""

    def get(self) -> None:
        dev = self.services.settings.dev
        css = self.bundle.current().manifest.get("app.css")
        error = SIGN_IN_ERRORS.get(self.get_query_argument("error", ""), "")
        self.page(sign_in_page(dev, f"/{css}" if css else None, error).encode())


def sign_in_page(dev: bool, css: str | None, error: str) -> str:
    if dev:
        action = """<form class="signin-form" method="get" action="/auth/dev-login">
  <label for="email">Email</label>
  <input id="email" name="email" type="email" required autocomplete="email" autofocus
         placeholder="you@example.com">
  <input type="hidden" name="next" value="/">
  <button type="submit">Sign in (development)</button>
</form>"""
    else:
        action = '<a class="button google" href="/auth/login?next=/">Sign in with Google</a>'
    notice = f'<p class="signin-error" role="alert">{xhtml_escape(error)}</p>' if error else ""
    style = f'<link rel="stylesheet" href="{css}">' if css else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · 3Compute</title><link rel="icon" href="data:,">{style}</head>
<body class="signin"><main class="signin-card">
<h1>3Compute</h1><p>A Linux workspace in your browser.</p>{notice}
{action}
</main></body></html>
"""


class AssetHandler(WebHandler):
    """`/assets/<hashed name>`: cached for a year, gzipped when the client takes it."""

    def get(self, name: str) -> None:
        asset = self.bundle.current().assets.get(name)
        if asset is None or os.sep in name:
            raise HTTPError(404, "not found")
        self.set_header("Content-Type", asset.media_type)
        self.set_header("Cache-Control", IMMUTABLE)
        self.send(asset.body, asset.gzipped)


def web_routes(services, folder: Path = DIST) -> list[tuple[str, type, dict]]:  # noqa: ANN001
    bundle = Bundle(folder)
    args = {"services": services, "bundle": bundle}
    return [(r"/", IndexHandler, args), (r"/sign-in", SignInHandler, args), (r"/assets/([^/]+)", AssetHandler, args)]
