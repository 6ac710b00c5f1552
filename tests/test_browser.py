"""The frontend's own calls, made by a page in headless Chromium (Debian's, driven by
Playwright) served from another loopback origin: saving a file with a credentialed PUT, an
SVG in <img>, and an SVG with a script opened as a page."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web

from threecompute.handlers.auth import dev_user_id

from . import conftest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EMAIL = "browser@example.com"
SHAPE = (b"<svg xmlns='http://www.w3.org/2000/svg' width='40' height='20'>"
         b"<rect width='40' height='20' fill='red'/></svg>")
SCRIPTED = (b"<svg xmlns='http://www.w3.org/2000/svg' width='40' height='20'>"
            b"<script>document.documentElement.setAttribute('data-ran', 'yes'); console.log('svg script ran')</script>"
            b"<rect width='40' height='20'/></svg>")
PAGE = "<!doctype html><title>frontend</title><body>frontend</body>"

playwright_api = pytest.importorskip("playwright.async_api")


@pytest.fixture(autouse=True)
def _chromium_available() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} missing (scripts/chromium.sh installs it)"
        if os.environ.get("REQUIRE_DOCKER") == "1":  # CI: every part of the suite must run
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def page_socket():
    """The frontend page's own origin: another port on loopback, bound before the settings."""
    sock, port = tornado.testing.bind_unused_port()
    yield sock, port


@pytest.fixture
def page_origin(page_socket) -> str:
    return f"http://127.0.0.1:{page_socket[1]}"


@pytest.fixture
def server_env(data_dir, provider, http_port, page_origin) -> dict[str, str]:
    return conftest.test_environ(data_dir, provider, http_port, FRONTEND_ORIGIN_DEV=page_origin)


@pytest.fixture
def server(http_server, http_port) -> str:
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def page_server(io_loop, page_socket):
    """Serves the page, and the scripted SVG without any policy (the control)."""

    class Page(tornado.web.RequestHandler):
        def get(self) -> None:
            self.finish(PAGE)

    class Unprotected(tornado.web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "image/svg+xml")
            self.finish(SCRIPTED)

    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", Page), (r"/plain.svg", Unprotected)]))
    server.add_sockets([page_socket[0]])
    yield
    server.stop()


@pytest.fixture
def workspace(data_dir: Path) -> Path:
    return data_dir / "workspaces" / dev_user_id(EMAIL)


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator:
    """Debian's Chromium, headless, on a fresh profile."""
    async with playwright_api.async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield context
        finally:
            await context.close()


async def signed_in_page(browser, server: str, page_origin: str):
    """A page of the frontend's origin, holding the server's session cookie."""
    page = browser.pages[0] if browser.pages else await browser.new_page()
    answer = await page.goto(f"{server}/auth/dev-login?email={EMAIL}")
    assert answer is not None and answer.ok, answer and answer.status
    await page.goto(page_origin + "/")
    return page


@pytest.mark.gen_test(timeout=120)
async def test_save_from_the_editor_changes_the_file(server, page_origin, page_server, tmp_path, workspace):
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "main.py").write_text("print('old')\n")
    async with chromium(tmp_path) as browser:
        page = await signed_in_page(browser, server, page_origin)
        result = await page.evaluate("""async (url) => {
            const answer = await fetch(url, {method: 'PUT', body: 'print("saved")\\n', credentials: 'include',
                                             headers: {'Content-Type': 'text/plain; charset=utf-8'}});
            return {status: answer.status, body: await answer.json()};
        }""", f"{server}/file/main.py")
        assert result == {"status": 200, "body": {"success": True}}, result
        assert (workspace / "main.py").read_text() == 'print("saved")\n'

        listed = await page.evaluate("""async (url) => (await fetch(url, {credentials: 'include'})).json()""",
                                     f"{server}/list-files")
        assert listed == {"files": ["main.py"]}


@pytest.mark.gen_test(timeout=120)
async def test_an_svg_renders_in_an_img(server, page_origin, page_server, tmp_path, workspace):
    async with chromium(tmp_path) as browser:
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "shape.svg").write_bytes(SHAPE)
        page = await signed_in_page(browser, server, page_origin)
        width = await page.evaluate("""(url) => new Promise((done) => {
            const img = new Image();
            img.onload = () => done(img.naturalWidth);
            img.onerror = () => done(-1);
            img.src = url;
            document.body.appendChild(img);
        })""", f"{server}/file/shape.svg")
        assert width == 40


@pytest.mark.gen_test(timeout=120)
async def test_an_svg_opened_as_a_page_runs_no_script(server, page_origin, page_server, tmp_path, workspace):
    async with chromium(tmp_path) as browser:
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "scripted.svg").write_bytes(SCRIPTED)
        page = await signed_in_page(browser, server, page_origin)
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))

        # The control: the same file without the policy runs its script, so the check can fail.
        await page.goto(f"{page_origin}/plain.svg")
        assert await page.evaluate("document.documentElement.getAttribute('data-ran')") == "yes"
        assert "svg script ran" in console
        console.clear()

        answer = await page.goto(f"{server}/file/scripted.svg")
        assert answer.status == 200 and answer.headers["content-type"] == "image/svg+xml"
        assert await page.evaluate("document.documentElement.localName") == "svg"  # it is shown as SVG
        assert await page.evaluate("document.documentElement.getAttribute('data-ran')") is None
        assert "svg script ran" not in console
        assert any("sandboxed" in line for line in console), console  # the policy is what stopped it
