"""The message a service layer gives for a refused request is the one the client reads."""

from __future__ import annotations

import pytest

from .conftest import body_json


@pytest.mark.gen_test
async def test_workspace_errors_reach_the_client_with_their_message(client):
    await client.dev_login("errors@example.com")
    assert (await client.fetch("/file/a/", "POST")).code == 200
    assert (await client.fetch("/file/b.txt", "POST")).code == 200
    cases = [
        ("/move", "POST", {"source": "a", "destination": "a/inner"}, 400, "cannot move something into itself"),
        ("/move", "POST", {"source": "missing", "destination": "x"}, 404, "source not found"),
        ("/move", "POST", {"source": "b.txt", "destination": "a"}, 409, "destination exists"),
        ("/move", "POST", {"source": "../etc/passwd", "destination": "x"}, 400, "'..'"),
        ("/file/b.txt", "POST", None, 400, "already exists"),
        ("/file/nowhere.txt", "DELETE", None, 404, "no such file or folder"),
        ("/file/a%5Cb", "GET", None, 400, "backslash"),
    ]
    for path, method, body, status, message in cases:
        answer = await client.fetch(path, method, body)
        assert answer.code == status, (path, body, answer.body)
        error = body_json(answer)["error"]
        assert message in error, (path, body, error)
        assert error not in ("bad request", "not found")
    listing = body_json(await client.fetch("/list-files"))["files"]
    assert listing == ["a/", "b.txt"]  # nothing moved, made or removed
