"""The Swarm backend on a real 3-node swarm: `scripts/swarm-lab.sh`, started once for this
module and removed at the end even after a failure (three dockerd, each in its own network,
mount and UTS namespace on a private bridge). Needs root and the `3compute` image on the
default engine; skips otherwise, or fails under REQUIRE_DOCKER=1.

Each test has its own DATA_DIR (hence deployment) and removes its services at teardown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import ptyprocess
import pytest

from tests.conftest import Client
from tests.pty_reader import read_until
from tests.terminal_client import TerminalClient
from tests.test_haproxy import free_block
from threecompute.containers import deployment_id, make_backend
from threecompute.containers.backend import BackendError, UserRef
from threecompute.containers.swarm import SwarmBackend
from threecompute.settings import Settings

pytestmark = [pytest.mark.docker, pytest.mark.swarm]

ROOT = Path(__file__).resolve().parent.parent
LAB_SCRIPT = ROOT / "scripts" / "swarm-lab.sh"
LAB = Path("/tmp/3compute-swarm-test")
LAB_ENV = {"LAB": str(LAB), "PREFIX": "3ct", "NET": "192.168.79", "NODES": "3"}


def lab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAB_SCRIPT), *args], env=os.environ | LAB_ENV, timeout=timeout,
                          capture_output=True, text=True)


def node_sock(n: int) -> str:
    return f"unix://{LAB}/n{n}/docker.sock"


@pytest.fixture(scope="module")
def swarm() -> Iterator[docker.DockerClient]:
    """The lab's manager; the lab is removed at the end, failures or not."""
    missing = [tool for tool in ("ip", "nsenter", "unshare", "dockerd") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        message = f"the swarm lab needs root and {missing or 'iproute2/util-linux/dockerd'}"
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    if LAB.exists():
        lab("down")
    try:
        started = lab("up")
        if started.returncode != 0:  # once more: an engine of the machine may have been restarting
            lab("down")
            started = lab("up")
        assert started.returncode == 0, started.stderr[-2000:]
        client = docker.DockerClient(base_url=node_sock(1), version="auto", timeout=60)
        yield client
        client.close()
    finally:
        stopped = lab("down")
        assert stopped.returncode == 0, stopped.stderr[-2000:]


@pytest.fixture
def backend(swarm, tmp_path) -> Iterator[SwarmBackend]:
    settings = dataclasses.replace(Settings(), data_dir=tmp_path / "data", backend="swarm",
                                   container_memory="256m", container_pids=128, container_cpus=0.5)
    made = make_backend(settings)
    made._docker_host = node_sock(1)
    assert isinstance(made, SwarmBackend)
    try:
        yield made
    finally:
        asyncio.run(made.purge())


def user(backend: SwarmBackend, name: str, port_start: int) -> UserRef:
    workspace = backend.settings.data_dir / "workspaces" / name
    workspace.mkdir(parents=True, exist_ok=True)
    return UserRef(name, port_start, workspace)


def node_of(backend: SwarmBackend, ref: str) -> int:
    return int(backend._engines[ref].split("/n")[-1].split("/")[0])


def node_exec(n: int, ref: str, *cmd: str) -> str:
    out = subprocess.run(["docker", "-H", node_sock(n), "exec", ref, *cmd], capture_output=True, text=True,
                         timeout=30)
    return out.stdout + out.stderr


def test_services_spread_hardened_with_host_ports(backend, swarm):
    users = [user(backend, f"u{i}", 30000 + 10 * i) for i in range(3)]
    # Concurrent first connects: two per user, still one service each.
    boxes = asyncio.run(_gather(*(backend.ensure(u) for u in users + users)))
    assert [b.ref for b in boxes[:3]] == [b.ref for b in boxes[3:]]
    services = swarm.services.list(filters={"label": f"3compute.deployment={backend.deployment}"})
    assert len(services) == 3
    nodes = {node_of(backend, b.ref) for b in boxes[:3]}
    assert len(nodes) >= 2, nodes  # spread over the nodes

    spec = services[0].attrs["Spec"]["TaskTemplate"]
    container = spec["ContainerSpec"]
    assert container["CapabilityDrop"] == ["ALL"] and container["ReadOnly"] is True
    assert container["User"] == "999:995"
    assert spec["Resources"]["Limits"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 256 * 1024 * 1024, "Pids": 128}
    assert {m["Target"]: m["Type"] for m in container["Mounts"]} == {"/app": "bind", "/tmp": "tmpfs"}

    ref, n = boxes[0].ref, node_of(backend, boxes[0].ref)
    status = node_exec(n, ref, "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status")
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
    assert "Read-only file system" in node_exec(n, ref, "touch", "/x")
    assert node_exec(n, ref, "cat", "/sys/fs/cgroup/pids/pids.max").strip() in ("128", "")
    # The container is on its node's engine, not on the manager's (unless the manager runs it).
    other = next(b for b in boxes[:3] if node_of(backend, b.ref) != 1)
    with pytest.raises(docker.errors.NotFound):
        swarm.containers.get(other.ref)

    # A host-mode port is published on the node that runs the task, reachable from another node.
    (users[0].workspace / "index.html").write_text("hello-from-u0")
    subprocess.run(["docker", "-H", node_sock(n), "exec", "-d", ref, "python3", "-m", "http.server",
                    str(users[0].port_start), "--directory", "/app"], check=True, timeout=30)
    viewer = 1 if n != 1 else 2
    fetch = ("import urllib.request,time\nfor _ in range(50):\n try:\n"
             f"  print(urllib.request.urlopen('http://192.168.79.{10 + n}:{users[0].port_start}/index.html',"
             "timeout=2).read().decode()); break\n except OSError: time.sleep(0.2)")
    seen = subprocess.run(["ip", "netns", "exec", f"3ct-n{viewer}", "python3", "-c", fetch],
                          capture_output=True, text=True, timeout=30)
    assert "hello-from-u0" in seen.stdout, seen.stderr


def test_terminal_on_the_node_sees_the_shared_workspace(backend):
    u = user(backend, "term", 30100)
    box = asyncio.run(backend.ensure(u))
    command = backend.attach_command(box, "t1", "abcdef0123456789")
    assert command.argv[1:3] == ["-H", backend._engines[box.ref]]
    proc = ptyprocess.PtyProcess.spawn(command.argv)
    try:
        read_until(proc, "$ ", 20)
        proc.write(b"echo made-on-$(hostname) > /app/note.txt; echo d$((6*7))one\r")
        read_until(proc, "d42one")
        assert (u.workspace / "note.txt").read_text() == "made-on-3compute\n"
        asyncio.run(backend.detach(box, "abcdef0123456789"))
        deadline = time.monotonic() + 10
        while proc.isalive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not proc.isalive()  # the detach ended exactly this client, on the node
    finally:
        proc.close(force=True)
    asyncio.run(backend.close_tab(u, "t1"))
    assert "no server" in node_exec(node_of(backend, box.ref), box.ref, "tmux", "ls") or \
        "tabt1" not in node_exec(node_of(backend, box.ref), box.ref, "tmux", "ls")


def test_two_servers_racing_make_one_service(backend, swarm):
    other = SwarmBackend(backend.settings, node_sock(1))  # another replica: no lock shared in-process
    u = user(backend, "raced", 30500)
    first, second = asyncio.run(_gather(backend.ensure(u), other.ensure(u)))
    assert first.ref == second.ref
    assert len(swarm.services.list(filters={"label": f"3compute.deployment={backend.deployment}"})) == 1


def test_detach_without_host_access_goes_through_the_node(backend, monkeypatch):
    monkeypatch.setattr("threecompute.containers.hostside.available", lambda: False)
    u = user(backend, "remote", 30600)
    box = asyncio.run(backend.ensure(u))
    proc = ptyprocess.PtyProcess.spawn(backend.attach_command(box, "t2", "0123456789abcdef").argv)
    try:
        read_until(proc, "$ ", 20)
        asyncio.run(backend.detach(box, "0123456789abcdef"))
        deadline = time.monotonic() + 10
        while proc.isalive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not proc.isalive()
    finally:
        proc.close(force=True)
    assert "tabt2" in node_exec(node_of(backend, box.ref), box.ref, "tmux", "ls")  # the session lives on


def test_cap_reaper_and_adoption(backend, swarm):
    backend.settings = dataclasses.replace(backend.settings, max_containers=2)
    a, b, c = (user(backend, name, 30200 + 10 * i) for i, name in enumerate("abc"))
    asyncio.run(_gather(backend.ensure(a), backend.ensure(b)))
    with pytest.raises(BackendError, match="container limit reached"):
        asyncio.run(backend.ensure(c))

    # A new server on the same DATA_DIR adopts the running services by label.
    again = SwarmBackend(backend.settings, node_sock(1))
    assert set(asyncio.run(again.running_boxes())) == {"a", "b"}

    # The reaper removes an idle user's service.
    again.reaper.timeout = 0

    async def sweep() -> list[str]:
        boxes = await again.running_boxes()
        again.reaper.adopt(boxes)
        return await again.reaper.sweep()

    assert sorted(asyncio.run(sweep())) == ["a", "b"]
    assert swarm.services.list(filters={"label": f"3compute.deployment={backend.deployment}"}) == []


@pytest.fixture
def server_flags() -> list[str]:
    return ["--dev", "--backend", "swarm", "--host", "127.0.0.1"]


@pytest.fixture
def manager_env(swarm, monkeypatch) -> Iterator[None]:
    """The server under test uses the lab's manager; the manager takes no tasks meanwhile, so
    the node killed below is a worker."""
    monkeypatch.setenv("DOCKER_HOST", node_sock(1))
    swarm.api.update_node(*_drained(swarm, 1))
    yield
    swarm.api.update_node(*_drained(swarm, 1, "active"))


@pytest.mark.gen_test(timeout=120)
async def test_node_failure_error_frame_then_a_fresh_tmux_elsewhere(manager_env, client, services):
    await client.dev_login("mover@example.com")
    term = await TerminalClient.open(client)
    await term.run("export MARK=m$((6*7)); echo kept-$((1+1)) > /app/kept.txt; echo up-$((40+2))", "up-42",
                   timeout=60)
    backend = services.backend
    (ref,) = backend._engines
    n = node_of(backend, ref)
    started = time.monotonic()
    assert lab("kill", str(n)).returncode == 0
    message = await term.read_error(timeout=30)
    assert "reconnect" in message, message
    while await term.connection.read_message() is not None:
        pass
    assert term.connection.close_code == 1011
    try:
        again = await TerminalClient.open(client)
        seen = await again.run("cat /app/kept.txt; echo mark=$MARK.; echo back-$((40+2))", "back-42", timeout=60)
        assert "kept-2" in seen and "mark=." in seen  # the workspace is there, the shell is new
        recovered = time.monotonic() - started
        again.close()
        moved = backend._ids[next(iter(backend._ids))]
        assert moved != ref and node_of(backend, moved) not in (1, n)
        print(f"\nuser recovered on node {node_of(backend, moved)} {recovered:.1f} s after node {n} died")
    finally:
        assert lab("start", str(n)).returncode == 0


def _drained(swarm: docker.DockerClient, n: int, availability: str = "drain") -> tuple[str, int, dict]:
    node = next(x for x in swarm.api.nodes() if x["Description"]["Hostname"] == f"node{n}")
    return node["ID"], node["Version"]["Index"], {**node["Spec"], "Availability": availability}


async def _gather(*coros):  # noqa: ANN002, ANN202
    return await asyncio.gather(*coros)


def test_manager_down_and_back(backend, swarm):
    u = user(backend, "steady", 30400)
    asyncio.run(backend.ensure(u))
    assert lab("kill", "1").returncode == 0
    try:
        with pytest.raises(BackendError, match="unreachable"):
            asyncio.run(backend.ensure(u))
        assert asyncio.run(backend.health())["ok"] is False
    finally:
        assert lab("start", "1").returncode == 0
    deadline = time.monotonic() + 60
    while True:  # the manager takes a moment to lead its swarm again
        try:
            box = asyncio.run(backend.ensure(u))
            break
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert node_exec(node_of(backend, box.ref), box.ref, "pwd").strip() == "/app"
    assert asyncio.run(backend.health())["ok"] is True


@pytest.fixture
def swarm_cluster(swarm, postgres_server) -> Iterator[dict]:
    """`scripts/cluster.sh up` with the Swarm backend: PostgreSQL, two replicas on the lab's
    manager, HAProxy in front; `down` afterwards (it removes the services too)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    folder = Path(tempfile.mkdtemp(prefix="3compute-swarm-cluster-")) / "c"
    base = free_block(4)
    env = os.environ | {"CLUSTER_DIR": str(folder), "CLUSTER_PORT": str(base), "PG_PORT": str(base + 3),
                        "REPLICAS": "2", "CLUSTER_BACKEND": "swarm", "CLUSTER_FLAGS": "--dev",
                        "DOCKER_HOST": node_sock(1), "PORT_BASE": "31000"}
    try:
        up = subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "up"], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        yield {"url": up.stdout.strip(), "dir": folder, "replicas": [f"http://127.0.0.1:{base + i}" for i in (1, 2)]}
    finally:
        subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "down"], env=env, timeout=180)
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.mark.gen_test(timeout=240)
async def test_replicas_behind_haproxy_share_one_service_per_user(swarm_cluster, swarm):
    a, b = swarm_cluster["replicas"]
    client = Client(a)
    await client.dev_login("clustered@example.com")
    terms = []
    for base_url in (a, b, swarm_cluster["url"]):  # both replicas, then HAProxy's pick
        via = Client(base_url)
        via.cookies = client.cookies
        term = await TerminalClient.open(via, tab="3")
        terms.append(term)
        await term.run("echo on-$(hostname)-$((6*7))", "-42", timeout=90)
    await terms[0].run("export SHARED=one-tab; echo set-$((1+1))", "set-2")
    await terms[2].run('echo "[$SHARED]"', "[one-tab]")  # the same tmux session, through HAProxy
    for term in terms:
        term.close()
    deployment = deployment_id(swarm_cluster["dir"] / "data")
    services = swarm.services.list(filters={"label": f"3compute.deployment={deployment}"})
    assert len(services) == 1, [s.name for s in services]  # one service, whichever replica asked
