"""Classrooms on a real server and both store engines: the /api prefix, roles and teacher
sign-up, classroom management, membership checks, and assignments in students' workspaces."""

from __future__ import annotations

import asyncio
import json

import pytest

from threecompute.handlers.auth import dev_user_id

from .classroom_helpers import HIDDEN, STARTER, classroom_with_assignment, decoded, file_text, ok, signed_in, teacher
from .conftest import ADMIN, body_json


@pytest.fixture
def database_url(any_database_url) -> str:
    return any_database_url


# -- 1. every route under /api too --------------------------------------------------------


@pytest.mark.gen_test
async def test_every_route_is_also_served_under_api(client, make_client):
    for path in ("/healthz", "/metrics"):
        short, prefixed = await client.fetch(path), await client.fetch("/api" + path)
        assert short.code == prefixed.code == 200
    assert (await client.fetch("/api/auth/me")).code == 401
    await client.dev_login("someone@example.com")
    assert body_json(await client.fetch("/api/me")) == body_json(await client.fetch("/auth/me"))
    assert (await client.fetch("/api/file/hello.txt", "PUT", b"hi")).code in (200, 201)
    assert "hello.txt" in body_json(await client.fetch("/list-files"))["files"]
    assert body_json(await client.fetch("/api/list-files")) == body_json(await client.fetch("/list-files"))
    assert body_json(await client.fetch("/api/classrooms"))["role"] == "student"
    assert (await client.fetch("/api/no-such-thing")).code == 404


# -- 2. roles ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_roles_allowlist_and_admin_endpoints(make_client):
    nobody = make_client()
    for path in ("/classrooms", "/admin/users", "/admin/teacher-allowlist"):
        assert (await nobody.fetch(path)).code == 401
    admin = await signed_in(make_client, ADMIN)
    student = await signed_in(make_client, "kid@example.com")
    assert (await ok(admin, "/classrooms"))["role"] == "admin"
    assert (await ok(student, "/classrooms"))["role"] == "student"
    for path, body in (("/admin/users", None), ("/admin/teacher-allowlist", None), ("/admin/classrooms", None),
                       ("/admin/teacher-codes", {}), ("/admin/teacher-allowlist", {"email": "kid@example.com"})):
        answer = await student.fetch(path, "POST" if body is not None else "GET", body)
        assert answer.code == 403, (path, answer.body)
    assert (await student.fetch("/classrooms", "POST", {"name": "Mine"})).code == 403

    await ok(admin, "/admin/teacher-allowlist", "POST", {"email": "Kid@Example.com"}, 201)
    assert (await ok(student, "/classrooms"))["role"] == "teacher"
    assert [e["email"] for e in (await ok(admin, "/admin/teacher-allowlist"))["allowlist"]] == ["kid@example.com"]
    await ok(admin, "/admin/teacher-allowlist/kid@example.com", "DELETE")
    assert (await admin.fetch("/admin/teacher-allowlist/kid@example.com", "DELETE")).code == 404
    assert (await ok(student, "/classrooms"))["role"] == "student"

    kid = dev_user_id("kid@example.com")
    await ok(admin, f"/admin/users/{kid}/role", "POST", {"role": "teacher"})
    roles = {u["email"]: u["role"] for u in (await ok(admin, "/admin/users"))["users"]}
    assert roles == {ADMIN: "admin", "kid@example.com": "teacher"}
    assert (await admin.fetch(f"/admin/users/{kid}/role", "POST", {"role": "admin"})).code == 400
    assert (await admin.fetch("/admin/users/nobody/role", "POST", {"role": "teacher"})).code == 404
    assert (await admin.fetch("/admin/teacher-allowlist", "POST", {"email": "not-an-address"})).code == 400


@pytest.mark.gen_test
async def test_teacher_codes_are_limited_in_uses_and_time(make_client):
    admin = await signed_in(make_client, ADMIN)
    code = await ok(admin, "/admin/teacher-codes", "POST", {"max_uses": 2, "expires_in_hours": 1}, 201)
    assert len(code["code"]) >= 32
    users = [await signed_in(make_client, f"t{i}@example.com") for i in range(4)]
    answers = await asyncio.gather(*(u.fetch("/classrooms/teacher-signup", "POST", {"code": code["code"]})
                                     for u in users))
    assert sorted(a.code for a in answers) == [200, 200, 403, 403]  # never more than max_uses
    roles = [(await ok(u, "/classrooms"))["role"] for u in users]
    assert sorted(roles) == ["student", "student", "teacher", "teacher"]

    short = await ok(admin, "/admin/teacher-codes", "POST", {"max_uses": 5, "expires_in_hours": 0.0002}, 201)
    await asyncio.sleep(1.0)
    late = users[[r for r in roles].index("student")]
    assert (await late.fetch("/classrooms/teacher-signup", "POST", {"code": short["code"]})).code == 403
    assert (await late.fetch("/classrooms/teacher-signup", "POST", {"code": "guess"})).code == 403
    assert (await ok(late, "/classrooms"))["role"] == "student"
    for bad in ({"max_uses": 0}, {"max_uses": "2"}, {"expires_in_hours": -1}, {"expires_in_hours": 10**6}):
        assert (await admin.fetch("/admin/teacher-codes", "POST", bad)).code == 400, bad


# -- 3. classrooms ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_classroom_lifecycle_and_membership(make_client):
    owner = await teacher(make_client)
    other_teacher = await teacher(make_client, "other@example.com")
    room = await ok(owner, "/classrooms", "POST", {"name": "Period 3"}, 201)
    rid = room["id"]
    assert len(room["access_code"]) == 8
    assert (await owner.fetch("/classrooms", "POST", {"name": ""})).code == 400
    assert (await ok(owner, f"/classrooms/{rid}/rename", "POST", {"name": "Period 4"}))["name"] == "Period 4"

    student = await signed_in(make_client, "s1@example.com")
    outsider = await signed_in(make_client, "s2@example.com")
    assert (await student.fetch("/classrooms/join", "POST", {"code": "NOPE1234"})).code == 404
    joined = await ok(student, "/classrooms/join", "POST", {"code": room["access_code"].lower()})
    assert joined["id"] == rid and "access_code" not in joined
    seen = await ok(student, f"/classrooms/{rid}")
    assert seen["my_role"] == "student" and "access_code" not in seen
    # Students and outsiders: refused, and outsiders are not even told it exists.
    for path in (f"/classrooms/{rid}/participants", f"/classrooms/{rid}/progress"):
        assert (await student.fetch(path)).code == 403
        assert (await outsider.fetch(path)).code == 404
        assert (await other_teacher.fetch(path)).code == 404
    assert (await outsider.fetch(f"/classrooms/{rid}")).code == 404
    assert (await student.fetch(f"/classrooms/{rid}/rename", "POST", {"name": "x"})).code == 403
    assert (await student.fetch(f"/classrooms/{rid}", "DELETE")).code == 403
    assert (await other_teacher.fetch(f"/classrooms/{rid}", "DELETE")).code == 404
    assert (await ok(other_teacher, "/classrooms"))["classrooms"] == []

    # The access code: regenerated, the old one stops working; archived, nobody joins.
    fresh = await ok(owner, f"/classrooms/{rid}/access-code", "POST")
    assert fresh["access_code"] != room["access_code"]
    assert (await outsider.fetch("/classrooms/join", "POST", {"code": room["access_code"]})).code == 404
    await ok(owner, f"/classrooms/{rid}/archive", "POST", {"archived": True})
    assert (await outsider.fetch("/classrooms/join", "POST", {"code": fresh["access_code"]})).code == 409
    assert (await owner.fetch(f"/classrooms/{rid}/archive", "POST", {"archived": "yes"})).code == 400
    await ok(owner, f"/classrooms/{rid}/archive", "POST", {"archived": False})
    await ok(outsider, "/classrooms/join", "POST", {"code": fresh["access_code"]})

    # A co-instructor manages it too; the owner alone deletes it, and cannot be removed.
    await ok(owner, f"/classrooms/{rid}/participants", "POST", {"email": "other@example.com", "role": "instructor"},
             201)
    people = (await ok(other_teacher, f"/classrooms/{rid}/participants"))["participants"]
    assert {(p["email"], p["role"]) for p in people} == {
        ("teacher@example.com", "instructor"), ("other@example.com", "instructor"),
        ("s1@example.com", "student"), ("s2@example.com", "student")}
    assert (await owner.fetch(f"/classrooms/{rid}/participants", "POST", {"email": "ghost@example.com"})).code == 404
    assert (await owner.fetch(f"/classrooms/{rid}/participants", "POST",
                              {"email": "s1@example.com", "role": "boss"})).code == 400
    owner_id = dev_user_id("teacher@example.com")
    assert (await other_teacher.fetch(f"/classrooms/{rid}/participants/{owner_id}", "DELETE")).code == 409
    await ok(other_teacher, f"/classrooms/{rid}/participants/{dev_user_id('s2@example.com')}", "DELETE")
    assert (await outsider.fetch(f"/classrooms/{rid}")).code == 404
    assert (await other_teacher.fetch(f"/classrooms/{rid}", "DELETE")).code == 403
    admin = await signed_in(make_client, ADMIN)
    assert [c["id"] for c in (await ok(admin, "/admin/classrooms"))["classrooms"]] == [rid]
    await ok(owner, f"/classrooms/{rid}", "DELETE")
    assert (await owner.fetch(f"/classrooms/{rid}")).code == 404
    assert (await ok(student, "/classrooms"))["classrooms"] == []


# -- 4. assignments -----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_assignments_reach_every_student_now_and_later_and_never_overwrite(make_client, data_dir):
    owner, room, assignment = await classroom_with_assignment(make_client, publish=False)
    rid, aid = room["id"], assignment["id"]
    base = f"/classrooms/{rid}/assignments/{aid}"
    early = await signed_in(make_client, "early@example.com")
    await ok(early, "/classrooms/join", "POST", {"code": room["access_code"]})
    # Unpublished: invisible to students, nothing in their workspace.
    assert (await ok(early, f"/classrooms/{rid}/assignments"))["assignments"] == []
    assert (await early.fetch(base)).code == 404
    assert (await early.fetch(f"{base}/publish", "POST", {})).code == 403
    folder = assignment["folder"]
    assert folder == f"classrooms/{rid}/add-two"
    assert await file_text(early, f"{folder}/solution.py") is None

    published = await ok(owner, f"{base}/publish", "POST", {"due_at": 2_000_000_000})
    assert published["published"] and published["due_at"] == 2_000_000_000 and published["students"] == 1
    assert await file_text(early, f"{folder}/solution.py") == STARTER["solution.py"]
    assert await file_text(early, f"{folder}/notes/readme.txt") == STARTER["notes/readme.txt"]
    listed = (await ok(early, f"/classrooms/{rid}/assignments"))["assignments"]
    assert [a["id"] for a in listed] == [aid]
    assert "tests" not in await ok(early, base)

    # The student's edit survives a second publish; a late joiner gets the starter files.
    assert (await early.fetch(f"/file/{folder}/solution.py", "PUT", b"mine\n")).code in (200, 201)
    await ok(owner, f"{base}/publish", "POST", {})
    assert await file_text(early, f"{folder}/solution.py") == "mine\n"
    late = await signed_in(make_client, "late@example.com")
    await ok(late, "/classrooms/join", "POST", {"code": room["access_code"]})
    assert await file_text(late, f"{folder}/solution.py") == STARTER["solution.py"]

    # Restore: one file back to the starter, the student's version kept beside it.
    restored = (await ok(early, f"{base}/restore", "POST", {"path": "solution.py"}))["restored"]
    assert await file_text(early, f"{folder}/solution.py") == STARTER["solution.py"]
    assert await file_text(early, restored[0]["backup"]) == "mine\n"
    assert (await early.fetch(f"{base}/restore", "POST", {"path": "../../../etc/passwd"})).code == 400
    assert (await early.fetch(f"{base}/restore", "POST", {"path": "other.py"})).code == 404
    assert (await owner.fetch(f"{base}/restore", "POST", {})).code == 403
    await early.fetch(f"/file/{folder}/notes/readme.txt", "PUT", b"changed")
    whole = (await ok(early, f"{base}/restore", "POST", {}))["restored"]
    assert sorted(r["path"] for r in whole) == [f"{folder}/notes/readme.txt", f"{folder}/solution.py"]
    assert await file_text(early, f"{folder}/notes/readme.txt") == STARTER["notes/readme.txt"]

    # The hidden tests are in no workspace and no listing, anywhere.
    for student in (early, late):
        files = body_json(await student.fetch("/list-files"))["files"]
        assert files and not any("test_add" in f for f in files)
    assert not any((data_dir / "workspaces").rglob("test_add.py"))
    assert len(list((data_dir / "classrooms").rglob("test_add.py"))) == 1

    # The teacher reads a student's copy, read-only; another student cannot.
    early_id = dev_user_id("early@example.com")
    assert "solution.py" in (await ok(owner, f"{base}/files/{early_id}"))["files"]
    assert decoded(await ok(owner, f"{base}/files/{early_id}?path=solution.py")) == STARTER["solution.py"]
    assert (await late.fetch(f"{base}/files/{early_id}")).code == 403
    assert (await owner.fetch(f"{base}/files/{dev_user_id('teacher@example.com')}")).code == 404


@pytest.mark.gen_test
async def test_bad_assignments_are_refused_and_change_nothing(make_client, data_dir):
    owner = await teacher(make_client)
    room = await ok(owner, "/classrooms", "POST", {"name": "R"}, 201)
    url = f"/classrooms/{room['id']}/assignments"
    bad = [
        {"name": "A", "files": {"../escape.py": "x"}, "tests": HIDDEN},
        {"name": "A", "files": {"/etc/x": "x", ".hidden": "x"}, "tests": HIDDEN},
        {"name": "A", "files": STARTER, "tests": {"sub/test_a.py": "x"}},
        {"name": "A", "files": STARTER, "tests": {"helper.py": "x"}},
        {"name": "A", "files": STARTER},
        {"name": "", "files": STARTER, "tests": HIDDEN},
        {"name": "A", "files": {"a.py": 3}, "tests": HIDDEN},
    ]
    for body in bad:
        answer = await owner.fetch(url, "POST", body)
        assert answer.code == 400, (body, answer.body)
        assert "error" in body_json(answer)
    assert (await owner.fetch(url, "POST", b"not json", headers={"Content-Type": "application/json"})).code == 400
    huge = {"name": "Big", "files": {"big.txt": "x" * (3 * 1024 * 1024)}, "tests": HIDDEN}
    assert (await owner.fetch(url, "POST", json.dumps(huge))).code == 413
    student = await signed_in(make_client, "s@example.com")
    await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})
    assert (await student.fetch(url, "POST", {"name": "A", "files": STARTER, "tests": HIDDEN})).code == 403
    assert (await ok(owner, url))["assignments"] == []
    assert not (data_dir / "classrooms").exists() or not any((data_dir / "classrooms").rglob("*.py"))
    await ok(owner, url, "POST", {"name": "A", "files": STARTER, "tests": HIDDEN}, 201)
    assert (await owner.fetch(url, "POST", {"name": "a", "files": STARTER, "tests": HIDDEN})).code == 409


@pytest.mark.gen_test
async def test_weights_and_manual_scores_make_the_totals(make_client):
    owner, room, first = await classroom_with_assignment(make_client)
    rid = room["id"]
    second = await ok(owner, f"/classrooms/{rid}/assignments", "POST",
                      {"name": "=Formula", "files": STARTER, "tests": HIDDEN}, 201)
    amy = await signed_in(make_client, "amy@example.com")
    await ok(amy, "/classrooms/join", "POST", {"code": room["access_code"]})
    await ok(await signed_in(make_client, "ben@example.com"), "/classrooms/join", "POST",
             {"code": room["access_code"]})
    amy_id = dev_user_id("amy@example.com")
    one, two = (f"/classrooms/{rid}/assignments/{a['id']}" for a in (first, second))
    assert (await ok(owner, f"{two}/weight", "POST", {"weight": 3}))["weight"] == 3
    for bad in ({"weight": -1}, {"weight": "3"}, {}):
        assert (await owner.fetch(f"{two}/weight", "POST", bad)).code == 400
    await ok(owner, f"{one}/scores/{amy_id}", "POST", {"score": 80})
    await ok(owner, f"{two}/scores/{amy_id}", "POST", {"score": 50})
    for bad in ({"score": 101}, {"score": "A"}, {"score": True}):
        assert (await owner.fetch(f"{one}/scores/{amy_id}", "POST", bad)).code == 400
    assert (await owner.fetch(f"{one}/scores/{dev_user_id('teacher@example.com')}", "POST", {"score": 1})).code == 404
    assert (await amy.fetch(f"{one}/scores/{amy_id}", "POST", {"score": 100})).code == 403
    assert (await amy.fetch(f"{one}/weight", "POST", {"weight": 0})).code == 403

    progress = await ok(owner, f"/classrooms/{rid}/progress")
    totals = {row["email"]: row["total"] for row in progress["students"]}
    assert totals == {"amy@example.com": 57.5, "ben@example.com": 0.0}  # (80 * 1 + 50 * 3) / 4
    amy_row = next(r for r in progress["students"] if r["email"] == "amy@example.com")
    assert amy_row["assignments"][first["id"]] == {"status": "not run", "passed": None, "failed": None,
                                                   "ran_at": None, "run_score": None, "manual_score": 80,
                                                   "score": 80}
    lines = (await owner.fetch(f"/classrooms/{rid}/progress?format=csv")).body.decode().splitlines()
    assert lines[0] == "email,user_id,Add two,'=Formula,total"
    assert f"amy@example.com,{amy_id},80.0,50.0,57.5" in lines or f"amy@example.com,{amy_id},80,50,57.5" in lines
    await ok(owner, f"{one}/scores/{amy_id}", "POST", {"score": None})
    progress = await ok(owner, f"/classrooms/{rid}/progress")
    assert {row["email"]: row["total"] for row in progress["students"]}["amy@example.com"] == 37.5


@pytest.mark.gen_test
async def test_admin_stats(make_client):
    owner, room, _ = await classroom_with_assignment(make_client)
    student = await signed_in(make_client, "s@example.com")
    await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})
    await student.fetch("/file/big.bin", "PUT", b"x" * 100_000)
    assert (await student.fetch("/admin/stats")).code == 403
    assert (await owner.fetch("/admin/stats")).code == 403
    admin = await signed_in(make_client, ADMIN)
    stats = await ok(admin, "/api/admin/stats")
    assert stats["users"] == {"total": 3, "admin": 1, "teacher": 1, "student": 1}
    assert stats["classrooms"] == 1
    assert stats["terminals"] == {"open": 0, "users": 0}
    assert stats["containers"]["backend"] == "local" and stats["grading"]["running"] == 0
    sizes = {w["email"]: w["bytes"] for w in stats["workspaces"]}
    assert sizes["s@example.com"] >= 100_000 + len(STARTER["solution.py"])
    assert sizes[ADMIN] == 0
