"""Shared steps of the classroom tests: sign-ins by role, a classroom with an assignment."""

from __future__ import annotations

import base64

from .conftest import ADMIN, Client, body_json

STARTER = {"solution.py": "def add(a, b):\n    return None\n", "notes/readme.txt": "Write add().\n"}
HIDDEN = {"test_add.py": (
    "import unittest\nfrom solution import add\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n\n"
    "def test_zero():\n    assert add(0, 0) == 0\n\n"
    "class TestMore(unittest.TestCase):\n    def test_neg(self):\n        self.assertEqual(add(-1, 1), 0)\n"
)}
CORRECT = b"def add(a, b):\n    return a + b\n"
HALF = b"def add(a, b):\n    return a - b\n"  # passes test_zero only


async def signed_in(make_client, email: str) -> Client:
    client = make_client()
    await client.dev_login(email)
    return client


async def ok(client: Client, path: str, method: str = "GET", body: dict | None = None, code: int = 200) -> dict:
    if body is None and method in ("POST", "PUT"):
        body = {}
    answer = await client.fetch(path, method, body)
    assert answer.code == code, (path, answer.code, answer.body[:500])
    return body_json(answer)


async def teacher(make_client, email: str = "teacher@example.com") -> Client:
    admin = await signed_in(make_client, ADMIN)
    await ok(admin, "/admin/teacher-allowlist", "POST", {"email": email}, 201)
    return await signed_in(make_client, email)


async def classroom_with_assignment(make_client, publish: bool = True) -> tuple[Client, dict, dict]:
    """A teacher, their classroom and one assignment (published unless told)."""
    owner = await teacher(make_client)
    room = await ok(owner, "/classrooms", "POST", {"name": "Intro CS"}, 201)
    assignment = await ok(owner, f"/classrooms/{room['id']}/assignments", "POST",
                          {"name": "Add two", "files": STARTER, "tests": HIDDEN}, 201)
    if publish:
        await ok(owner, f"/classrooms/{room['id']}/assignments/{assignment['id']}/publish", "POST", {})
    return owner, room, assignment


async def file_text(client: Client, path: str) -> str | None:
    answer = await client.fetch(f"/file/{path}")
    return None if answer.code == 404 else answer.body.decode()


def decoded(answer: dict) -> str:
    return base64.b64decode(answer["content_base64"]).decode()
