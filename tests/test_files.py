"""The file API over real HTTP on loopback, against a real workspace folder."""

from __future__ import annotations

import gc
import os
import urllib.parse
import uuid
import weakref
from pathlib import Path

import pytest

from threecompute.handlers.auth import dev_user_id
from threecompute.handlers.files import FILE_CSP

from .conftest import FRONTEND, Client, body_json

EMAIL = "files@example.com"


@pytest.fixture
def workspace(data_dir: Path) -> Path:
    return data_dir / "workspaces" / dev_user_id(EMAIL)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspaces that no request may touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("top secret")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, content in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


async def upload(client: Client, path: str, files, fields=None):
    content_type, body = multipart(files, fields)
    return await client.fetch(path, "POST", body, headers={"Content-Type": content_type})


@pytest.mark.gen_test
async def test_every_file_endpoint_needs_a_session(client):
    for method, path in [("GET", "/list-files"), ("POST", "/upload"), ("POST", "/upload-folder"),
                         ("POST", "/move"), ("GET", "/file/a"), ("PUT", "/file/a"), ("POST", "/file/a"),
                         ("DELETE", "/file/a")]:
        answer = await client.fetch(path, method)
        assert answer.code == 401, (method, path, answer.body)
        assert body_json(answer) == {"error": "unauthenticated"}


@pytest.mark.gen_test
async def test_an_idle_user_is_let_go_and_served_again_as_before(client, services, workspace):
    await client.dev_login(EMAIL)
    assert (await client.fetch("/file/kept.txt", "PUT", "x")).code == 200
    assert body_json(await client.fetch("/list-files"))["files"] == ["kept.txt"]
    handle = weakref.ref(services.workspaces.loaded(dev_user_id(EMAIL)))
    services.forget_idle()
    services.forget_idle()  # a whole period without a request
    gc.collect()
    assert handle() is None, "the workspace handle and its cached listing are let go"
    assert body_json(await client.fetch("/list-files"))["files"] == ["kept.txt"], "the same cookie, the same files"
    assert services.workspaces.loaded(dev_user_id(EMAIL)) is not None


@pytest.mark.gen_test
async def test_write_read_list_delete_round_trip(client, workspace):
    await client.dev_login(EMAIL)
    content = bytes(range(256)) * 40  # binary, not UTF-8
    assert (await client.fetch("/file/bin/data.bin", "PUT", content)).code == 404  # parent missing
    assert (await client.fetch("/file/bin/", "POST")).code == 200
    assert (await client.fetch("/file/bin/data.bin", "PUT", content)).code == 200
    read = await client.fetch("/file/bin/data.bin?download=1")
    assert read.code == 200 and read.body == content
    assert read.headers["X-Content-Type-Options"] == "nosniff"

    assert (await client.fetch("/file/hello.py", "POST")).code == 200
    assert (await client.fetch("/file/hello.py", "POST")).code == 400  # exists
    assert (await client.fetch("/file/hello.py/", "POST")).code == 409  # a file has that name
    assert (await client.fetch("/file/hello.py", "PUT", "print('hé')\n")).code == 200
    listing = body_json(await client.fetch("/list-files"))["files"]
    assert set(listing) == {"bin/", "bin/data.bin", "hello.py"}

    assert (await client.fetch("/file/bin", "DELETE")).code == 200
    assert (await client.fetch("/file/bin", "DELETE")).code == 404
    assert body_json(await client.fetch("/list-files"))["files"] == ["hello.py"]
    assert (await client.fetch("/file/nothing.txt")).code == 404
    assert (workspace / "hello.py").read_text() == "print('hé')\n"


@pytest.mark.gen_test
@pytest.mark.parametrize("name, content, media_type", [
    ("page.html", b"<script>alert(1)</script>", "text/plain; charset=utf-8"),
    ("img.svg", b"<svg onload=alert(1)></svg>", "image/svg+xml"),
    ("app.js", b"alert(1)", "text/plain; charset=utf-8"),
    ("data.json", b'{"a": 1}', "text/plain; charset=utf-8"),
    ("pic.png", b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "image/png"),
])
async def test_content_is_never_served_as_html_or_script(client, name, content, media_type):
    await client.dev_login(EMAIL)
    await client.fetch(f"/file/{name}", "PUT", content)
    answer = await client.fetch(f"/file/{name}")
    assert answer.code == 200 and answer.body == content
    assert answer.headers["Content-Type"] == media_type
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Content-Security-Policy"] == FILE_CSP  # no script runs in it as a page


@pytest.mark.gen_test
async def test_unknown_binary_is_an_attachment(client):
    await client.dev_login(EMAIL)
    await client.fetch("/file/blob.html", "PUT", b"\xff\xfe<html>" + bytes(range(256)))
    answer = await client.fetch("/file/blob.html")
    assert answer.headers["Content-Disposition"].startswith("attachment")
    assert answer.headers["Content-Security-Policy"] == FILE_CSP


@pytest.mark.gen_test
async def test_put_is_atomic_and_leaves_no_temp_files(client, workspace):
    await client.dev_login(EMAIL)
    await client.fetch("/file/a.txt", "PUT", "old")
    big = b"x" * (3 * 1024 * 1024)
    assert (await client.fetch("/file/a.txt", "PUT", big)).code == 200
    assert (workspace / "a.txt").read_bytes() == big
    assert sorted(os.listdir(workspace)) == ["a.txt"]


@pytest.mark.gen_test
async def test_files_written_through_the_api_belong_to_the_container_user(client, workspace):
    if os.geteuid() != 0:
        pytest.skip("ownership is only set when the server runs as root")
    await client.dev_login(EMAIL)
    await client.fetch("/file/dir/", "POST")
    await client.fetch("/file/dir/f.txt", "PUT", "x")
    await upload(client, "/upload-folder", [("deep/er/g.txt", b"g")])
    for path in ("dir", "dir/f.txt", "deep", "deep/er", "deep/er/g.txt"):
        st = (workspace / path).stat()
        assert (st.st_uid, st.st_gid) == (999, 995), path


@pytest.mark.gen_test
async def test_upload_saves_base_names_at_the_root(client, workspace):
    await client.dev_login(EMAIL)
    answer = await upload(client, "/upload", [("a.txt", b"A"), ("sub/dir/b.txt", b"B"), ("C:\\fake\\c.txt", b"C")])
    assert answer.code == 200, answer.body
    assert snapshot(workspace) == {"a.txt": b"A", "b.txt": b"B", "c.txt": b"C"}


@pytest.mark.gen_test
async def test_upload_errors_change_nothing(client, workspace):
    await client.dev_login(EMAIL)
    before = snapshot(workspace)
    assert (await upload(client, "/upload", [])).code == 400
    assert (await client.fetch("/upload", "POST", b"x", headers={"Content-Type": "text/plain"})).code == 400
    content_type, body = multipart([("a.txt", b"A" * 1000)])
    truncated = await client.fetch("/upload", "POST", body[:500], headers={"Content-Type": content_type})
    assert truncated.code == 400
    bad_name = await upload(client, "/upload-folder", [("ok.txt", b"ok"), ("../escape.txt", b"bad")])
    assert bad_name.code == 400
    assert snapshot(workspace) == before
    assert not (workspace.parent / "escape.txt").exists()


@pytest.mark.gen_test
async def test_upload_folder_keeps_relative_paths(client, workspace):
    await client.dev_login(EMAIL)
    answer = await upload(client, "/upload-folder", [("proj/main.py", b"print(1)"), ("proj/lib/util.py", b"x=1")],
                          {"move-into": "proj"})
    assert answer.code == 200, answer.body
    assert snapshot(workspace) == {"proj": b"<dir>", "proj/lib": b"<dir>", "proj/lib/util.py": b"x=1",
                                   "proj/main.py": b"print(1)"}


@pytest.mark.gen_test
async def test_move_cases(client, workspace):
    await client.dev_login(EMAIL)
    await client.fetch("/file/a.txt", "PUT", "A")
    await client.fetch("/file/b.txt", "PUT", "B")
    await client.fetch("/file/dir/", "POST")

    async def move(body):
        return await client.fetch("/move", "POST", body)

    assert (await move({"source": "a.txt", "destination": "new/deep/a.txt"})).code == 200
    assert (workspace / "new/deep/a.txt").read_text() == "A"
    assert (await move({"source": "missing", "destination": "x"})).code == 404
    assert (await move({"source": "b.txt", "destination": "new/deep/a.txt"})).code == 409
    assert (await move({"source": "b.txt", "destination": "new/deep/a.txt", "overwrite": True})).code == 200
    assert (workspace / "new/deep/a.txt").read_text() == "B"
    assert (await move({"source": "dir", "destination": "dir/inner"})).code == 400
    for bad in [{"source": "dir"}, {"destination": "x"}, {"source": "", "destination": "x"},
                {"source": 1, "destination": "x"}, {"source": "dir", "destination": "x", "overwrite": "yes"}]:
        answer = await move(bad)
        assert answer.code == 400, (bad, answer.body)
    malformed = await client.fetch("/move", "POST", b"{nope", headers={"Content-Type": "application/json"})
    assert malformed.code == 400 and "JSON" in body_json(malformed)["error"]
    assert snapshot(workspace) == {"dir": b"<dir>", "new": b"<dir>", "new/deep": b"<dir>", "new/deep/a.txt": b"B"}


TRAVERSALS = [
    "../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt", "a/../../secret.txt",
    "..%5csecret.txt", "a%5c..%5c..%5csecret.txt", "a%00b", "..", "%2e%2e", "....//secret.txt/..",
]


@pytest.mark.gen_test
async def test_traversal_in_every_encoding_touches_nothing(client, workspace, data_dir):
    await client.dev_login(EMAIL)
    victim = data_dir / "workspaces" / "secret.txt"
    victim.write_text("other")
    await client.fetch("/file/mine.txt", "PUT", "mine")
    before = snapshot(data_dir)
    for path in TRAVERSALS:
        for method, body in [("GET", None), ("PUT", "pwned"), ("POST", None), ("DELETE", None)]:
            answer = await client.fetch(f"/file/{path}", method, body)
            assert answer.code in (400, 404), (method, path, answer.code, answer.body)
            assert "error" in body_json(answer)
        moved = await client.fetch("/move", "POST", {"source": "mine.txt", "destination": urllib.parse.unquote(path)})
        assert moved.code in (400, 404), (path, moved.body)
    for absolute in ("/etc/passwd", "//etc/passwd"):
        answer = await client.fetch(f"/file/{absolute}")
        assert answer.code in (400, 404)  # a leading / means the workspace root
    moved = await client.fetch("/move", "POST", {"source": "/etc/passwd", "destination": "p"})
    assert moved.code in (400, 404)
    assert snapshot(data_dir) == before


@pytest.mark.gen_test
async def test_symlinks_out_of_the_workspace_are_refused(client, workspace, outside):
    await client.dev_login(EMAIL)
    await client.fetch("/file/mine.txt", "PUT", "mine")
    os.symlink(outside, workspace / "outdir")
    os.symlink(outside / "secret.txt", workspace / "outfile")
    before = snapshot(outside)

    listing = body_json(await client.fetch("/list-files"))["files"]
    assert not any("secret" in entry for entry in listing), listing
    attempts = [
        ("GET", "/file/outfile", None), ("GET", "/file/outdir/secret.txt", None),
        ("PUT", "/file/outfile", "pwned"), ("PUT", "/file/outdir/secret.txt", "pwned"),
        ("PUT", "/file/outdir/new.txt", "pwned"), ("POST", "/file/outdir/new.txt", None),
        ("POST", "/file/outdir/newdir/", None), ("DELETE", "/file/outdir/secret.txt", None),
        ("DELETE", "/file/outdir", None), ("DELETE", "/file/outfile", None),
    ]
    for method, path, body in attempts:
        answer = await client.fetch(path, method, body)
        assert answer.code in (400, 404), (method, path, answer.code, answer.body)
    for move in [{"source": "outfile", "destination": "stolen.txt"},
                 {"source": "outdir/secret.txt", "destination": "stolen.txt"},
                 {"source": "mine.txt", "destination": "outdir/mine.txt"},
                 {"source": "mine.txt", "destination": "outfile", "overwrite": True}]:
        answer = await client.fetch("/move", "POST", move)
        assert answer.code in (400, 404), (move, answer.body)
    content_type, body = multipart([("outdir/up.txt", b"pwned")])
    assert (await client.fetch("/upload-folder", "POST", body, headers={"Content-Type": content_type})).code == 400
    assert snapshot(outside) == before
    assert (workspace / "mine.txt").read_text() == "mine"


@pytest.mark.gen_test
async def test_symlinks_inside_the_workspace_work(client, workspace):
    await client.dev_login(EMAIL)
    await client.fetch("/file/real.txt", "PUT", "real")
    os.symlink("real.txt", workspace / "alias.txt")
    answer = await client.fetch("/file/alias.txt")
    assert answer.code == 200 and answer.body == b"real"


@pytest.mark.gen_test
async def test_users_cannot_see_each_others_files(client, make_client):
    await client.dev_login(EMAIL)
    await client.fetch("/file/private.txt", "PUT", "mine")
    other = make_client()
    await other.dev_login("other@example.com")
    assert body_json(await other.fetch("/list-files"))["files"] == []
    assert (await other.fetch("/file/private.txt")).code == 404


@pytest.mark.gen_test
async def test_unsafe_methods_from_a_foreign_origin_are_refused(client, workspace):
    await client.dev_login(EMAIL)
    evil = {"Origin": "https://evil.example"}
    assert (await client.fetch("/file/x.txt", "PUT", "x", headers=evil)).code == 403
    assert (await client.fetch("/file/x.txt", "POST", headers=evil)).code == 403
    assert (await client.fetch("/move", "POST", {"source": "a", "destination": "b"}, headers=evil)).code == 403
    assert (await client.fetch("/auth/tabs", "POST", {"tabs": ["1"], "active_tab": "1"}, headers=evil)).code == 403
    assert (await upload_with_origin(client, "https://evil.example")).code == 403
    assert not (workspace / "x.txt").exists()
    assert (await client.fetch("/file/x.txt", "PUT", "x", headers={"Origin": FRONTEND})).code == 200
    own = f"http://{client.base_url.split('://')[1]}"
    assert (await client.fetch("/file/y.txt", "PUT", "y", headers={"Origin": own})).code == 200


async def upload_with_origin(client: Client, origin: str):
    content_type, body = multipart([("a.txt", b"A")])
    return await client.fetch("/upload", "POST", body, headers={"Content-Type": content_type, "Origin": origin})


@pytest.mark.gen_test
async def test_cors_allows_only_the_frontend_with_credentials(client):
    await client.dev_login(EMAIL)
    ok = await client.fetch("/list-files", headers={"Origin": FRONTEND})
    assert ok.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    foreign = await client.fetch("/list-files", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in foreign.headers
    preflight = await client.fetch("/file/a.txt", "OPTIONS", headers={
        "Origin": FRONTEND, "Access-Control-Request-Method": "PUT"})
    assert preflight.code == 204
    assert "PUT" in preflight.headers["Access-Control-Allow-Methods"]
