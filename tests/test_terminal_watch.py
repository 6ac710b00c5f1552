"""An instructor's read-only view of a student's terminal tab, on a real server with real
tmux (local and Docker backends): output arrives, input never does, the student's window
keeps its size, and no one else may watch."""

from __future__ import annotations

import asyncio

import pytest
from tornado.httpclient import HTTPClientError

from threecompute.handlers.auth import dev_user_id

from .classroom_helpers import ok, signed_in, teacher
from .terminal_client import TerminalClient

BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]
STUDENT = "watched@example.com"


@pytest.fixture(params=BACKENDS)
def server_flags(request) -> list[str]:
    return ["--dev", "--backend", request.param, "--host", "127.0.0.1"]


async def class_with_student(make_client):
    owner = await teacher(make_client)
    room = await ok(owner, "/classrooms", "POST", {"name": "Watched"}, 201)
    student = await signed_in(make_client, STUDENT)
    await ok(student, "/classrooms/join", "POST", {"code": room["access_code"]})
    return owner, room, student


def watch_path(room: dict, user_id: str) -> str:
    return f"/classrooms/{room['id']}/students/{user_id}/terminal/ws"


async def closed_code(term: TerminalClient, timeout: float = 15) -> int | None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await term.read_frame(max(0.01, deadline - asyncio.get_running_loop().time())) is not None:
        pass
    return term.connection.close_code


@pytest.mark.gen_test(timeout=120)
async def test_an_instructor_sees_the_output_and_cannot_type(make_client):
    owner, room, student = await class_with_student(make_client)
    mine = await TerminalClient.open(student)
    await mine.run("echo ready-$((1+1))", "ready-2")

    watcher = await TerminalClient.open(owner, path=watch_path(room, dev_user_id(STUDENT)))
    await watcher.resize(10, 30)  # the watcher's own size; the student's window keeps 24x80
    await mine.run("echo watched-$((6*7)) size=$(tput lines)x$(tput cols)", "watched-42 size=24x80")
    await watcher.read_until("watched-42")

    await watcher.type("echo typed-by-the-watcher\r")
    assert "read-only" in await watcher.read_error()
    await mine.run("echo still-$((3*3))", "still-9")
    await asyncio.sleep(0.5)
    assert "typed-by-the-watcher" not in mine.screen

    tabs = await ok(owner, f"/classrooms/{room['id']}/students/{dev_user_id(STUDENT)}/tabs")
    assert tabs["tabs"] == ["1"] and tabs["active_tab"] == "1"
    watcher.close()
    await mine.run("echo after-$((2+3))", "after-5")  # the student's tab lives on


@pytest.mark.gen_test(timeout=120)
async def test_no_one_else_may_watch_and_a_missing_tab_is_not_made(make_client, services):
    owner, room, student = await class_with_student(make_client)
    student_id = dev_user_id(STUDENT)
    classmate = await signed_in(make_client, "classmate@example.com")
    await ok(classmate, "/classrooms/join", "POST", {"code": room["access_code"]})
    other_teacher = await teacher(make_client, "other-teacher@example.com")
    anonymous = make_client()
    refused = [(classmate, watch_path(room, student_id), 404),
               (other_teacher, watch_path(room, student_id), 404),
               (owner, watch_path(room, dev_user_id("teacher@example.com")), 404),  # not a student
               (owner, watch_path({"id": "no-such-room"}, student_id), 404),
               (anonymous, watch_path(room, student_id), 401)]
    for client, path, code in refused:
        with pytest.raises(HTTPClientError) as refusal:
            await TerminalClient.open(client, path=path)
        assert refusal.value.code == code, (path, refusal.value.code)
    assert (await classmate.fetch(f"/classrooms/{room['id']}/students/{student_id}/tabs")).code == 403

    watcher = await TerminalClient.open(owner, tab="9", path=watch_path(room, student_id))
    assert await watcher.read_error(30) == "tab 9 is not open"
    assert await closed_code(watcher) == 1000
    for _ in range(100):
        if not services.hub.terminals():
            break
        await asyncio.sleep(0.1)
    assert services.hub.terminals() == []  # nothing stays attached, and no tab was made
    mine = await TerminalClient.open(student, tab="9")
    await mine.run("echo fresh-$((4+4))", "fresh-8")
