"""The server's share of the CPU: its session's scheduling group gets SERVER_NICE when the
server leads that session, and nothing else's priority changes. Against the real kernel, in
child processes (the group belongs to a whole session)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from bench.common import port_is_free
from threecompute import scheduling

from .conftest import ROOT
from .test_startup import wait_for_health

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not scheduling.AUTOGROUP.exists()
    or scheduling.AUTOGROUP_ENABLED.read_text().strip() != "1",
    reason="needs root and a kernel that groups by session (autogroup)")

CLAIM = "import sys; from threecompute import scheduling; print(scheduling.claim_cpu_share(int(sys.argv[1])))"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def claim_in_child(nice: int, wrapper: tuple[str, ...] = (), **popen) -> tuple[str, int]:
    """claim_cpu_share(nice) in a child that stays alive until its group's nice is read."""
    child = subprocess.Popen([*wrapper, sys.executable, "-c", CLAIM + "; sys.stdout.flush(); sys.stdin.read()",
                              str(nice)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, **popen)
    try:
        said = child.stdout.readline().strip()
        return said, scheduling.session_group_nice(child.pid)
    finally:
        child.communicate(timeout=10)


def test_a_session_leader_gets_its_group_at_the_nice_asked():
    said, nice = claim_in_child(-7, start_new_session=True)
    assert nice == -7 and "at nice -7" in said
    assert scheduling.session_group_nice() != -7  # the test's own session is untouched


def test_a_server_sharing_its_session_leaves_the_group_alone():
    before = scheduling.session_group_nice()
    try:
        said, nice = claim_in_child(-7)
    finally:
        if scheduling.session_group_nice() != before:  # the test run's own group: put back
            scheduling.AUTOGROUP.write_text(f"{before}\n")
    assert nice == before
    assert "not changed" in said and "setsid" in said


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_without_the_privilege_to_raise_it_the_group_is_left_and_said_so():
    without_sys_nice = ("setpriv", "--bounding-set=-sys_nice")  # root, less CAP_SYS_NICE
    said, nice = claim_in_child(-7, without_sys_nice, start_new_session=True)
    assert nice == 0 and said == "scheduling group not changed: Operation not permitted (SERVER_NICE=-7)"


def test_zero_leaves_the_group_as_it_is():
    said, nice = claim_in_child(0, start_new_session=True)
    assert nice == 0 and "left as it is" in said


def test_the_server_started_as_a_service_sets_its_group_and_logs_it(tmp_path):
    port = next(p for p in range(42000, 43000) if port_is_free(p))
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1", "SERVER_NICE": "-4"}
    server = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--dev", "--backend", "local",
                               "--port", str(port)], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(port, time.monotonic() + 20)
        assert scheduling.session_group_nice(server.pid) == -4
        server.terminate()
        output, _ = server.communicate(timeout=20)
    finally:
        server.kill()
    assert "scheduling group at nice -4 (SERVER_NICE)" in output


RELAYS = """
import asyncio
import sys
from tornado.ioloop import IOLoop
from threecompute import scheduling
from threecompute.pty.session import PtySession

async def main():
    print(scheduling.claim_cpu_share(int(sys.argv[1])), flush=True)
    argv = ["sh", "-c", "echo up; exec sleep 60"]
    relay, program = (PtySession(argv, lambda text: None, share_cpu=share) for share in (True, False))
    while relay.stats.first_output_at is None or program.stats.first_output_at is None:
        await asyncio.sleep(0.01)
    print(relay.pid, program.pid, flush=True)
    sys.stdin.readline()
    for session in (relay, program):
        session.close()
        await session.wait_closed()

IOLoop.current().run_sync(main)
"""


@pytest.mark.parametrize("nice", [-6, 0])
def test_a_relay_shares_the_servers_group_nice_and_a_users_program_does_not(nice):
    """A terminal whose child only relays (`docker exec`) gets the server's claimed nice value
    for the session group the child leads, once it runs; any other terminal's stays at 0,
    and so does every one when the server claimed nothing (SERVER_NICE=0)."""
    server = subprocess.Popen([sys.executable, "-c", RELAYS, str(nice)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        said = server.stdout.readline().strip()
        relay, program = (int(pid) for pid in server.stdout.readline().split())
        groups = scheduling.session_group_nice(relay), scheduling.session_group_nice(program)
        own = scheduling.session_group_nice(server.pid)
    finally:
        server.communicate("\n", timeout=20)
    assert (said.startswith("scheduling group at nice") if nice else "left as it is" in said)
    assert groups == (nice, 0) and own == nice
