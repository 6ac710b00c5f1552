"""The idle reaper: which processes count as infrastructure, and the clock that removes idle boxes."""

from __future__ import annotations

import asyncio

import pytest

from threecompute.containers.reaper import IdleReaper, Proc, parse_ps_rows, user_programs

TINI = Proc(1, 0, "/usr/bin/tini -- sleep infinity")
SLEEP = Proc(7, 1, "sleep infinity")
TMUX_SERVER = Proc(17, 1, "tmux new-session -A -s tab1")
LOGIN_SHELL = Proc(18, 17, "-bash")
TMUX_CLIENT = Proc(8, 0, "tmux new-session -A -s tab1")
INFRA = [TINI, SLEEP, TMUX_SERVER, LOGIN_SHELL, TMUX_CLIENT]


def names(procs: list[Proc]) -> list[str]:
    return [proc.args for proc in procs]


def test_a_fresh_container_is_all_infrastructure():
    assert user_programs(INFRA) == []


@pytest.mark.parametrize("args", [
    "bash", "/bin/bash", "-bash", "bash -l", "bash --login", "sh -i", "zsh", "dash",
    "sh -c d=/tmp/.3compute-clients; f=$d/abc; exec tmux new-session -A -s tab1",
    "[python3] <defunct>",
])
def test_idle_shells_wrappers_and_zombies_are_infrastructure(args):
    assert user_programs([*INFRA, Proc(40, 18, args)]) == []


@pytest.mark.parametrize("args", [
    "python3 -m http.server 8000", "vim notes.txt", "yes", "bash loop.sh", "sh -c while :; do :; done",
    "node server.js", "/usr/bin/python3 app.py",
])
def test_user_programs_keep_the_container(args):
    assert names(user_programs([*INFRA, Proc(40, 18, args)])) == [args]


def test_a_users_sleep_is_a_user_program_but_the_images_sleep_is_not():
    users_sleep = Proc(41, 18, "sleep 100")
    assert user_programs([*INFRA, users_sleep]) == [users_sleep]
    assert user_programs([Proc(1, 0, "sleep infinity")]) == []  # an image without tini


def test_parse_ps_rows_keeps_arguments_with_spaces():
    procs = parse_ps_rows([["1", "0", "/usr/bin/tini -- sleep infinity"], ["5", "1", "python3", "-m x"]])
    assert procs == [TINI, Proc(5, 1, "python3 -m x")]
    assert procs[0].name == "tini" and Proc(2, 1, "-bash").name == "bash"


class FakeTarget:
    """A backend with boxes whose processes the test sets."""

    def __init__(self, boxes: dict[str, list[Proc]]) -> None:
        self.boxes = boxes
        self.removed: list[str] = []
        self.reaper: IdleReaper | None = None

    async def running_boxes(self) -> dict[str, str]:
        return {user: f"ref-{user}" for user in self.boxes}

    async def processes(self, ref: str) -> list[Proc]:
        return self.boxes[ref.removeprefix("ref-")]

    async def reap(self, user_id: str, ref: str) -> bool:
        assert self.reaper is not None and self.reaper.is_due(user_id)
        self.removed.append(user_id)
        del self.boxes[user_id]
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_reaper(boxes: dict[str, list[Proc]], timeout: float = 10.0) -> tuple[IdleReaper, FakeTarget, Clock]:
    clock = Clock()
    target = FakeTarget(boxes)
    reaper = IdleReaper(target, timeout=timeout, poll=0.05, clock=clock)
    target.reaper = reaper
    return reaper, target, clock


def test_idle_container_goes_after_the_grace_period_counted_from_first_sight():
    reaper, target, clock = make_reaper({"ann": list(INFRA)})
    assert asyncio.run(reaper.sweep()) == []  # adoption: the clock starts now
    clock.now += 9
    assert asyncio.run(reaper.sweep()) == []
    clock.now += 1
    assert asyncio.run(reaper.sweep()) == ["ann"]
    assert target.removed == ["ann"] and reaper.reaped == 1


def test_a_user_program_restarts_the_clock():
    server = Proc(50, 1, "python3 -m http.server 8000")
    reaper, target, clock = make_reaper({"ann": [*INFRA, server]})
    reaper.terminal_opened("ann")
    reaper.terminal_closed("ann")
    clock.now += 30
    assert asyncio.run(reaper.sweep()) == []  # still serving
    target.boxes["ann"].remove(server)
    clock.now += 9
    assert asyncio.run(reaper.sweep()) == []  # 9 s since the server was last seen
    clock.now += 1
    assert asyncio.run(reaper.sweep()) == ["ann"]


def test_users_with_an_open_terminal_are_never_reaped():
    reaper, target, clock = make_reaper({"ann": list(INFRA), "bob": list(INFRA)})
    reaper.terminal_opened("ann")
    reaper.terminal_opened("ann")  # two tabs
    reaper.terminal_closed("ann")  # one left open
    asyncio.run(reaper.sweep())
    clock.now += 100
    assert asyncio.run(reaper.sweep()) == ["bob"]
    assert reaper.is_busy("ann") and not reaper.is_due("ann")
    reaper.terminal_closed("ann")
    clock.now += 10
    assert asyncio.run(reaper.sweep()) == ["ann"]


def test_touch_and_terminal_close_restart_the_clock():
    reaper, _, clock = make_reaper({"ann": list(INFRA)})
    reaper.adopt(["ann"])
    clock.now += 8
    reaper.touch("ann")  # an ensure just made the box ready
    clock.now += 8
    assert asyncio.run(reaper.sweep()) == []
    clock.now += 2
    assert asyncio.run(reaper.sweep()) == ["ann"]


def test_unreadable_processes_keep_the_container():
    reaper, target, clock = make_reaper({"ann": list(INFRA)})

    async def broken(ref: str) -> list[Proc]:
        raise RuntimeError("engine hiccup")

    target.processes = broken
    asyncio.run(reaper.sweep())
    clock.now += 100
    assert asyncio.run(reaper.sweep()) == []


def test_the_loop_reaps_with_short_timeouts_and_stops_cleanly():
    async def scenario() -> list[str]:
        target = FakeTarget({"ann": list(INFRA), "bob": [*INFRA, Proc(60, 1, "yes")]})
        reaper = IdleReaper(target, timeout=0.2, poll=0.05)
        target.reaper = reaper
        reaper.start()
        await asyncio.sleep(0.6)
        await reaper.stop()
        assert reaper._task is None
        return target.removed

    assert asyncio.run(scenario()) == ["ann"]


def test_the_loop_survives_a_failing_sweep():
    async def scenario() -> int:
        calls = 0

        class Flaky(FakeTarget):
            async def running_boxes(self) -> dict[str, str]:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("engine down")
                return await super().running_boxes()

        target = Flaky({"ann": list(INFRA)})
        reaper = IdleReaper(target, timeout=0.1, poll=0.05)
        target.reaper = reaper
        reaper.start()
        await asyncio.sleep(0.5)
        await reaper.stop()
        return len(target.removed)

    assert asyncio.run(scenario()) == 1
