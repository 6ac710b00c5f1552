"""Hidden tests run in throwaway containers (real Docker), on both store engines: the right
results for a class, results seen only by whom they concern, hostile submissions held at
their limits, and no container left behind."""

from __future__ import annotations

import asyncio
import os

import docker
import pytest

from threecompute.containers import deployment_id
from threecompute.grading import LABEL_GRADING
from threecompute.handlers.auth import dev_user_id

from .classroom_helpers import CORRECT, HALF, STARTER, classroom_with_assignment, ok, signed_in
from .conftest import body_json

pytestmark = pytest.mark.docker


@pytest.fixture
def database_url(any_database_url) -> str:
    return any_database_url


@pytest.fixture
def server_env(server_env) -> dict[str, str]:
    return server_env | {"GRADING_CONCURRENCY": "4", "GRADING_TEST_SECONDS": "3", "GRADING_TIMEOUT_SECONDS": "60"}


@pytest.fixture(autouse=True)
def no_grading_container_left(data_dir):
    """Every run removes its container; any left would fail the test (and is removed here)."""
    yield
    client = docker.from_env(version="auto", timeout=30)
    try:
        left = client.containers.list(all=True, filters={"label": [LABEL_GRADING,
                                                                    f"3compute.deployment={deployment_id(data_dir)}"]})
        for container in left:
            container.remove(force=True)
        assert left == [], "grading containers were left behind"
    finally:
        client.close()


async def join(make_client, room: dict, email: str):
    student = await signed_in(make_client, email)
    await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})
    return student


def by_user(runs: list[dict]) -> dict[str, dict]:
    return {r["user_id"]: r for r in runs}


@pytest.mark.gen_test(timeout=300)
async def test_a_class_of_30_joins_edits_and_is_graded_right(make_client, data_dir, services):
    owner, room, assignment = await classroom_with_assignment(make_client)
    rid, aid, folder = room["id"], assignment["id"], assignment["folder"]
    base = f"/classrooms/{rid}/assignments/{aid}"
    emails = [f"student{i:02d}@example.com" for i in range(30)]
    students = await asyncio.gather(*(join(make_client, room, e) for e in emails))
    # Five edit: three correct, two half right; the other 25 leave the starter (all fail).
    edits = {0: CORRECT, 1: CORRECT, 2: CORRECT, 3: HALF, 4: HALF}
    for index, source in edits.items():
        assert (await students[index].fetch(f"/file/{folder}/solution.py", "PUT", source)).code in (200, 201)

    runs = by_user((await ok(owner, f"{base}/run", "POST", {"all": True}))["runs"])
    assert len(runs) == 30
    assert services.grader.peak == 4  # GRADING_CONCURRENCY: the other 26 waited in line
    for index, email in enumerate(emails):
        run = runs[dev_user_id(email)]
        expected = {CORRECT: (3, 0, 100.0), HALF: (1, 2, 33.3)}.get(edits.get(index), (0, 3, 0.0))
        assert (run["status"], run["passed"], run["failed"], run["score"]) == ("done", *expected), (email, run)
    # No student's file was overwritten; the hidden tests are nowhere in their workspaces.
    for index, student in enumerate(students):
        text = (await student.fetch(f"/file/{folder}/solution.py")).body
        assert text == edits.get(index, b"def add(a, b):\n    return None\n")
        assert not any("test_add" in f for f in body_json(await student.fetch("/list-files"))["files"])
    assert not list((data_dir / "workspaces").rglob("test_add*"))

    # The teacher's view: everyone, with their latest score.
    progress = await ok(owner, f"/classrooms/{rid}/progress")
    assert len(progress["students"]) == 30 and [a["id"] for a in progress["assignments"]] == [aid]
    scores = {row["email"]: row["assignments"][aid]["score"] for row in progress["students"]}
    assert scores["student00@example.com"] == 100.0 and scores["student03@example.com"] == 33.3
    assert scores["student29@example.com"] == 0.0
    assert len((await ok(owner, f"{base}/results"))["results"]) == 30
    csv = await owner.fetch(f"/classrooms/{rid}/progress?format=csv")
    assert csv.code == 200 and csv.headers["Content-Type"].startswith("text/csv")
    lines = csv.body.decode().splitlines()
    assert lines[0] == "email,user_id,Add two,total" and len(lines) == 31
    assert f"student00@example.com,{dev_user_id(emails[0])},100.0,100.0" in lines
    assert (await students[0].fetch(f"/classrooms/{rid}/progress?format=csv")).code == 403


@pytest.mark.gen_test(timeout=200)
async def test_students_run_their_own_tests_and_see_only_their_results(make_client):
    owner, room, assignment = await classroom_with_assignment(make_client)
    rid, aid, folder = room["id"], assignment["id"], assignment["folder"]
    base = f"/classrooms/{rid}/assignments/{aid}"
    alice = await join(make_client, room, "alice@example.com")
    bob = await join(make_client, room, "bob@example.com")
    outsider = await signed_in(make_client, "eve@example.com")
    await alice.fetch(f"/file/{folder}/solution.py", "PUT", CORRECT)

    mine = (await ok(alice, f"{base}/run", "POST", {}))["runs"]
    assert [(r["user_id"], r["passed"], r["failed"]) for r in mine] == [(dev_user_id("alice@example.com"), 3, 0)]
    assert {t["outcome"] for t in mine[0]["tests"]} == {"passed"}
    bob_id = dev_user_id("bob@example.com")
    assert (await alice.fetch(f"{base}/run", "POST", {"user_id": bob_id})).code == 403
    assert (await alice.fetch(f"{base}/run", "POST", {"all": True})).code == 403
    assert (await outsider.fetch(f"{base}/run", "POST", {})).code == 404
    assert (await owner.fetch(f"{base}/run", "POST", {"user_id": "nobody"})).code == 400

    one = (await ok(owner, f"{base}/run", "POST", {"user_id": bob_id}))["runs"][0]
    assert (one["user_id"], one["passed"], one["failed"], one["score"]) == (bob_id, 0, 3, 0.0)
    assert "AssertionError" in one["output"]
    assert [r["user_id"] for r in (await ok(alice, f"{base}/results"))["results"]] == [dev_user_id("alice@example.com")]
    assert [r["user_id"] for r in (await ok(bob, f"{base}/results"))["results"]] == [bob_id]
    assert len((await ok(owner, f"{base}/results"))["results"]) == 2
    assert (await alice.fetch(f"/classrooms/{rid}/progress")).code == 403
    assert (await outsider.fetch(f"{base}/results")).code == 404


PYTEST_HIDDEN = {
    "conftest.py": "import pytest\n\n@pytest.fixture\ndef two():\n    return 2\n",
    "test_pytest.py": (
        "import pytest\nfrom solution import add\n\n"
        "@pytest.mark.parametrize('a, b, total', [(1, 2, 3), (2, 2, 4)])\n"
        "def test_cases(a, b, total):\n    assert add(a, b) == total\n\n"
        "def test_fixture(two):\n    assert add(two, two) == 4\n\n"
        "class TestPlain:\n    def test_raises(self):\n        with pytest.raises(TypeError):\n"
        "            add(1, None)\n"),
}


@pytest.mark.gen_test(timeout=200)
async def test_hidden_tests_run_with_pytest_fixtures_and_parametrize(make_client):
    owner, room, _ = await classroom_with_assignment(make_client)
    assignment = await ok(owner, f"/classrooms/{room['id']}/assignments", "POST",
                          {"name": "Add with pytest", "files": STARTER, "tests": PYTEST_HIDDEN}, 201)
    base = f"/classrooms/{room['id']}/assignments/{assignment['id']}"
    await ok(owner, f"{base}/publish", "POST", {})
    right = await join(make_client, room, "right@example.com")
    wrong = await join(make_client, room, "wrong@example.com")
    await right.fetch(f"/file/{assignment['folder']}/solution.py", "PUT", CORRECT)
    await wrong.fetch(f"/file/{assignment['folder']}/solution.py", "PUT", HALF)

    passed = (await ok(right, f"{base}/run", "POST", {}))["runs"][0]
    assert [(t["name"], t["outcome"]) for t in passed["tests"]] == [
        ("test_pytest.py::test_cases", "passed"), ("test_pytest.py::test_fixture", "passed"),
        ("test_pytest.py::TestPlain.test_raises", "passed")]
    half = (await ok(wrong, f"{base}/run", "POST", {}))["runs"][0]
    assert (half["passed"], half["failed"]) == (1, 2), half  # one failing case fails its test
    assert "assert -1 == 3" in half["output"]  # pytest's own assertion report


def hostile_sources(data_dir) -> dict[str, bytes]:
    """Submissions that attack; each would score above 0 only if its attack worked."""
    other = str(data_dir / "workspaces")
    return {
        "loop": b"while True:\n    pass\n",
        "forkbomb": b"import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "flood": b"import os\nwhile True:\n    os.write(1, b'x' * 65536)\n",
        # Correct only where the attack fails: these three prove no network and no other folder.
        "network": b"import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2).close()\n"
                   b"    OPEN = True\nexcept OSError:\n    OPEN = False\n"
                   b"def add(a, b):\n    return 0 if OPEN else a + b\n",
        # /app exists in the image, empty: no workspace is mounted in a test run.
        "snoop": ("import os\nSEEN = os.listdir('/app') + [p for p in (" + repr(other) + ", '/data')"
                  " if os.path.exists(p)]\n"
                  "def add(a, b):\n    return 0 if SEEN else a + b\n").encode(),
        # Skipping from the code under test is not passing.
        "skipper": b"def add(a, b):\n    import pytest\n    pytest.skip('no')\n",
        "quitter": b"import atexit, os\natexit.register(lambda: os._exit(0))\n"
                   b"def add(a, b):\n    raise SystemExit(0)\n",
        "forger": b"import json, os\n"
                  b"fake = json.dumps({'tests': [{'name': 'x', 'outcome': 'passed', 'output': ''}] * 9})\n"
                  b"print(fake)\nfor path in ('/proc/1/fd/1', '/proc/self/fd/1'):\n    try:\n"
                  b"        fd = os.open(path, os.O_WRONLY)\n        os.write(fd, b'\\n' + fake.encode() + b'\\n')\n"
                  b"    except OSError:\n        pass\n"
                  b"for path in ('/grader/test_add.py', '/submission/solution.py'):\n    try:\n"
                  b"        open(path, 'w').write('def test_add():\\n    pass\\n')\n    except OSError:\n        pass\n"
                  b"def add(a, b):\n    return None\n",
    }


@pytest.mark.gen_test(timeout=300)
async def test_hostile_submissions_are_held_at_their_limits(make_client, data_dir, client):
    owner, room, assignment = await classroom_with_assignment(make_client)
    rid, aid, folder = room["id"], assignment["id"], assignment["folder"]
    sources = hostile_sources(data_dir)
    students = {}
    for name, source in sources.items():
        students[name] = await join(make_client, room, f"{name}@example.com")
        assert (await students[name].fetch(f"/file/{folder}/solution.py", "PUT", source)).code in (200, 201)
    honest = await join(make_client, room, "honest@example.com")
    await honest.fetch(f"/file/{folder}/solution.py", "PUT", CORRECT)
    # One who makes the assignment folder a link to another student's workspace.
    await join(make_client, room, "linker@example.com")
    linked = data_dir / "workspaces" / dev_user_id("linker@example.com") / folder
    for child in linked.iterdir():
        if child.is_dir():
            for sub in child.iterdir():
                sub.unlink()
            child.rmdir()
        else:
            child.unlink()
    linked.rmdir()
    os.symlink(data_dir / "workspaces" / dev_user_id("honest@example.com") / folder, linked)

    answer = await ok(owner, f"/classrooms/{rid}/assignments/{aid}/run", "POST", {"all": True})
    runs = {r["user_id"]: r for r in answer["runs"]}
    result = {name: runs[dev_user_id(f"{name}@example.com")] for name in [*sources, "honest", "linker"]}
    for name in ("loop", "forkbomb", "flood"):
        run = result[name]
        assert run["passed"] == 0 and run["score"] == 0.0, (name, run)
        assert {t["outcome"] for t in run["tests"]} <= {"timeout", "error", "failed"}, (name, run)
        assert len(run["output"]) <= 20_000
    assert {t["outcome"] for t in result["loop"]["tests"]} == {"timeout"}
    for name in ("network", "snoop", "honest"):
        assert (result[name]["passed"], result[name]["score"]) == (3, 100.0), (name, result[name])
    for name in ("forger", "quitter", "skipper"):  # forged lines, skips, exit code 0 without passing: all fail
        assert (result[name]["status"], result[name]["passed"], result[name]["failed"]) == ("done", 0, 3), result[name]
    assert result["linker"]["status"] == "error" and result["linker"]["score"] == 0.0
    # Nothing else was harmed: the hidden test, the honest student's file, the server.
    tests = next((data_dir / "classrooms").rglob("test_add.py")).read_text()
    assert "assert add(2, 3) == 5" in tests
    assert (await honest.fetch(f"/file/{folder}/solution.py")).body == CORRECT
    assert (await client.fetch("/healthz")).code == 200
