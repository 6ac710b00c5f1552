"""WORKSPACE_QUOTA_MB: an upload, a PUT or an assignment copy that would pass it is answered
413 and writes nothing (both store engines)."""

from __future__ import annotations

import pytest

from threecompute.handlers.auth import dev_user_id

from .classroom_helpers import HIDDEN, ok, signed_in, teacher
from .conftest import body_json
from .test_files import upload

KB = 1024


@pytest.fixture
def database_url(any_database_url) -> str:
    return any_database_url


@pytest.fixture
def server_env(server_env) -> dict[str, str]:
    return server_env | {"WORKSPACE_QUOTA_MB": "1"}


def usage(data_dir, user_id: str) -> int:
    return sum(p.stat().st_size for p in (data_dir / "workspaces" / user_id).rglob("*") if p.is_file())


@pytest.mark.gen_test
async def test_put_and_upload_past_the_quota_are_refused_whole(make_client, data_dir):
    student = await signed_in(make_client, "q@example.com")
    user_id = dev_user_id("q@example.com")
    assert (await student.fetch("/file/a.bin", "PUT", b"a" * 600 * KB)).code in (200, 201)
    refused = await student.fetch("/file/b.bin", "PUT", b"b" * 600 * KB)
    assert refused.code == 413 and "quota" in body_json(refused)["error"]
    assert (await student.fetch("/file/b.bin")).code == 404
    # Replacing a file counts only the difference.
    assert (await student.fetch("/file/a.bin", "PUT", b"A" * 900 * KB)).code in (200, 201)
    assert usage(data_dir, user_id) == 900 * KB

    answer = await upload(student, "/upload", [("c.bin", b"c" * 80 * KB), ("d.bin", b"d" * 80 * KB)])
    assert answer.code == 413, answer.body
    answer = await upload(student, "/upload-folder", [("dir/e.bin", b"e" * 200 * KB)])
    assert answer.code == 413, answer.body
    files = body_json(await student.fetch("/list-files"))["files"]
    assert files == ["a.bin"]
    assert usage(data_dir, user_id) == 900 * KB
    assert (await upload(student, "/upload", [("small.txt", b"s" * KB)])).code == 200


@pytest.mark.gen_test
async def test_assignment_copies_past_the_quota_are_refused_and_change_nothing(make_client, data_dir):
    owner = await teacher(make_client)
    room = await ok(owner, "/classrooms", "POST", {"name": "Q"}, 201)
    rid = room["id"]
    big = {"data.txt": "x" * 300 * KB, "main.py": "print(1)\n"}
    assignment = await ok(owner, f"/classrooms/{rid}/assignments", "POST",
                          {"name": "Big", "files": big, "tests": HIDDEN}, 201)
    base = f"/classrooms/{rid}/assignments/{assignment['id']}"
    full = await signed_in(make_client, "full@example.com")
    roomy = await signed_in(make_client, "roomy@example.com")
    await full.fetch("/file/mine.bin", "PUT", b"m" * 800 * KB)
    for student in (full, roomy):
        await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})

    published = await ok(owner, f"{base}/publish", "POST", {})
    assert published["over_quota"] == [dev_user_id("full@example.com")]
    assert published["files_written"] == 2
    assert body_json(await full.fetch("/list-files"))["files"] == ["mine.bin"]
    assert usage(data_dir, dev_user_id("roomy@example.com")) == 300 * KB + len("print(1)\n")

    # A later joiner it would not fit: refused, not joined, nothing written.
    late = await signed_in(make_client, "late@example.com")
    await late.fetch("/file/mine.bin", "PUT", b"m" * 800 * KB)
    refused = await late.fetch("/classrooms/join", "POST", {"code": room["access_code"]})
    assert refused.code == 413, refused.body
    assert (await ok(late, "/classrooms"))["classrooms"] == []
    assert body_json(await late.fetch("/list-files"))["files"] == ["mine.bin"]

    # Restoring writes the starter versions beside the backups: refused when they do not fit.
    await roomy.fetch("/file/big.bin", "PUT", b"r" * 500 * KB)
    assert (await roomy.fetch(f"{base}/restore", "POST", {})).code == 413
    assert usage(data_dir, dev_user_id("roomy@example.com")) == 800 * KB + len("print(1)\n")
    assert (await ok(roomy, f"{base}/restore", "POST", {"path": "main.py"}))["restored"][0]["backup"]
