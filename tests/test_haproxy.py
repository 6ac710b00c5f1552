"""The whole cluster as `scripts/cluster.sh up` makes it: a private PostgreSQL, three replicas
and HAProxy in front (deploy/haproxy.cfg), all real processes on loopback (local backend)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import socketio

from bench.common import port_is_free
from threecompute.identity import COOKIE_NAME

from .conftest import ROOT, Client, body_json
from .terminal_client import TerminalClient

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
CLUSTER = ROOT / "scripts" / "cluster.sh"
REPLICAS = 3


def free_block(size: int) -> int:
    for _ in range(200):
        start = random.randrange(42000, 48000)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def cluster(postgres_server) -> Iterator[dict]:
    """`cluster.sh up` on free ports; `cluster.sh down` afterwards, whatever happened."""
    if shutil.which("haproxy") is None and os.geteuid() != 0:
        pytest.skip("haproxy is not installed")
    folder = Path(tempfile.mkdtemp(prefix="3compute-cluster-")) / "c"  # reachable by the postgres user
    base = free_block(REPLICAS + 2)
    env = os.environ | {"CLUSTER_DIR": str(folder), "CLUSTER_PORT": str(base), "PG_PORT": str(base + REPLICAS + 1),
                        "REPLICAS": str(REPLICAS), "CLUSTER_BACKEND": "local",
                        "CLUSTER_FLAGS": "--dev", "PORT_BASE": "50000",  # the local backend binds none of them
                        "ADMIN_EMAILS": "admin@example.com"}
    try:
        up = subprocess.run([str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        yield {"url": up.stdout.strip(), "dir": folder, "env": env,
               "replicas": [f"http://127.0.0.1:{base + i}" for i in range(1, REPLICAS + 1)]}
    finally:
        subprocess.run([str(CLUSTER), "down"], env=env, timeout=120)
        assert not folder.exists()
        folder.parent.rmdir()


def ws_opens(folder: Path, tab: str) -> list[int]:
    """Which replicas (1-based) have accepted a terminal WebSocket for `tab`, from their logs."""
    return [i for i in range(1, REPLICAS + 1)
            if re.search(rf"101 GET /terminal/ws\?tabId={tab} ", (folder / f"replica-{i}.log").read_text())]


async def attach(client: Client, base_url: str, tab: str) -> TerminalClient:
    via = Client(base_url)
    via.cookies = client.cookies
    return await TerminalClient.open(via, tab=tab)


@pytest.mark.gen_test(timeout=120)
async def test_sign_in_on_a_open_on_b_reload_through_haproxy_same_tmux_tab(cluster):
    a, b, c = cluster["replicas"]
    client = Client(a)
    await client.dev_login("roamer@example.com")
    term = await attach(client, b, "5")
    await term.run("export PLACE=set-on-b; echo ok-$((1+1))", "ok-2")
    term.close()

    for base_url in (c, cluster["url"], cluster["url"], cluster["url"]):  # C, then whichever HAProxy picks
        term = await attach(client, base_url, "5")
        await term.run('echo "[$PLACE]"', "[set-on-b]")
        term.close()
    assert len(ws_opens(cluster["dir"], "5")) == REPLICAS  # every replica served this tab once or more


def test_socketio_polling_through_haproxy_sticks_to_one_replica(cluster):
    session = requests.Session()
    session.get(f"{cluster['url']}/auth/dev-login?email=poller@example.com", allow_redirects=False)
    assert session.cookies.get(COOKIE_NAME)
    output: list[str] = []
    seen = threading.Event()
    sio = socketio.Client(reconnection=False, handle_sigint=False, http_session=session)

    def on_output(data: dict) -> None:
        output.append(data["output"])
        if "polled-42" in "".join(output):
            seen.set()

    sio.on("pty-output", on_output)
    sio.connect(f"{cluster['url']}?tabId=8", transports=["polling"], wait_timeout=20)
    try:
        assert session.cookies.get("3c_replica") in {f"r{i}" for i in range(1, REPLICAS + 1)}
        deadline = time.monotonic() + 20
        while not seen.is_set():  # a dozen polls or more, all on the replica of the cookie
            assert time.monotonic() < deadline, "".join(output)[-500:]
            sio.emit("pty-input", {"input": "echo polled-$((6*7))\r"})
            seen.wait(1.0)
        assert sio.transport() == "polling"
    finally:
        sio.disconnect()

    # Without the cookie, polls of one session land on the other replicas: they know no such session.
    sid = requests.get(f"{cluster['url']}/socket.io/?EIO=4&transport=polling", cookies={"3c_replica": "r1"}).text
    sid = re.search(r'"sid":"([^"]+)"', sid).group(1)
    answer = requests.get(f"{cluster['url']}/socket.io/?EIO=4&transport=polling&sid={sid}",
                          cookies={"3c_replica": "r2"})
    assert answer.status_code == 400


@pytest.mark.gen_test(timeout=120)
async def test_forty_users_sign_in_in_parallel_through_haproxy_and_lose_nothing(cluster):
    async def one_user(i: int) -> tuple[Client, dict]:
        client = Client(cluster["url"])
        await client.dev_login(f"crowd{i}@example.com")
        saved = await client.fetch("/auth/tabs", "POST", {"tabs": ["1", f"c{i}"], "active_tab": f"c{i}"})
        assert saved.code == 200, saved.body
        return client, body_json(await client.fetch("/auth/me"))

    results = await asyncio.gather(*(one_user(i) for i in range(40)))
    for i, (client, _) in enumerate(results):
        assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", f"c{i}"], "active_tab": f"c{i}"}
    admin = Client(cluster["url"])
    await admin.dev_login("admin@example.com")
    users = body_json(await admin.fetch("/auth/users"))["users"]
    base = int(cluster["env"]["PORT_BASE"])
    assert sorted(u["port_start"] for u in users) == [base + 10 * slot for slot in range(len(users))]
    assert {f"crowd{i}@example.com" for i in range(40)} <= {u["email"] for u in users}
    served = [i for i in range(1, REPLICAS + 1)
              if "/auth/dev-login" in (cluster["dir"] / f"replica-{i}.log").read_text()]
    assert len(served) == REPLICAS


@pytest.mark.gen_test(timeout=120)
async def test_a_replica_killed_with_open_terminals_its_clients_reconnect_elsewhere(cluster):
    client = Client(cluster["url"])
    await client.dev_login("survivor@example.com")
    term = await TerminalClient.open(client, tab="6")
    await term.run("export KEPT=still-here; echo ok-$((2+1))", "ok-3")
    (victim,) = ws_opens(cluster["dir"], "6")
    pid = int((cluster["dir"] / f"replica-{victim}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    while await term.connection.read_message() is not None:  # the socket drops with its replica
        pass

    deadline = time.monotonic() + 30
    while True:  # as the frontend does: reconnect until a replica answers
        try:
            term = await TerminalClient.open(client, tab="6")
            await term.run('echo "<$KEPT>"', "<still-here>", timeout=10)
            break
        except Exception:
            assert time.monotonic() < deadline, "no replica took the tab over"
            await asyncio.sleep(0.5)
    term.close()
    status = subprocess.run([str(CLUSTER), "status"], env=cluster["env"], capture_output=True, text=True)
    assert status.returncode == 1 and f"replica {victim}: not running" in status.stdout
