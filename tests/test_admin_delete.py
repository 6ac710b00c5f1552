"""An admin deletes a user: container, workspace and rows, in that order, and again finds
nothing and succeeds (the Docker backend, both store engines)."""

from __future__ import annotations

import docker
import pytest

from threecompute.handlers.auth import dev_user_id

from .classroom_helpers import classroom_with_assignment, ok, signed_in
from .conftest import ADMIN

pytestmark = pytest.mark.docker


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "docker", "--host", "127.0.0.1"]


@pytest.fixture
def database_url(any_database_url) -> str:
    return any_database_url


@pytest.mark.gen_test(timeout=120)
async def test_deleting_a_user_removes_container_workspace_and_rows(make_client, services, data_dir):
    owner, room, assignment = await classroom_with_assignment(make_client)
    rid, aid = room["id"], assignment["id"]
    student = await signed_in(make_client, "gone@example.com")
    await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})
    await ok(owner, f"/classrooms/{rid}/assignments/{aid}/scores/{dev_user_id('gone@example.com')}", "POST",
             {"score": 90})
    user_id = dev_user_id("gone@example.com")
    record = await services.store.get_user(user_id)
    box = await services.backend.ensure(services.user_ref(record))
    engine = docker.from_env(version="auto")
    try:
        assert engine.containers.get(box.ref).status == "running"
        admin = await signed_in(make_client, ADMIN)
        assert (await student.fetch(f"/admin/users/{user_id}", "DELETE")).code == 403
        assert (await owner.fetch(f"/admin/users/{user_id}", "DELETE")).code == 403
        assert (await ok(admin, f"/admin/users/{user_id}", "DELETE")) == {"success": True, "existed": True}
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(box.ref)
    finally:
        engine.close()
    assert not (data_dir / "workspaces" / user_id).exists()
    assert user_id not in {u["id"] for u in (await ok(admin, "/admin/users"))["users"]}
    assert "gone@example.com" not in {p["email"] for p in (await ok(owner, f"/classrooms/{rid}/participants"))[
        "participants"]}
    assert (await ok(owner, f"/classrooms/{rid}/progress"))["students"] == []
    assert (await student.fetch("/auth/me")).code == 401
    # The deleted user's cookie opens nothing any more, and makes no workspace again.
    assert (await student.fetch("/list-files")).code == 401
    assert (await student.fetch("/file/new.py", "PUT", "x")).code == 401
    assert not (data_dir / "workspaces" / user_id).exists()
    assert (await ok(admin, f"/admin/users/{user_id}", "DELETE")) == {"success": True, "existed": False}
    assert (await admin.fetch(f"/admin/users/{dev_user_id(ADMIN)}", "DELETE")).code == 409
    again = await signed_in(make_client, "gone@example.com")  # signing in again is a new start
    assert (await again.fetch("/list-files")).code == 200

    # A teacher's classrooms go with them.
    await ok(admin, f"/admin/users/{dev_user_id('teacher@example.com')}", "DELETE")
    assert (await ok(admin, "/admin/classrooms"))["classrooms"] == []
    assert not (data_dir / "classrooms" / rid).exists()
