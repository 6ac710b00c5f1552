"""Several server processes on one PostgreSQL database and one DATA_DIR: any replica serves
any user, and every guarantee of the store holds across processes."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from threecompute.identity import COOKIE_NAME

from . import conftest
from .conftest import Client, body_json
from .replicas import replicas
from .terminal_client import TerminalClient
from .test_files import upload

FLAGS = ["--dev", "--backend", "local", "--host", "127.0.0.1"]


@pytest.fixture
def cluster_env(tmp_path, postgres_url) -> dict[str, str]:
    return conftest.test_environ(tmp_path / "data", None, 0, DATABASE_URL=postgres_url)


@pytest.fixture
def two(cluster_env, tmp_path):
    with replicas(2, cluster_env, tmp_path, FLAGS) as started:
        yield started


def on(client: Client, base_url: str) -> Client:
    """The same browser (cookies) talking to another replica."""
    other = Client(base_url)
    other.cookies = client.cookies
    return other


@pytest.mark.gen_test(timeout=120)
async def test_forty_sign_ins_racing_on_two_replicas_get_the_lowest_distinct_port_ranges(two, cluster_env):
    a, b = two

    async def one_user(i: int) -> tuple[Client, dict]:
        first, second = (a, b) if i % 2 else (b, a)
        client = Client(first.url)
        await client.dev_login(f"user{i}@example.com")
        tabs = {"tabs": ["1", f"t{i}"], "active_tab": f"t{i}"}
        saved = await on(client, second.url).fetch("/auth/tabs", "POST", tabs)
        assert saved.code == 200, saved.body
        return client, body_json(await client.fetch("/auth/me"))

    results = await asyncio.gather(*(one_user(i) for i in range(40)))
    base = int(cluster_env["PORT_BASE"])
    starts = sorted(me["port_start"] for _, me in results)
    assert starts == [base + 10 * slot for slot in range(40)]  # distinct, and no slot skipped
    for i, (client, _) in enumerate(results):
        for replica in (a, b):
            answer = await on(client, replica.url).fetch("/auth/tabs")
            assert body_json(answer) == {"tabs": ["1", f"t{i}"], "active_tab": f"t{i}"}

    # The same user signing in on both at once: one record, both sign-ins counted.
    pair = [Client(r.url) for r in (a, b) for _ in range(5)]
    await asyncio.gather(*(c.dev_login("twice@example.com") for c in pair))
    admin = Client(a.url)
    await admin.dev_login("admin@example.com")
    users = body_json(await admin.fetch("/auth/users"))["users"]
    twice = [u for u in users if u["email"] == "twice@example.com"]
    assert len(twice) == 1 and twice[0]["login_count"] == 10
    assert len({u["port_start"] for u in users}) == len(users) == 42


@pytest.mark.gen_test(timeout=60)
async def test_logout_on_one_replica_is_refused_by_the_other_within_a_second(two):
    a, b = two
    client = Client(a.url)
    await client.dev_login("leaving@example.com")
    token = client.cookies[COOKIE_NAME]
    on_b = on(client, b.url)
    assert (await on_b.fetch("/auth/me")).code == 200

    assert (await client.fetch("/auth/logout")).code == 200
    logged_out = time.monotonic()
    replay = Client(b.url)
    replay.cookies = {COOKIE_NAME: token}
    while (await replay.fetch("/auth/me")).code == 200:
        assert time.monotonic() - logged_out < 1.0, "replica B still accepts a token revoked on A"
        await asyncio.sleep(0.01)
    assert (await replay.fetch("/list-files")).code == 401


@pytest.mark.gen_test(timeout=90)
async def test_move_into_and_close_tab_through_one_replica_reach_a_tab_attached_through_another(two):
    a, b = two
    client = Client(a.url)
    await client.dev_login("mover@example.com")
    term = await TerminalClient.open(on(client, b.url), tab="7")
    try:
        await term.run("echo ready-$((2+2))", "ready-4")
        answer = await upload(client, "/upload-folder", [("proj/main.py", b"print(1)")], {"move-into": "proj"})
        assert answer.code == 200, answer.body
        await term.read_until("/proj")
        await asyncio.sleep(0.2)
        await term.run("echo at:$(basename $PWD):end", "at:proj:end")

        closed = await client.fetch("/terminal/close-tab", "POST", {"tabId": "7"})
        assert closed.code == 200, closed.body
        while await term.connection.read_message() is not None:  # the tab's session ended on B
            pass
    finally:
        term.close()


@pytest.fixture
def own_postgres(tmp_path_factory):
    """A PostgreSQL of this test alone (it is stopped and started again): (folder, port, url)."""
    import tempfile

    from .conftest import POSTGRES_SCRIPT
    from .replicas import free_port

    folder, port = tempfile.mkdtemp(prefix="3compute-pg-"), free_port()
    try:
        subprocess.run([str(POSTGRES_SCRIPT), "start", folder, str(port)], check=True, timeout=120)
        yield folder, port, f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(POSTGRES_SCRIPT), "stop", folder], timeout=60)


@pytest.mark.gen_test(timeout=120)
async def test_postgres_down_and_back(own_postgres, tmp_path):
    from .conftest import POSTGRES_SCRIPT

    folder, port, url = own_postgres
    env = conftest.test_environ(tmp_path / "data", None, 0, DATABASE_URL=url)
    with replicas(2, env, tmp_path, FLAGS) as (a, b):
        client = Client(a.url)
        await client.dev_login("outage@example.com")
        assert (await client.fetch("/auth/tabs", "POST", {"tabs": ["1", "2"], "active_tab": "2"})).code == 200
        term = await TerminalClient.open(on(client, b.url), tab="3")
        try:
            await term.run("echo before-$((1+1))", "before-2")
            subprocess.run([str(POSTGRES_SCRIPT), "halt", folder], check=True, timeout=60)

            for replica in (a, b):
                answer = await client.fetch(f"{replica.url}/healthz")
                assert answer.code == 503 and body_json(answer)["status"] == "down", answer.body
            refused = await client.fetch("/auth/tabs")
            assert refused.code == 503, refused.body
            assert body_json(refused) == {"error": "the server's database is unavailable"}
            await term.run("echo during-$((2+2))", "during-4")  # an open terminal keeps working

            subprocess.run([str(POSTGRES_SCRIPT), "start", folder, str(port)], check=True, timeout=120)
            deadline = time.monotonic() + 30
            while (await client.fetch(f"{b.url}/healthz")).code != 200:
                assert time.monotonic() < deadline, "replica B never recovered"
                await asyncio.sleep(0.2)
            assert body_json(await client.fetch("/auth/tabs")) == {"tabs": ["1", "2"], "active_tab": "2"}
            await term.run("echo after-$((3+3))", "after-6")
        finally:
            term.close()

        # The listeners reconnected too: a logout on A is refused on B within a second.
        token = client.cookies[COOKIE_NAME]
        deadline = time.monotonic() + 30
        while (await client.fetch("/auth/logout")).code != 200:  # A's pool may need a moment more
            assert time.monotonic() < deadline
            client.cookies[COOKIE_NAME] = token
            await asyncio.sleep(0.2)
        replay = Client(b.url)
        replay.cookies = {COOKIE_NAME: token}
        logged_out = time.monotonic()
        while (await replay.fetch("/auth/me")).code == 200:
            assert time.monotonic() - logged_out < 1.0, "B still accepts a token revoked on A"
            await asyncio.sleep(0.01)
