"""DATA_DIR on a small tmpfs made for the test, filled up: every write answers 507 and leaves
no partial or temporary file, reads keep working, and everything works again once space is
freed. Needs root (mount)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import body_json

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
DISK_FULL = {"error": "no space left on the server's disk"}


@contextlib.contextmanager
def small_tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)  # still busy: detach it anyway


@pytest.fixture
def tmpfs_options() -> str:
    return "size=4m"


@pytest.fixture
def data_dir(tmp_path, tmpfs_options) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "data", tmpfs_options) as mounted:
        yield mounted


def fill(folder: Path) -> Path:
    """Take every free block of `folder`'s filesystem; removing the file frees them."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            with contextlib.suppress(OSError):
                out.truncate(out.tell())  # whatever the buffer still held is dropped
    return filler


def fill_inodes(folder: Path) -> Path:
    many = folder / "inodes"
    many.mkdir()
    with contextlib.suppress(OSError):
        for i in range(100_000):
            (many / str(i)).touch()
    return many


def leftovers(workspace: Path) -> list[str]:
    return sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*") if ".3compute-" in p.name)


def files_in(workspace: Path) -> list[str]:
    return sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*") if not p.is_dir())


def multipart(files: dict[str, bytes], boundary: str = "diskfullboundary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'
                    .encode() + data + b"\r\n" for name, data in files.items()) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.gen_test(timeout=60)
async def test_a_full_disk_refuses_writes_keeps_reads_and_recovers(client, make_client, data_dir, services):
    await client.dev_login("ann@example.com")
    assert (await client.fetch("/file/notes.txt", "PUT", b"the old notes")).code == 200
    assert (await client.fetch("/tabs", "POST", {"tabs": ["1", "2"], "active_tab": "2"})).code == 200
    workspace = next((data_dir / "workspaces").iterdir())
    filler = fill(data_dir)

    big = os.urandom(1024 * 1024)
    for answer in (await client.fetch("/file/notes.txt", "PUT", big),
                   await client.fetch("/file/new.bin", "PUT", big),
                   await client.fetch("/upload", "POST", *multipart({"a.txt": b"small", "b.bin": big})),
                   await client.fetch("/upload-folder", "POST", *multipart({"d/a.txt": b"small", "d/b.bin": big}))):
        assert (answer.code, body_json(answer)) == (507, DISK_FULL)
    tabs = await client.fetch("/tabs", "POST", {"tabs": ["1", "2", "3"], "active_tab": "3"})
    assert (tabs.code, body_json(tabs)) == (507, DISK_FULL)
    newcomer = await make_client().fetch("/auth/dev-login?email=bob@example.com")
    assert (newcomer.code, body_json(newcomer)) == (507, DISK_FULL)

    # Nothing half-written, nothing left behind, the old content intact, reads still work.
    assert leftovers(workspace) == []
    assert files_in(workspace) == ["notes.txt"]
    assert (await client.fetch("/file/notes.txt")).body == b"the old notes"
    assert body_json(await client.fetch("/list-files")) == {"files": ["notes.txt"]}  # the failed upload's folder too
    assert body_json(await client.fetch("/tabs")) == {"tabs": ["1", "2"], "active_tab": "2"}
    assert (await client.fetch("/healthz")).code == 200
    assert [u.email for u in await services.store.list_users()] == ["ann@example.com"]

    filler.unlink()  # space is back: so is every write
    assert (await client.fetch("/file/notes.txt", "PUT", big)).code == 200
    assert (await client.fetch("/file/notes.txt")).body == big
    assert (await client.fetch("/upload", "POST", *multipart({"a.txt": b"small"}))).code == 200
    assert (await client.fetch("/tabs", "POST", {"tabs": ["1", "2", "3"], "active_tab": "3"})).code == 200
    assert (await make_client().fetch("/auth/dev-login?email=bob@example.com")).code == 302
    assert leftovers(workspace) == []


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("tmpfs_options", ["size=4m,nr_inodes=400"])
async def test_no_inodes_left_refuses_create_and_upload(client, data_dir):
    await client.dev_login("ann@example.com")
    assert (await client.fetch("/file/keep.txt", "PUT", b"kept")).code == 200
    workspace = next((data_dir / "workspaces").iterdir())
    many = fill_inodes(data_dir)
    for answer in (await client.fetch("/file/empty.txt", "POST"),
                   await client.fetch("/file/folder/", "POST"),
                   await client.fetch("/file/keep.txt", "PUT", b"new"),
                   await client.fetch("/upload", "POST", *multipart({"a.txt": b"x"}))):
        assert (answer.code, body_json(answer)) == (507, DISK_FULL)
    assert files_in(workspace) == ["keep.txt"]
    assert (await client.fetch("/file/keep.txt")).body == b"kept"
    for child in many.iterdir():
        child.unlink()
    assert (await client.fetch("/file/empty.txt", "POST")).code == 200
    assert (await client.fetch("/file/folder/", "POST")).code == 200
    assert body_json(await client.fetch("/list-files")) == {"files": ["empty.txt", "folder/", "keep.txt"]}
