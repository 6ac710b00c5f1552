"""The frontend's own calls, made by a page in headless Chromium (Debian's, driven by
Playwright) served from another loopback origin: saving a file with a credentialed PUT, an
SVG in <img>, an SVG with a script opened as a page, and a Socket.IO tab re-attached after a
page reload, its screen read with pyte."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyte
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from playwright import async_api as playwright_api

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
# The frontend's terminal calls, on a bare WebSocket: Engine.IO 4 / Socket.IO 5 framing, as
# socket.io-client sends it once upgraded (no client library ships with the test suite).
PAGE = """<!doctype html><title>frontend</title><body>frontend<script>
window.out = ''; window.errors = [];
function openTab(server, tabId, rows, cols) {
  return new Promise((ready, failed) => {
    const ws = new WebSocket(server.replace('http', 'ws') + '/socket.io/?EIO=4&transport=websocket&tabId=' + tabId);
    window.tab = ws;
    ws.onerror = () => failed('websocket error');
    ws.onmessage = ({data}) => {
      if (data[0] === '0') ws.send('40');
      else if (data === '2') ws.send('3');
      else if (data.startsWith('40')) { ws.send('42' + JSON.stringify(['resize', {cols, rows}])); ready(); }
      else if (data.startsWith('42')) {
        const [name, body] = JSON.parse(data.slice(2));
        if (name === 'pty-output') window.out += body.output; else window.errors.push(body.message);
      }
    };
  });
}
function typeIn(text) { window.tab.send('42' + JSON.stringify(['pty-input', {input: text}])); }
</script></body>"""
ROWS, COLS = 30, 110
MARKER = "earlier-output-42"
RELOADS = 10



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
    answer = await page.goto(f"{server}/auth/dev-login?email={EMAIL}&next=/auth/me")
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


async def screen_shows(page, within: float) -> tuple[bool, str]:
    """Whether the page's output, read as xterm.js would show it, has the marker and a prompt."""
    deadline = time.monotonic() + within
    while True:
        screen = pyte.Screen(COLS, ROWS)
        pyte.Stream(screen).feed(await page.evaluate("window.out"))
        prompt = screen.display[screen.cursor.y][: screen.cursor.x].strip()
        if any(MARKER in line for line in screen.display) and prompt.endswith(("$", "#")):
            return True, ""
        if time.monotonic() >= deadline:
            return False, "\n".join(line.rstrip() for line in screen.display if line.strip())
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=180)
@pytest.mark.parametrize("server_flags", [
    ["--dev", "--backend", "local", "--host", "127.0.0.1"],
    pytest.param(["--dev", "--backend", "docker", "--host", "127.0.0.1"], marks=pytest.mark.docker),
], ids=["local", "docker"])
async def test_a_socketio_tab_reattached_after_a_reload_shows_its_screen(server, page_origin, page_server,
                                                                         tmp_path, services):
    async with chromium(tmp_path) as browser:
        page = await signed_in_page(browser, server, page_origin)
        await page.evaluate("([s, rows, cols]) => openTab(s, '1', rows, cols)", [server, ROWS, COLS])
        await page.evaluate("typeIn('clear; echo earlier-output-$((6*7))\\r')")
        shown, screen = await screen_shows(page, 30)
        assert shown, screen
        for reload in range(RELOADS):
            await page.reload()
            await page.evaluate("([s, rows, cols]) => openTab(s, '1', rows, cols)", [server, ROWS, COLS])
            shown, screen = await screen_shows(page, 1.0)
            assert shown, f"reload {reload}: after 1 s the screen shows only:\n{screen}"
            assert await page.evaluate("window.errors") == []
