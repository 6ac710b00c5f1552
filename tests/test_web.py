"""The web workspace's server side: `/`, `/sign-in`, the bundle's headers, `/download/`, the
`files-changed` frame; and the page's own logic (node --test web/test)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import subprocess
import zipfile

import pytest

from threecompute.handlers.web import DIST, sign_in_page

from .conftest import FRONTEND, ROOT, body_json
from .terminal_client import TerminalClient

needs_bundle = pytest.mark.skipif(not (DIST / "manifest.json").exists(), reason="web/dist not built (make web)")


@pytest.mark.gen_test
async def test_signed_out_browsers_go_to_sign_in_and_api_clients_get_json(client):
    answer = await client.fetch("/", headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert (answer.code, answer.headers["Location"]) == (302, "/sign-in")
    answer = await client.fetch("/", headers={"Accept": "application/json"})
    assert body_json(answer) == {"service": "3compute", "status": "/healthz"}
    page = await client.fetch("/sign-in")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'action="/auth/dev-login"' in page.body and b"<script" not in page.body


def test_the_sign_in_page_without_dev_offers_the_provider_only():
    page = sign_in_page(dev=False, css=None, error="<b>no</b>")
    assert 'href="/auth/login?next=/"' in page and "dev-login" not in page
    assert "&lt;b&gt;no&lt;/b&gt;" in page


@needs_bundle
@pytest.mark.gen_test
async def test_the_page_and_its_hashed_assets(client):
    await client.dev_login("web@example.com")
    page = await client.fetch("/", headers={"Accept": "text/html"})
    assert page.code == 200
    assert page.headers["Cache-Control"] == "no-cache"
    policy = page.headers["Content-Security-Policy"]
    script_src = next(part for part in policy.split(";") if part.strip().startswith("script-src"))
    assert script_src.split() == ["script-src", "'self'"], policy
    assert "<script>" not in page.body.decode()  # no inline script, only src=
    manifest = json.loads((DIST / "manifest.json").read_text())
    for name in manifest.values():
        assert f'"/{name}"' in page.body.decode()
        plain = await client.fetch("/" + name, headers={"Accept-Encoding": "identity"})
        packed = await client.fetch("/" + name, headers={"Accept-Encoding": "gzip"}, decompress_response=False)
        assert plain.code == packed.code == 200
        assert plain.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert packed.headers["Content-Encoding"] == "gzip" and "Content-Encoding" not in plain.headers
        assert gzip.decompress(packed.body) == plain.body == (DIST / name).read_bytes()
        assert len(packed.body) < len(plain.body) / 2
    assert (await client.fetch("/assets/nope-1234.js")).code == 404


@pytest.mark.gen_test
async def test_download_a_folder_as_zip_and_a_file_as_attachment(client, tmp_path):
    await client.dev_login("zip@example.com")
    assert (await client.fetch("/file/src/pkg/", method="POST")).code == 200
    await client.fetch("/file/src/pkg/a.py", method="PUT", body=b"print(1)\n")
    await client.fetch("/file/src/b.bin", method="PUT", body=bytes(range(256)) * 100)
    await client.fetch("/file/top.txt", method="PUT", body=b"top")
    workspace = next((tmp_path / "data" / "workspaces").iterdir())
    os.symlink("/etc/passwd", workspace / "src" / "leak")  # a link to outside is left out
    os.symlink("../top.txt", workspace / "src" / "inside")  # and so is a link to inside

    answer = await client.fetch("/download/src")
    assert answer.code == 200 and answer.headers["Content-Type"] == "application/zip"
    assert answer.headers["Content-Disposition"].startswith('attachment; filename="src.zip"')
    with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
        assert sorted(archive.namelist()) == ["b.bin", "pkg/", "pkg/a.py"]
        assert archive.read("pkg/a.py") == b"print(1)\n"
        assert archive.read("b.bin") == bytes(range(256)) * 100
    whole = await client.fetch("/download/")
    with zipfile.ZipFile(io.BytesIO(whole.body)) as archive:
        assert "top.txt" in archive.namelist() and "src/pkg/a.py" in archive.namelist()
    assert whole.headers["Content-Disposition"].startswith('attachment; filename="workspace.zip"')

    single = await client.fetch("/download/src/pkg/a.py")
    assert single.body == b"print(1)\n" and single.headers["Content-Disposition"].startswith("attachment")
    assert (await client.fetch("/download/missing")).code == 404
    assert (await client.fetch("/download/src/leak")).code == 400
    assert (await client.fetch("/download/../x")).code in (400, 404)
    client.cookies.clear()
    assert (await client.fetch("/download/src")).code == 401


async def next_files_changed(terminal: TerminalClient, timeout: float) -> bool:
    """Read frames until a files-changed one (True) or the timeout (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (remaining := deadline - loop.time()) > 0:
        try:
            frame = await terminal.read_frame(remaining)
        except TimeoutError:
            return False
        if frame is None:
            return False
        if frame["type"] == "files-changed":
            assert frame["data"] == {}
            return True
    return False


@pytest.mark.gen_test(timeout=60)
async def test_files_changed_after_api_writes_and_terminal_output(client):
    await client.dev_login("events@example.com")
    watching = await TerminalClient.open(client, query="tabId=1&events=files-changed")
    plain = await TerminalClient.open(client, query="tabId=2")
    try:
        await watching.run("echo ready-$((1+1))", "ready-2")
        await plain.run("echo ready-$((2+1))", "ready-3")
        await asyncio.sleep(2)  # let the debounced event of that output go by
        while await next_files_changed(watching, 0.2):
            pass

        await client.fetch("/file/made.txt", method="PUT", body=b"x")
        assert await next_files_changed(watching, 2), "no files-changed after PUT"
        await client.fetch("/move", method="POST", body={"source": "made.txt", "destination": "moved.txt"})
        assert await next_files_changed(watching, 2), "no files-changed after a move"
        refused = await client.fetch("/file/moved.txt", method="POST")  # exists: 400, nothing changed
        assert refused.code == 400
        assert not await next_files_changed(watching, 0.5), "files-changed after a refused write"

        await plain.type("touch from-terminal.txt\r")  # output in another tab of the same user
        assert await next_files_changed(watching, 5), "no files-changed after terminal output"
        assert "from-terminal.txt" in body_json(await client.fetch("/list-files"))["files"]
        # The other connection did not ask for the event and never gets one.
        assert not await next_files_changed(plain, 1)
    finally:
        watching.close()
        plain.close()


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (make web installs it)")
def test_the_pages_own_logic():
    result = subprocess.run(["node", "--test", "test/"], cwd=ROOT / "web", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


@pytest.mark.gen_test
async def test_google_sign_in_from_the_workspace_returns_to_it(client, provider):
    login = await client.fetch("/auth/login?next=/")
    authorize = await client.fetch(login.headers["Location"])
    callback = await client.fetch(authorize.headers["Location"])
    assert (callback.code, callback.headers["Location"]) == (302, "/")
    assert (await client.fetch("/auth/me")).code == 200
    # Without `next` (the React frontend's way) the callback still goes to the frontend.
    login = await client.fetch("/auth/login")
    authorize = await client.fetch(login.headers["Location"])
    callback = await client.fetch(authorize.headers["Location"])
    assert callback.headers["Location"] == f"{FRONTEND}/"
    # A foreign `next` is never followed.
    login = await client.fetch("/auth/login?next=//evil.example/")
    authorize = await client.fetch(login.headers["Location"])
    callback = await client.fetch(authorize.headers["Location"])
    assert callback.headers["Location"] == "/"
