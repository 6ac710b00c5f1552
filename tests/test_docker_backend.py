"""The Docker backend against a real engine and the real `3compute` image.

Every test runs in its own DATA_DIR, hence its own deployment (labels, network, firewall
chains), and a fixture removes all of that at teardown, even after a failure: containers
outlive the server by design and hold host ports, so a leak would collide with the next run.
Without an engine or the image these tests skip, or fail when REQUIRE_DOCKER=1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import psutil
import ptyprocess
import pytest
from docker.constants import DEFAULT_MAX_POOL_SIZE

from bench.common import free_port_block
from tests.pty_reader import read_until
from threecompute.containers import deployment_id, make_backend
from threecompute.containers.backend import BackendError, Box, UserRef
from threecompute.containers.docker import (
    CLIENTS_DIR,
    LABEL_DEPLOYMENT,
    PORT_IN_USE,
    DockerBackend,
    _engine_reason,
    engine_client,
    publish_address,
    replica_tag,
)
from threecompute.containers.firewall import Firewall
from threecompute.settings import Settings

IMAGE = os.environ.get("CONTAINER_IMAGE", "3compute")
_handed_out: set[int] = set()


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    """A client for the engine, once the image is there; skip, or fail under REQUIRE_DOCKER=1."""
    try:
        client = docker.from_env(version="auto", timeout=30)
        client.images.get(IMAGE)
    except Exception as exc:
        message = f"Docker engine or image {IMAGE!r} unavailable: {exc}"
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return client


def remove_deployment(client: docker.DockerClient, data_dir: Path) -> None:
    """Everything one deployment made: containers, network, firewall chains."""
    deployment = deployment_id(data_dir)
    label = {"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    for container in client.containers.list(all=True, filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    for network in client.networks.list(filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
    if os.geteuid() == 0:
        Firewall(f"3c-{deployment[:10]}", deployment[:10]).uninstall()


MakeSettings = Callable[..., Settings]


@contextlib.contextmanager
def _settings_factory(engine: docker.DockerClient, base: Path) -> Iterator[MakeSettings]:
    made: list[Path] = []

    def make(name: str = "data", **overrides) -> Settings:
        data_dir = base / name
        made.append(data_dir)
        values = {"data_dir": data_dir, "host": "127.0.0.1", "container_image": IMAGE,
                  "container_memory": "256m", "container_cpus": 0.5, "container_pids": 128, **overrides}
        return Settings(**values)

    try:
        yield make
    finally:
        for data_dir in made:
            remove_deployment(engine, data_dir)


@pytest.fixture
def settings_for(engine: docker.DockerClient, tmp_path: Path) -> Iterator[MakeSettings]:
    """Settings in fresh DATA_DIRs of this test; their deployments are removed afterwards."""
    with _settings_factory(engine, tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def shared(engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One deployment and one running container, reused by the tests that only look at it."""
    with _settings_factory(engine, tmp_path_factory.mktemp("shared")) as make:
        settings = make()
        user = make_user(settings, "alice")
        backend = DockerBackend(settings)
        box = asyncio.run(backend.ensure(user))
        yield {"settings": settings, "user": user, "ref": box.ref, "container": engine.containers.get(box.ref)}


def free_port_range(count: int = 10) -> int:
    """The first of `count` consecutive free TCP ports, none handed out before in this module."""
    for _ in range(200):
        start = free_port_block(count)
        ports = range(start, start + count)
        if _handed_out.isdisjoint(ports):
            _handed_out.update(ports)
            return start
    raise RuntimeError("no free port range")


def make_user(settings: Settings, user_id: str) -> UserRef:
    workspace = settings.workspaces_dir / user_id
    workspace.mkdir(parents=True, exist_ok=True)
    return UserRef(user_id=user_id, port_start=free_port_range(), workspace=workspace)


def run_in(container, *cmd: str) -> tuple[int, str]:
    result = container.exec_run(list(cmd))
    return result.exit_code, result.output.decode(errors="replace")


def deployment_containers(engine: docker.DockerClient, settings: Settings, **filters) -> list:
    label = f"{LABEL_DEPLOYMENT}={deployment_id(settings.data_dir)}"
    return engine.containers.list(all=True, filters={"label": label, **filters})



@contextlib.contextmanager
def attached(backend: DockerBackend, box: Box, tab: str, client_id: str,
             timeout: float = 15.0) -> Iterator[ptyprocess.PtyProcess]:
    """Tab `tab` attached under a PTY, its shell seen answering; on the way out its `docker
    exec` client is killed (not detached: the tmux client in the container lives on)."""
    proc = ptyprocess.PtyProcess.spawn(backend.attach_command(box, tab, client_id).argv, dimensions=(24, 80))
    try:
        proc.write(b"echo up-$((40+2))\r")
        read_until(proc, "up-42", timeout)
        yield proc
    finally:
        proc.terminate(force=True)
        proc.close()


def tmux_clients(container) -> list[str]:
    code, out = run_in(container, "tmux", "list-clients", "-F", "#{client_pid}")
    return out.split() if code == 0 else []


# -- helpers that need no engine ------------------------------------------------------------

def test_port_conflict_messages_name_the_port():
    allocated = ("driver failed programming external connectivity on endpoint x (abc): "
                 "Bind for 127.0.0.1:8003 failed: port is already allocated")
    in_use = ("driver failed programming external connectivity on endpoint x (abc): Error starting userland "
              "proxy: listen tcp4 0.0.0.0:8004: bind: address already in use")
    assert PORT_IN_USE.search(allocated).group(1) == "8003"
    assert PORT_IN_USE.search(in_use).group(1) == "8004"


def test_publish_address_is_the_servers_host_as_an_ip():
    assert publish_address("127.0.0.1") == "127.0.0.1"
    assert publish_address("localhost") == "127.0.0.1"
    assert publish_address("0.0.0.0") == "0.0.0.0"
    assert publish_address("203.0.113.7") == "203.0.113.7"
    assert publish_address("example.org") == "0.0.0.0"


def test_engine_reason_finds_the_os_error():
    exc = ConnectionError(("Connection aborted.", FileNotFoundError(2, "No such file or directory")))
    assert _engine_reason(exc) == "No such file or directory"


def test_attach_command_shape_and_client_id_check(tmp_path):
    settings = Settings(data_dir=tmp_path)
    backend = make_backend(settings)
    assert isinstance(backend, DockerBackend)
    user = UserRef("u1", 8000, tmp_path / "w")
    command = backend.attach_command(Box(user, "c0ffee"), "7", "abcdefgh")
    argv = command.argv
    # Only a relay: it may share the server's CPU share (scheduling.share_cpu_share).
    assert command.relay and backend.spare_command(Box(user, "c0ffee"), "abcdefgi").relay
    assert argv[1:8] == ["exec", "-it", "-e", "TERM=xterm-256color", "-w", "/app", "c0ffee"]
    assert argv[8:10] == ["sh", "-c"] and argv[10].endswith("exec tmux new-session -A -s tab7")
    assert f"{CLIENTS_DIR}/{replica_tag(settings)}abcdefgh" in argv[10].replace("$d", CLIENTS_DIR)
    assert replica_tag(settings) != replica_tag(dataclasses.replace(settings, port=settings.port + 1))
    for bad in ("short", "x" * 57, "abc;rm -rf /", "abcdefgh\n"):
        with pytest.raises(ValueError):
            backend.attach_command(Box(user, "c0ffee"), "7", bad)
    with pytest.raises(ValueError):
        backend.attach_command(Box(user, "c0ffee"), "../x", "abcdefgh")


# -- the container ---------------------------------------------------------------------------

@pytest.mark.docker
def test_concurrent_ensures_make_one_container(engine, settings_for):
    settings = settings_for()
    user = make_user(settings, "bob")
    backend = DockerBackend(settings)

    async def five() -> set[str]:
        boxes = await asyncio.gather(*(backend.ensure(user) for _ in range(5)))
        return {box.ref for box in boxes}

    refs = asyncio.run(five())
    assert len(refs) == 1
    assert [c.id for c in deployment_containers(engine, settings)] == list(refs)
    assert backend.metrics()["containers_created_total"] == 1


@pytest.mark.docker
def test_every_hardening_flag_is_set(engine, shared):
    container, user, settings = shared["container"], shared["user"], shared["settings"]
    container.reload()
    host, config = container.attrs["HostConfig"], container.attrs["Config"]
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"]["/tmp"].startswith("rw,nosuid,nodev,size=64m")
    assert host["PidsLimit"] == 128
    assert host["Memory"] == 256 * 1024 * 1024 and host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 500_000_000
    assert config["User"] == "999:995" and config["Hostname"] == "3compute"
    assert "HOME=/app" in config["Env"] and config["WorkingDir"] == "/app"
    ours = {"3compute.deployment": deployment_id(settings.data_dir), "3compute.user": "alice"}
    assert ours.items() <= config["Labels"].items()
    expected = {f"{p}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(p)}]
                for p in range(user.port_start, user.port_end + 1)}
    assert host["PortBindings"] == expected
    [(network_name, _)] = container.attrs["NetworkSettings"]["Networks"].items()
    network = engine.networks.get(network_name)
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert network.attrs["Labels"] == {"3compute.deployment": deployment_id(settings.data_dir)}
    assert [m["Destination"] for m in container.attrs["Mounts"]] == ["/app"]


@pytest.mark.docker
def test_inside_identity_and_workspace_both_ways(shared):
    container, user = shared["container"], shared["user"]
    code, out = run_in(container, "sh", "-c", "id -u; id -g; hostname; pwd; touch /etc/x 2>&1 || echo ro")
    assert code == 0
    assert out.split("\n")[:4] == ["999", "995", "3compute", "/app"]
    assert "ro" in out.splitlines()[-1]
    (user.workspace / "from-host.txt").write_text("hello inside\n")
    assert run_in(container, "cat", "/app/from-host.txt") == (0, "hello inside\n")
    assert run_in(container, "sh", "-c", "echo hello outside > /app/from-inside.txt")[0] == 0
    made = user.workspace / "from-inside.txt"
    assert made.read_text() == "hello outside\n" and made.stat().st_uid == 999


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="the firewall needs root")
def test_the_container_cannot_reach_the_host(engine, shared):
    container, settings = shared["container"], shared["settings"]
    backend = DockerBackend(settings)

    async def start_and_stop() -> None:
        await backend.start()  # installs the firewall
        await backend.stop()

    asyncio.run(start_and_stop())
    assert backend.firewall.status == "on"
    network = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))
    targets = {network["Gateway"]} | {
        a.address for name, addrs in psutil.net_if_addrs().items() for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.") and name != backend.bridge_name
    }
    port = free_port_range(1)
    probe = ("import socket, sys, concurrent.futures as cf\n"
             "def knock(host):\n"
             "    try: socket.create_connection((host, int(sys.argv[1])), timeout=1.5); return f'OPEN {host}'\n"
             "    except OSError as e: return f'closed {host} {e}'\n"
             "print(*cf.ThreadPoolExecutor(64).map(knock, sys.argv[2:]), sep='\\n')\n")
    with socket.create_server(("0.0.0.0", port)):
        code, out = run_in(container, "python3", "-c", probe, str(port), *sorted(targets))
        assert code == 0 and "OPEN" not in out and out.count("closed") == len(targets), out
        backend.firewall.uninstall()  # the control: without the rules the same probe gets through
        code, out = run_in(container, "python3", "-c", probe, str(port), network["Gateway"])
        assert out.startswith("OPEN"), out


# -- lifecycle ---------------------------------------------------------------------------------

@pytest.mark.docker
def test_idle_containers_go_and_busy_ones_stay(engine, settings_for):
    settings = settings_for(idle_timeout_seconds=2.0, idle_poll_seconds=0.5)
    idle, server, tabbed = (make_user(settings, name) for name in ("idle", "server", "tabbed"))
    backend = DockerBackend(settings)

    async def scenario() -> None:
        await backend.start()
        boxes = await asyncio.gather(*(backend.ensure(u) for u in (idle, server, tabbed)))
        refs = {box.user.user_id: box.ref for box in boxes}
        engine.containers.get(refs["server"]).exec_run(
            ["python3", "-m", "http.server", str(server.port_start)], detach=True)
        backend.terminal_opened(tabbed)
        deadline = time.monotonic() + 10
        while refs["idle"] in {c.id for c in deployment_containers(engine, settings)}:
            assert time.monotonic() < deadline, "the idle container was not removed"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a poll or two more: the others must still be there
        assert _http_get("127.0.0.1", server.port_start).startswith("HTTP/1.0 200")  # published port works
        running = {c.labels["3compute.user"] for c in deployment_containers(engine, settings)}
        assert running == {"server", "tabbed"}
        assert backend.metrics()["containers_reaped_total"] == 1
        await backend.stop()

    asyncio.run(scenario())


def _http_get(host: str, port: int) -> str:
    for _ in range(20):
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return sock.recv(100).decode(errors="replace")
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing answers on {host}:{port}")


@pytest.mark.docker
def test_a_restarted_server_adopts_the_running_container(shared):
    settings, user = shared["settings"], shared["user"]
    backend = DockerBackend(settings)

    async def scenario() -> str:
        await backend.start()
        assert backend.metrics()["running_containers"] >= 1
        assert backend._ids[user.user_id] == shared["ref"]
        box = await backend.ensure(user)
        await backend.stop()
        return box.ref

    assert asyncio.run(scenario()) == shared["ref"]
    assert backend.metrics()["containers_created_total"] == 0


@pytest.mark.docker
def test_a_stopped_container_restarts_and_a_removed_one_is_replaced(engine, settings_for):
    settings = settings_for()
    user = make_user(settings, "carol")
    backend = DockerBackend(settings)

    async def scenario() -> None:
        first = (await backend.ensure(user)).ref
        engine.containers.get(first).kill()
        assert (await backend.ensure(user)).ref == first
        assert engine.containers.get(first).status == "running"
        engine.containers.get(first).remove(force=True)
        second = (await backend.ensure(user)).ref
        assert second != first and engine.containers.get(second).status == "running"

    asyncio.run(scenario())


@pytest.mark.docker
def test_the_cap_refuses_a_new_user_only(settings_for):
    settings = settings_for(max_containers=1)
    first, second = make_user(settings, "first"), make_user(settings, "second")
    backend = DockerBackend(settings)

    async def scenario() -> None:
        await backend.ensure(first)
        with pytest.raises(BackendError, match=r"container limit reached \(1 running\)"):
            await backend.ensure(second)
        await backend.ensure(first)

    asyncio.run(scenario())


@pytest.mark.docker
def test_purge_removes_the_whole_deployment(engine, settings_for):
    settings = settings_for()
    backend = DockerBackend(settings)

    async def scenario() -> None:
        await backend.start()
        await backend.ensure(make_user(settings, "gone"))
        await backend.purge()

    asyncio.run(scenario())
    label = {"label": f"{LABEL_DEPLOYMENT}={backend.deployment}"}
    assert engine.containers.list(all=True, filters=label) == []
    assert engine.networks.list(filters=label) == []
    assert backend.firewall.status == "off: removed"
    if os.geteuid() == 0:
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
        assert backend.deployment[:10] not in rules


@pytest.mark.docker
def test_a_taken_host_port_is_named_and_nothing_is_left(engine, settings_for):
    settings = settings_for()
    user = make_user(settings, "dave")
    backend = DockerBackend(settings)
    taken = user.port_start + 3
    with socket.create_server(("127.0.0.1", taken)), \
            pytest.raises(BackendError, match=f"port {taken} is already in use on the host"):
        asyncio.run(backend.ensure(user))
    assert deployment_containers(engine, settings) == []


@pytest.mark.docker
def test_deployments_do_not_see_each_other(engine, shared, settings_for):
    other_settings = settings_for("other", max_containers=1, idle_timeout_seconds=0.0)
    other = DockerBackend(other_settings)
    alice_too = make_user(other_settings, "alice")

    async def scenario() -> str:
        assert await other.running_boxes() == {}
        assert (await other.health())["running"] == 0
        assert await other.reaper.sweep() == []
        box = await other.ensure(alice_too)  # the cap of 1 counts only this deployment
        return box.ref

    ref = asyncio.run(scenario())
    assert ref != shared["ref"]
    assert engine.containers.get(shared["ref"]).status == "running"
    assert [c.id for c in deployment_containers(engine, shared["settings"])] == [shared["ref"]]


# -- terminals -----------------------------------------------------------------------------------

@pytest.mark.docker
def test_attach_gives_a_tmux_shell_and_detach_ends_its_client(shared):
    container, settings, user = shared["container"], shared["settings"], shared["user"]
    backend = DockerBackend(settings)
    box = asyncio.run(backend.ensure(user))
    before = tmux_clients(container)
    with attached(backend, box, "5", "detachme01"):
        assert len(tmux_clients(container)) == len(before) + 1
    asyncio.run(backend.detach(box, "detachme01"))
    deadline = time.monotonic() + 5
    while tmux_clients(container) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tmux_clients(container) == before
    assert run_in(container, "tmux", "has-session", "-t", "=tab5")[0] == 0  # the session lives on
    assert run_in(container, "ls", "-A", CLIENTS_DIR)[1].strip() == ""
    asyncio.run(backend.detach(box, "detachme01"))  # twice: no error


@pytest.mark.docker
def test_detach_before_the_wrapper_started_still_wins(shared):
    container, settings, user = shared["container"], shared["settings"], shared["user"]
    backend = DockerBackend(settings)
    box = asyncio.run(backend.ensure(user))
    asyncio.run(backend.detach(box, "tooearly01"))
    proc = ptyprocess.PtyProcess.spawn(backend.attach_command(box, "6", "tooearly01").argv)
    deadline = time.monotonic() + 10
    while proc.isalive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.isalive()
    proc.close()
    assert run_in(container, "tmux", "has-session", "-t", "=tab6")[0] != 0
    assert "tooearly01" not in run_in(container, "ls", "-A", CLIENTS_DIR)[1]


@pytest.mark.docker
def test_close_tab_and_cd_all_tabs(shared, tmp_path):
    container, settings, user = shared["container"], shared["settings"], shared["user"]
    (user.workspace / "sub dir").mkdir(exist_ok=True)
    backend = DockerBackend(settings)
    for session in ("tab1", "tab10", "tab11"):
        assert run_in(container, "tmux", "new-session", "-d", "-s", session)[0] == 0
    run_in(container, "tmux", "send-keys", "-t", "=tab11:", "-l", "sleep 30\r")

    def cwd(session: str) -> str:
        return run_in(container, "tmux", "display-message", "-p", "-t", f"={session}:", "#{pane_current_path}")[1]

    async def scenario() -> None:
        await asyncio.sleep(0.5)
        await backend.cd_all_tabs(user, "sub dir/")
        await asyncio.sleep(0.5)
        assert cwd("tab1").strip() == "/app/sub dir" and cwd("tab10").strip() == "/app/sub dir"
        assert cwd("tab11").strip() == "/app"  # a running program is not typed into
        await backend.close_tab(user, "1")
        await backend.close_tab(user, "1")  # already gone
        await backend.close_tab(make_user(settings, "nobody"), "1")  # no container at all

    asyncio.run(scenario())
    assert run_in(container, "tmux", "has-session", "-t", "=tab1")[0] != 0
    assert run_in(container, "tmux", "has-session", "-t", "=tab10")[0] == 0  # no prefix match
    for session in ("tab10", "tab11"):
        run_in(container, "tmux", "kill-session", "-t", f"={session}")


@pytest.mark.docker
def test_commands_in_the_container_leave_no_descriptor_open(shared):
    """Every attach runs a redraw in the container and every tab close a kill-session: with the
    garbage collector held off, the engine connections they used must be closed, not dropped.
    A redraw for a client that never attaches waits 3 s in the container: they run together."""
    settings, user = shared["settings"], shared["user"]
    backend = DockerBackend(settings)

    async def scenario() -> tuple[int, int]:
        box = await backend.ensure(user)
        await backend.close_tab(user, "warmup")  # the connection pool's first connection
        before = len(os.listdir("/proc/self/fd"))
        await asyncio.gather(*(backend.redraw(box, f"noleak{i:04d}", 0) for i in range(25)))
        for i in range(25):
            await backend.close_tab(user, f"noleak{i}")
        return before, len(os.listdir("/proc/self/fd"))

    gc.disable()
    try:
        before, after = asyncio.run(scenario())
    finally:
        gc.enable()
    assert after - before <= DEFAULT_MAX_POOL_SIZE, (before, after)  # at most a pool's worth, not 50


# -- the engine ------------------------------------------------------------------------------------

@pytest.mark.docker
def test_idle_engine_connections_stay_within_one_pool(engine):
    """Every container's id is in the URLs the backend asks for; the SDK alone kept a pool
    (and an idle connection) per URL. Thirty distinct URLs, asked one after another, must
    share one connection."""
    client = engine_client(None)
    try:
        client.ping()
        before = len(os.listdir("/proc/self/fd"))
        for i in range(30):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.inspect_container(f"3compute-no-such-container-{i}")
        assert len(os.listdir("/proc/self/fd")) - before <= 1
    finally:
        client.close()


@pytest.mark.docker
def test_idle_engine_connections_are_closed_but_never_under_a_call(engine, settings_for):
    """`forget_idle` closes the connections the pool kept from a burst of concurrent calls,
    leaves them while a call is under way, and the next call opens one again."""
    backend = DockerBackend(settings_for())
    in_call, release = threading.Event(), threading.Event()

    def inspect(client: docker.DockerClient, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.inspect_container(name)

    def held(client: docker.DockerClient) -> str:
        inspect(client, "3compute-no-such-container-held")
        in_call.set()
        release.wait(10)
        return "finished"

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    try:
        backend._call(inspect, "3compute-no-such-container")  # the client exists: its own descriptors counted
        before = descriptors()
        barrier = threading.Barrier(4)

        def burst(i: int) -> None:
            barrier.wait(10)
            for n in range(20):
                backend._call(inspect, f"3compute-no-such-container-{i}-{n}")

        for _ in range(5):  # a fast engine may answer one thread's calls before the next asks
            threads = [threading.Thread(target=burst, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            if descriptors() > before:
                break
        assert descriptors() > before, "the burst left no pooled connection to close"

        caller = concurrent.futures.ThreadPoolExecutor(1)
        try:
            under_way = caller.submit(backend._call, held)
            assert in_call.wait(10)
            kept = descriptors()
            backend.forget_idle()
            assert descriptors() == kept, "connections closed under a call"
            release.set()
            assert under_way.result(10) == "finished"
        finally:
            release.set()
            caller.shutdown()

        backend.forget_idle()
        assert descriptors() < before, "idle connections were kept"
        backend._call(inspect, "3compute-no-such-container-after")  # a call opens one again
    finally:
        backend.close()


@pytest.mark.docker
def test_engine_down_then_back_without_a_new_backend(engine, settings_for, monkeypatch):
    settings = settings_for()
    user = make_user(settings, "erin")
    real = os.environ.get("DOCKER_HOST")
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/nonexistent-3compute.sock")
    backend = DockerBackend(settings)

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(BackendError, match="Docker engine unreachable at unix:///tmp/nonexistent"):
            await backend.ensure(user)
        assert time.monotonic() - started < 3
        health = await backend.health()
        assert health["ok"] is False and "unreachable" in health["error"]
        if real is None:
            monkeypatch.delenv("DOCKER_HOST")
        else:
            monkeypatch.setenv("DOCKER_HOST", real)
        box = await backend.ensure(user)
        assert engine.containers.get(box.ref).status == "running"
        assert (await backend.health())["ok"] is True

    asyncio.run(scenario())


# -- a container at its pids limit ----------------------------------------------------------

def process_names(backend: DockerBackend, ref: str) -> list[str]:
    """The `comm` of every process in the container, read from the host."""
    state = backend._get_client().api.inspect_container(ref)
    names = []
    for host in backend._clients(state["Id"], state["State"]["Pid"])._host_pids().values():
        with contextlib.suppress(OSError), open(f"/proc/{host}/comm") as comm:
            names.append(comm.read().strip())
    return names


def pids_in_use(backend: DockerBackend, ref: str) -> int:
    """The container's pids cgroup count (threads included), read from the host."""
    init_pid = backend._get_client().api.inspect_container(ref)["State"]["Pid"]
    with open(f"/proc/{init_pid}/cgroup") as cgroups:
        for line in cgroups.read().splitlines():
            _, controllers, path = line.split(":", 2)
            for base in (["/sys/fs/cgroup/pids"] if "pids" in controllers.split(",") else
                         ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] if controllers == "" else []):
                with contextlib.suppress(OSError), open(f"{base}{path}/pids.current") as current:
                    return int(current.read())
    raise AssertionError("no pids cgroup found")


def tmux_client_count(backend: DockerBackend, ref: str) -> int:
    return sum(name.startswith("tmux") and "server" not in name for name in process_names(backend, ref))


def fill_pids(proc: ptyprocess.PtyProcess, backend: DockerBackend, ref: str, limit: int) -> None:
    """From the tab's shell, start exactly the sleeps that take the container to its pids limit
    (a shell that fails to fork retries for a long time, so none may fail)."""
    missing = limit - pids_in_use(backend, ref)
    proc.write(f"i=0; while [ $i -lt {missing} ]; do sleep 600 & i=$((i+1)); done; echo fi''lled\r".encode())
    read_until(proc, "filled", timeout=30)


def cannot_fork(container) -> bool:
    """An exec still starts (joining a full pids cgroup is allowed), but cannot fork."""
    try:
        return "forked" not in container.exec_run(["sh", "-c", "echo $(echo forked)"]).output.decode()
    except docker.errors.APIError:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="detaching from the host needs root")
def test_detach_works_in_a_container_at_its_pids_limit(engine, settings_for):
    settings = settings_for(container_pids=24)
    backend, user = DockerBackend(settings), None
    user = make_user(settings, "full")
    box = asyncio.run(backend.ensure(user))
    with attached(backend, box, "1", "fullpids01") as proc:
        fill_pids(proc, backend, box.ref, 24)
        assert cannot_fork(engine.containers.get(box.ref)), "the container can still fork"
        assert tmux_client_count(backend, box.ref) == 1
    asyncio.run(backend.detach(box, "fullpids01"))
    assert wait_until(lambda: tmux_client_count(backend, box.ref) == 0), process_names(backend, box.ref)


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="reaping from the host needs root")
def test_a_container_full_of_orphaned_clients_recovers_when_its_user_returns(engine, settings_for, monkeypatch):
    settings = settings_for(container_pids=24)
    crashed = DockerBackend(settings)  # a server that went away without detaching its terminals
    user = make_user(settings, "orphans")
    box = asyncio.run(crashed.ensure(user))
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(attached(crashed, box, "1", f"orphan{n:04d}")) for n in range(4)]
        fill_pids(procs[0], crashed, box.ref, 24)
        assert cannot_fork(engine.containers.get(box.ref)), "the container can still fork"
    assert tmux_client_count(crashed, box.ref) == 4, "the clients outlive their docker exec"

    monkeypatch.setattr("threecompute.containers.docker.STALE_CLIENT_SECONDS", 0.0)
    restarted = DockerBackend(settings)
    box = asyncio.run(restarted.ensure(user))
    assert wait_until(lambda: tmux_client_count(restarted, box.ref) == 0), process_names(restarted, box.ref)
    # The hung-up clients' pids go back to the cgroup once their exec's shim has reaped them.
    assert wait_until(lambda: pids_in_use(restarted, box.ref) < 24, timeout=20), pids_in_use(restarted, box.ref)
    try:
        with attached(restarted, box, "1", "returned01", timeout=20):
            pass  # its shell answered
    finally:
        asyncio.run(restarted.detach(box, "returned01"))


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="reaping from the host needs root")
def test_a_replica_never_hangs_up_another_replicas_clients(engine, settings_for, monkeypatch):
    """Two servers on one engine (replicas behind a proxy): a user's tab through one stays
    up when the user's next terminal goes through the other, however old the tab is."""
    settings = settings_for()
    first, second = DockerBackend(settings), DockerBackend(dataclasses.replace(settings, port=settings.port + 1))
    user = make_user(settings, "twice")
    box = asyncio.run(first.ensure(user))
    with attached(first, box, "1", "viafirst01") as proc:
        monkeypatch.setattr("threecompute.containers.docker.STALE_CLIENT_SECONDS", 0.0)  # as if long open
        asyncio.run(second.ensure(user))
        time.sleep(1)
        assert tmux_client_count(first, box.ref) == 1, "the other replica hung up a live tab"
        proc.write(b"echo still-$((2+2))\r")
        read_until(proc, "still-4")
    asyncio.run(DockerBackend(settings).ensure(user))  # the first replica, restarted, cleans up after itself
    assert wait_until(lambda: tmux_client_count(first, box.ref) == 0), process_names(first, box.ref)


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="reaping from the host needs root")
def test_what_the_user_puts_in_the_clients_folder_reaches_nothing_else(engine, settings_for, monkeypatch):
    settings = settings_for()
    backend = DockerBackend(settings)
    user = make_user(settings, "tricky")
    box = asyncio.run(backend.ensure(user))
    container = engine.containers.get(box.ref)
    # A FIFO (opening it blocking would hang the server), a link to a host file, and the pid of
    # a process that is not a tmux client (tini, pid 1), each under a name like a client id.
    tag = replica_tag(settings)  # names this server would take for its own
    code, out = run_in(container, "sh", "-c", f"mkdir -p {CLIENTS_DIR} && cd {CLIENTS_DIR} && mkfifo {tag}fifo0000001 "
                                              f"&& ln -s /etc/hostname {tag}link0000001 && echo 1 > {tag}init0000001")
    assert code == 0, out
    monkeypatch.setattr("threecompute.containers.docker.STALE_CLIENT_SECONDS", 0.0)
    started = time.monotonic()
    asyncio.run(backend.ensure(user))
    asyncio.run(backend.detach(box, "init0000001"))
    assert time.monotonic() - started < 10
    assert container.reload() or container.status == "running", "tini was signalled"
    left = run_in(container, "ls", "-A", CLIENTS_DIR)[1].split()
    assert f"{tag}init0000001" not in left and {f"{tag}fifo0000001", f"{tag}link0000001"} <= set(left), left
