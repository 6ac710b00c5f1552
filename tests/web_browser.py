"""Browser-test helpers for the web workspace: a server in its own process (so that it can be
restarted under a page), Debian's chromium driven by Playwright, and step screenshots that
are written to results/ only when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import free_port_block
from threecompute.containers import make_backend
from threecompute.settings import load_settings

from .conftest import ROOT, SECRET

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RESULTS = ROOT / "results" / "web"


def require_browser() -> None:
    """Skip where chromium, Playwright or the bundle is missing; fail under REQUIRE_BROWSER=1."""
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("playwright is not installed (requirements-dev.txt)")
    if not (ROOT / "web" / "dist" / "manifest.json").exists():
        problems.append("the web workspace is not built (make web)")
    if problems:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`server.py --dev` on a free loopback port and a temporary DATA_DIR, restartable."""

    def __init__(self, backend: str, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.flags = ["--dev", "--backend", backend, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {
            "FLASK_SECRET": SECRET,  # fixed: a restart keeps the browser's session valid
            "DATA_DIR": str(data_dir),
            "PORT_BASE": str(free_port_block(10 * 5)),
            "FRONTEND_ORIGIN_DEV": "http://frontend.test:3000",
            "IDLE_TIMEOUT_SECONDS": "600",
        } | (env or {})
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "GOOGLE_", "DATA_DIR"))}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), *self.flags],
                                            env=base | self.env, cwd=self.log.parent, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.base_url + "/healthz", timeout=2).read()
                return
            time.sleep(0.1)
        raise AssertionError("server did not answer /healthz within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def purge(self) -> None:
        """Remove the tmux servers or containers this deployment made (they outlive the server)."""
        settings = load_settings(self.flags, self.env, dotenv=Path(os.devnull))
        asyncio.run(make_backend(settings).purge())

    def api(self, path: str, cookie: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path, data=body, method=method,
                                         headers={"Cookie": cookie})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


@contextlib.contextmanager
def running_server(backend: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    folder = Path(tempfile.mkdtemp(prefix="3c-web-"))
    server = ServerProcess(backend, folder / "data", env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.purge()
        shutil.rmtree(folder, ignore_errors=True)


class Steps:
    """Screenshots of each step, kept in memory and written to results/web/<test>/ on failure."""

    def __init__(self, page, name: str) -> None:  # noqa: ANN001 - a Playwright Page
        self.page = page
        self.name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self.shots: list[tuple[str, bytes]] = []
        self.prompt = ""

    def step(self, label: str) -> None:
        with contextlib.suppress(Exception):
            self.shots.append((label, self.page.screenshot()))

    def save(self, error: BaseException) -> Path:
        folder = RESULTS / self.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.step("failure")
        for n, (label, png) in enumerate(self.shots):
            (folder / f"{n:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', label)}.png").write_bytes(png)
        (folder / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
        return folder


@contextlib.contextmanager
def browser_page(name: str, width: int = 1280, height: int = 800, zoom: float = 1) -> Iterator[tuple[object, Steps]]:
    """A fresh headless chromium (own profile) and one page; screenshots saved if the body fails.

    `zoom` 2 is a 200 % page zoom: half the CSS pixels, each drawn twice as large."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="3c-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": int(width / zoom), "height": int(height / zoom)}, device_scale_factor=zoom,
            accept_downloads=True)
        page = context.pages[0] if context.pages else context.new_page()
        steps = Steps(page, name)
        # prompt() answers whatever the test put in steps.prompt; confirm() is accepted.
        page.on("dialog", lambda dialog: dialog.accept(steps.prompt) if dialog.type == "prompt"
                else dialog.accept())
        try:
            yield page, steps
        except BaseException as error:
            print("screenshots in", steps.save(error))
            raise
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def session_cookie(page) -> str:  # noqa: ANN001
    return "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())


def body_json(raw: bytes) -> dict:
    return json.loads(raw)
