"""The Docker backend: one hardened container per user, reached with `docker exec -it`.

Ownership. Everything this backend makes carries the labels `3compute.deployment=<id>`
(a hash of the absolute DATA_DIR) and `3compute.user=<user id>`, and is only ever found by
those labels. Names (`3compute-<id>-<user>`) are for humans. Two servers with different
DATA_DIRs on one engine therefore never adopt, count, reap or remove each other's things.

Containers. Image `CONTAINER_IMAGE` (tini as init, `sleep infinity` as its command), user
999:995, hostname `3compute`, the workspace at /app, every capability dropped,
no-new-privileges, a read-only root with a 64 MB tmpfs /tmp, pids/memory/CPU limits, on
this deployment's bridge network (inter-container traffic off; `firewall.py` closes the way
to the host). The user's ten ports are published under the same numbers: container port
N ↔ host port N on the server's host address, so a student's server on port N is reachable
at host:N.

Threads. The docker SDK blocks, so every call runs in the backend's own small thread pool;
the IOLoop never waits on the engine. The client is made lazily and dropped after a
connection error, so an engine that comes back is used again without a restart.

Terminals. A tab is `docker exec -it <container> sh -c '... exec tmux new-session -A'`.
Docker does not end an exec's processes when the `docker exec` client goes away, so the
wrapper records its pid (the tmux client's, after `exec`) in /tmp/.3compute-clients/<client
id>, and `detach` hangs up exactly that client. The tmux session and its programs live on.
As root, the server does that from the host (`hostside.py`), so it works in a container at
its pids limit, where a `docker exec` cannot start; and `ensure` hangs up the clients no
terminal of this server owns any more (their PTY went with a crash or a failed detach), so a
container that orphans filled recovers when its user next opens a tab.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.transport.unixconn import UnixHTTPAdapter
from tornado.ioloop import IOLoop

from threecompute.cluster import Cluster, KeyedLocks, LocalCluster
from threecompute.containers import clean_folder, deployment_id, hostside
from threecompute.containers.backend import (
    PORTS_PER_USER,
    SPARE_READY,
    AttachCommand,
    BackendError,
    Box,
    ContainerBackend,
    UserRef,
    tmux_attach_args,
    tmux_session_name,
)
from threecompute.containers.firewall import Firewall
from threecompute.containers.reaper import SHELLS, WRAPPER_MARK, IdleReaper, Proc, parse_ps_rows
from threecompute.settings import Settings
from threecompute.threadpool import ThreadPool

log = logging.getLogger(__name__)

T = TypeVar("T")
DockerHost = str | Callable[[], str | None] | None

LABEL_DEPLOYMENT = "3compute.deployment"
LABEL_USER = "3compute.user"
CONTAINER_UID, CONTAINER_GID = 999, 995
CONTAINER_USER = f"{CONTAINER_UID}:{CONTAINER_GID}"
CLIENTS_DIR = f"/tmp/.{WRAPPER_MARK}-clients"
CLIENT_ID = re.compile(r"[A-Za-z0-9]{8,56}")
CLIENT_RECORD = re.compile(r"[A-Za-z0-9]{16,64}")  # a replica's 8-character tag, then a client id
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
API_TIMEOUT = 60
HEALTH_TIMEOUT = 3.0
STARTED_ELSEWHERE_SECONDS = 3.0
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
PORT_IN_USE = re.compile(r":(\d+)(?::? ?(?:failed|bind))")
SHELL_PATTERN = "|".join(sorted(SHELLS))  # a `case` pattern
STALE_CLIENT_SECONDS = 30.0  # a recorded client no terminal owns is hung up after this long

# `sh -c` scripts. Each mentions WRAPPER_MARK (via CLIENTS_DIR) so the reaper sees them as
# infrastructure. The attach wrapper leaves if `detach` came first (the `.gone` mark).
ATTACH_SCRIPT = (
    "d={dir}; f=$d/{cid}; mkdir -p $d; echo $$ > $f; "
    "if [ -e $f.gone ]; then rm -f $f $f.gone; exit 0; fi; "
    "exec tmux {attach}"
)
# The same wrapper started ahead of need: it records itself, turns echo off, says it is
# ready and waits for its tmux arguments on one line (the server's, shell-quoted).
SPARE_SCRIPT = (
    "d={dir}; f=$d/{cid}; mkdir -p $d; echo $$ > $f; "
    "if [ -e $f.gone ]; then rm -f $f $f.gone; exit 0; fi; "
    "stty -echo; printf {ready}; read -r args || exit 0; "
    'eval "exec tmux $args"'
)
DETACH_SCRIPT = (
    "mkdir -p {dir}; f={dir}/{cid}; touch $f.gone; "
    "find {dir} -name '*.gone' -mmin +1 -delete; "  # marks of attachments that never started
    "if [ -f $f ]; then p=$(cat $f); "
    "case $(cat /proc/$p/comm 2>/dev/null) in tmux*|sh|dash) kill -HUP $p;; esac; rm -f $f $f.gone; fi"
)
# SIGWINCH to the attachment's tmux client once it is attached: the client re-reads its
# size and the server redraws it whole (tmux does that for every resize message, even to the
# same size). Up to 3 s for the client to attach; the wrapper's pid is the client's after exec.
REDRAW_SCRIPT = (
    "f={dir}/{cid}; for i in $(seq 30); do p=$(cat $f 2>/dev/null); "
    "if [ -n \"$p\" ] && tmux list-clients -F '#{{client_pid}}' 2>/dev/null | grep -qx \"$p\"; then "
    "kill -WINCH $p; exit 0; fi; sleep 0.1; done"
)
CD_SCRIPT = (
    ": {dir}; tmux list-sessions -F '#{{session_name}} #{{pane_current_command}}' 2>/dev/null | "
    "while read -r s c; do case $c in {shells}) "
    'tmux send-keys -t "=$s:" -l "$1"; tmux send-keys -t "=$s:" Enter;; esac; done'
)


def publish_address(host: str) -> str:
    """The host address the users' ports are published on: the server's own, as an IP."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return "0.0.0.0"


def _engine_reason(exc: BaseException) -> str:
    """The innermost OS-level reason of a connection failure ("No such file or directory")."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple | list):
            stack.extend(item)
            continue
        if id(item) in seen or not isinstance(item, BaseException):
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        stack.extend([*item.args, item.__cause__, item.__context__])
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _api_message(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)[:300]


class DockerBackend(ContainerBackend):
    """One container per user on a Docker engine (see the module docstring)."""

    name = "docker"

    def __init__(self, settings: Settings, docker_host: DockerHost = None, threads: int = 8) -> None:
        """`docker_host`: an engine URL, a function giving one (re-read whenever the client is
        remade, e.g. after the engine was unreachable), or None for the environment
        (DOCKER_HOST, else the local socket), also re-read then."""
        self.settings = settings
        self.deployment = deployment_id(settings.data_dir)
        self.network_name = f"3compute-{self.deployment}"
        self.bridge_name = f"3c-{self.deployment[:10]}"
        self.firewall = Firewall(self.bridge_name, self.deployment[:10])
        self.reaper = IdleReaper(self, settings.idle_timeout_seconds, settings.idle_poll_seconds)
        self.cluster: Cluster = LocalCluster()
        self.docker_cli = shutil.which("docker") or "docker"
        self._docker_host = docker_host
        self._pool = ThreadPool(threads, "docker")
        self._health_pool = ThreadPool(1, "docker-health")
        self._client: docker.DockerClient | None = None
        self._calls = 0  # engine calls under way
        self._client_url: str | None = None
        self._client_lock = threading.Lock()
        self._network_lock = threading.Lock()
        self._network_id: str | None = None
        self._user_locks = KeyedLocks()
        self._cap_lock = asyncio.Lock()
        self._starting: set[str] = set()
        self._adopted: set[str] = set()  # containers another replica made (and is starting)
        self._ids: dict[str, str] = {}
        self._live_clients: set[str] = set()  # client ids attached and not yet detached
        self._replica = replica_tag(settings)  # the prefix of the client records this server makes
        self._running = 0
        self._counters = {"containers_created_total": 0, "ensure_errors_total": 0, "ensure_seconds_last": 0.0}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Install the firewall, adopt this deployment's running containers, start the reaper."""
        status = await IOLoop.current().run_in_executor(self._pool, self.firewall.install)
        if status == "on":
            log.info("firewall: containers on %s cannot reach the host", self.bridge_name)
        else:
            log.warning("firewall %s; containers can reach the host's own services", status)
        try:
            boxes = await self.running_boxes()
            self.reaper.adopt(boxes)
            log.info("adopted %d running container(s)", len(boxes))
        except BackendError as exc:
            log.warning("cannot adopt containers now (%s); the reaper will find them later", exc)
        self.reaper.start()

    async def stop(self) -> None:
        """Stop the reaper. Containers keep running; the next start adopts them."""
        await self.reaper.stop()

    def close(self) -> None:
        # Queued calls would otherwise run before the interpreter may exit, a minute each
        # with the engine gone; the next start hangs up what their detaches did not.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._health_pool.shutdown(wait=False, cancel_futures=True)

    async def purge(self) -> None:
        """Remove every container, the network and the firewall chains of this deployment.

        For tests and operators tearing a deployment down; the server itself never calls it.
        """
        await self.reaper.stop()
        try:
            await self._run(self._purge)
        finally:  # an engine that is down holds no container, but the host still holds the chains
            await IOLoop.current().run_in_executor(self._pool, self.firewall.uninstall)

    def _purge(self, client: docker.DockerClient) -> None:
        label = {"label": self._labels_filter()}
        for container in client.api.containers(all=True, filters=label):
            self._remove_quietly(client, container["Id"])
        for network in client.api.networks(filters=label):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_network(network["Id"])
        self._ids.clear()
        self._network_id = None
        self._running = 0

    # -- ensure -----------------------------------------------------------------------------

    async def ensure(self, user: UserRef) -> Box:
        started = time.monotonic()
        try:
            # One ensure per user at a time, in this process and across replicas.
            async with self._user_locks.hold(user.user_id), self.cluster.lock(f"user:{user.user_id}"):
                box = await self._ensure_locked(user)
                await self.cluster.touch(user.user_id)  # before a reaper elsewhere may look again
                self.reaper.touch(user.user_id)
        except BackendError:
            self._counters["ensure_errors_total"] += 1
            raise
        self._counters["ensure_seconds_last"] = time.monotonic() - started
        return box

    async def _ensure_locked(self, user: UserRef) -> Box:
        container = await self._run(self._find, user.user_id)
        if container is not None and container.status == "running":
            if self._host_side():
                await self._run(self._hang_up_stale, container.id, container.attrs["State"]["Pid"])
            return Box(user=user, ref=container.id)
        try:
            # Count and create under one lock shared by every replica, so that MAX_CONTAINERS
            # holds across them; starting (the slow part) happens outside it.
            async with self._cap_lock, self.cluster.lock("containers"):
                await self._reserve(user.user_id)
                fresh = None if container is not None else await self._run(self._create_container, user)
            if fresh is not None:
                return await self._run(self._start_fresh, user, fresh)
            return await self._run(self._start_or_create, user, container)
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker refused to start the container: {_api_message(exc)}") from None
        finally:
            self._starting.discard(user.user_id)

    async def remove_user(self, user: UserRef) -> None:
        async with self._user_locks.hold(user.user_id), self.cluster.lock(f"user:{user.user_id}"):
            await self._run(self._remove_user, user.user_id)

    def _remove_user(self, client: docker.DockerClient, user_id: str) -> None:
        found = client.api.containers(all=True, filters={"label": self._labels_filter(user_id)})
        for container in found:
            self._remove_quietly(client, container["Id"])
        if any(c["State"] == "running" for c in found):
            self._running = max(0, self._running - 1)
        self._ids.pop(user_id, None)

    async def _reserve(self, user_id: str) -> None:
        """Refuse a new running container past MAX_CONTAINERS; others are not affected.

        Created-but-not-started containers count: another replica may be starting them.
        """
        active_boxes = await self._run(self._list_active)
        active = set(active_boxes) | self._starting
        if user_id not in active and len(active) >= self.settings.max_containers:
            raise BackendError(f"container limit reached ({len(active_boxes)} running); try again later")
        self._starting.add(user_id)

    def _find(self, client: docker.DockerClient, user_id: str) -> Container | None:
        """The user's container (any state), by the cached id or else by labels."""
        cached = self._ids.get(user_id)
        if cached:
            try:
                return client.containers.get(cached)
            except docker.errors.NotFound:
                self._ids.pop(user_id, None)
        found = client.api.containers(all=True, filters={"label": self._labels_filter(user_id)})
        found.sort(key=lambda c: c["State"] != "running")
        for extra in found[1:]:
            self._remove_quietly(client, extra["Id"])
        if not found:
            return None
        self._ids[user_id] = found[0]["Id"]
        return client.containers.get(found[0]["Id"])

    def _start_or_create(self, client: docker.DockerClient, user: UserRef,
                         container: Container | None) -> Box:
        if container is not None and container.status == "running":  # another replica started it
            return Box(user=user, ref=container.id)
        if container is not None and container.status in ("created", "exited", "paused"):
            try:
                if container.status == "paused":
                    container.unpause()
                else:
                    container.start()
                return Box(user=user, ref=container.id, cold=True)
            except docker.errors.APIError as exc:
                if self._started_elsewhere(container):
                    return Box(user=user, ref=container.id)
                log.info("cannot restart %s (%s); making a new one", container.short_id, _api_message(exc))
        if container is not None:
            self._remove_quietly(client, container.id)
        return self._create(client, user)

    def _create(self, client: docker.DockerClient, user: UserRef) -> Box:
        return self._start_fresh(client, user, self._create_container(client, user))

    def _start_fresh(self, client: docker.DockerClient, user: UserRef, container: Container) -> Box:
        adopted = container.id in self._adopted
        self._adopted.discard(container.id)
        if container.status == "running" or adopted and self._started_elsewhere(container):
            return Box(user=user, ref=container.id)
        try:
            container.start()
        except docker.errors.APIError as exc:
            if self._started_elsewhere(container):
                return Box(user=user, ref=container.id)
            self._remove_quietly(client, container.id)
            raise self._start_error(user, exc) from None
        self._running += 1  # until the next count from the engine
        return Box(user=user, ref=container.id, cold=True)

    @staticmethod
    def _started_elsewhere(container: Container) -> bool:
        """Whether another replica starts the container within a moment (one it made, or
        one whose start raced ours: its ports are then taken by that very container)."""
        deadline = time.monotonic() + STARTED_ELSEWHERE_SECONDS
        while True:
            try:
                container.reload()
            except docker.errors.APIError:
                return False
            if container.status == "running":
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def _create_container(self, client: docker.DockerClient, user: UserRef) -> Container:
        """A new container for the user (not started), or the one another replica just made.

        The name is unique on the engine: a replica that loses the race for it adopts the
        winner's container instead of making a second one.
        """
        self._prepare_workspace(user)
        kwargs = self._create_kwargs(client, user)
        try:
            container = client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            raise BackendError(f"container image {self.settings.container_image!r} not found on the "
                               "Docker engine (build it with scripts/build-image.sh)") from None
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            holder = self._ours_by_name(client, kwargs["name"], user.user_id)
            if holder is not None:  # the replica that made it starts it
                self._ids[user.user_id] = holder.id
                self._adopted.add(holder.id)
                return holder
            container = client.containers.create(**{**kwargs, "name": None})  # taken by something not ours
        self._ids[user.user_id] = container.id
        self._counters["containers_created_total"] += 1
        log.info("created container %s for %s", container.short_id, user.user_id)
        return container

    def _ours_by_name(self, client: docker.DockerClient, name: str, user_id: str) -> Container | None:
        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            return None
        return container if container.labels == {**container.labels, **self._labels(user_id)} else None

    def _create_kwargs(self, client: docker.DockerClient, user: UserRef) -> dict[str, Any]:
        s = self.settings
        address = publish_address(s.host)
        ports = range(user.port_start, user.port_start + PORTS_PER_USER)
        return {
            "image": s.container_image,
            "name": self.container_name(user.user_id),
            "hostname": "3compute",
            "user": CONTAINER_USER,
            "environment": {"HOME": "/app", "LANG": "C.UTF-8", "TERM": "xterm-256color"},
            "volumes": {str(user.workspace.absolute()): {"bind": "/app", "mode": "rw"}},
            "working_dir": "/app",
            "labels": self._labels(user.user_id),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "read_only": True,
            "tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m,mode=1777"},
            "ipc_mode": "private",
            "pids_limit": s.container_pids,
            "mem_limit": s.container_memory,
            "memswap_limit": s.container_memory,
            "nano_cpus": int(s.container_cpus * 1e9),
            "network": self._network(client),
            "ports": {f"{port}/tcp": (address, port) for port in ports},
            "detach": True,
        }

    def _start_error(self, user: UserRef, exc: docker.errors.APIError) -> BackendError:
        message = _api_message(exc)
        match = PORT_IN_USE.search(message)
        if match or "port is already allocated" in message or "address already in use" in message:
            port = f"port {match.group(1)}" if match else f"a port in {user.port_start}-{user.port_end}"
            return BackendError(f"{port} is already in use on the host")
        return BackendError(f"cannot start the container: {message}")

    def _remove_quietly(self, client: docker.DockerClient, ref: str) -> None:
        """Force-remove a container; one that is already gone is fine."""
        try:
            client.api.remove_container(ref, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("cannot remove container %s: %s", ref[:12], _api_message(exc))

    def _prepare_workspace(self, user: UserRef) -> None:
        """The workspace must exist (Docker would make it root-owned) and be the user's."""
        user.workspace.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and user.workspace.stat().st_uid != CONTAINER_UID:
            os.chown(user.workspace, CONTAINER_UID, CONTAINER_GID)

    def _network(self, client: docker.DockerClient) -> str:
        """This deployment's bridge network, made on first use; its id."""
        with self._network_lock:
            if self._network_id is not None:
                try:
                    client.networks.get(self._network_id)
                    return self._network_id
                except docker.errors.NotFound:
                    self._network_id = None
            found = client.networks.list(filters={"label": f"{LABEL_DEPLOYMENT}={self.deployment}"})
            network = found[0] if found else self._create_network(client)
            self._network_id = network.id
            return network.id

    def _create_network(self, client: docker.DockerClient) -> Any:
        try:
            return client.networks.create(
                self.network_name, driver="bridge", check_duplicate=True,
                labels={LABEL_DEPLOYMENT: self.deployment},
                options={"com.docker.network.bridge.enable_icc": "false",
                         "com.docker.network.bridge.name": self.bridge_name},
            )
        except docker.errors.APIError:
            # Another server of ours made it first: a 409 for the name, or a clash of bridge names.
            found = client.networks.list(filters={"label": f"{LABEL_DEPLOYMENT}={self.deployment}"})
            if not found:
                raise
            return found[0]

    # -- terminals --------------------------------------------------------------------------

    def attach_command(self, box: Box, tab_id: str, client_id: str, read_only: bool = False) -> AttachCommand:
        script = ATTACH_SCRIPT.format(dir=CLIENTS_DIR, cid=self._record(client_id),
                                      attach=shlex.join(tmux_attach_args(tab_id, read_only)))
        return self._exec_command(box, client_id, script)

    def spare_command(self, box: Box, client_id: str) -> AttachCommand:
        # A new `docker exec` is ~70 ms of a ~100 ms attach; a spare makes the next tab a line.
        return self._exec_command(box, client_id, SPARE_SCRIPT.format(dir=CLIENTS_DIR, cid=self._record(client_id),
                                                                      ready=SPARE_READY))

    def _exec_command(self, box: Box, client_id: str, script: str) -> AttachCommand:
        self._live_clients.add(client_id)
        argv = [self.docker_cli, *self._cli_host_args(box.ref), "exec", "-it", "-e", "TERM=xterm-256color",
                "-w", "/app", box.ref, "sh", "-c", script]
        return AttachCommand(argv=argv, relay=True)

    async def detach(self, box: Box, client_id: str) -> None:
        script = DETACH_SCRIPT.format(dir=CLIENTS_DIR, cid=self._record(client_id))
        self._live_clients.discard(client_id)
        if self._host_side():
            try:
                if await self._run(self._hang_up_from_host, box.ref, client_id):
                    return
            except (OSError, BackendError, docker.errors.APIError) as exc:
                log.debug("detach %s from the host: %s", client_id, exc)
        # Not root, or the wrapper has not recorded itself yet: the `.gone` mark, from inside.
        try:
            await self._run(self._exec, box.ref, ["sh", "-c", script])
        except (BackendError, docker.errors.APIError) as exc:
            log.debug("detach %s from %s: %s", client_id, box.ref[:12], exc)

    async def redraw(self, box: Box, client_id: str, pid: int) -> None:
        script = REDRAW_SCRIPT.format(dir=CLIENTS_DIR, cid=self._record(client_id))
        try:
            await self._run(self._exec, box.ref, ["sh", "-c", script])
        except (BackendError, docker.errors.APIError) as exc:
            log.debug("redraw %s in %s: %s", client_id, box.ref[:12], exc)

    async def close_tab(self, user: UserRef, tab_id: str) -> None:
        """Kill the tab's session. Raises BackendError only when the engine is unreachable."""
        await self._exec_for_user(user, ["tmux", "kill-session", "-t", f"={tmux_session_name(tab_id)}"])

    async def cd_all_tabs(self, user: UserRef, folder: str) -> None:
        """Type `cd /app/<folder>` into every tab whose foreground program is a shell."""
        keys = f"cd {shlex.quote('/app/' + clean_folder(folder))}"
        script = CD_SCRIPT.format(dir=CLIENTS_DIR, shells=SHELL_PATTERN)
        await self._exec_for_user(user, ["sh", "-c", script, "sh", keys])

    async def _exec_for_user(self, user: UserRef, cmd: list[str]) -> None:
        ref = self._ids.get(user.user_id)
        if ref is None:
            container = await self._run(self._find, user.user_id)
            if container is None:
                return
            ref = container.id
        try:
            await self._run(self._exec, ref, cmd)
        except docker.errors.APIError as exc:  # gone or not running: nothing to do
            log.debug("exec %s in %s: %s", cmd[0], ref[:12], _api_message(exc))

    def _record(self, client_id: str) -> str:
        """The name under which a client of this server is recorded in its container."""
        return self._replica + _client_id(client_id)

    def _host_side(self) -> bool:
        """Whether tmux clients can be ended from the host: root, and the engine on this host."""
        return hostside.available() and self._engine_url().startswith("unix://")

    def _clients(self, container_id: str, init_pid: int) -> hostside.ContainerClients:
        return hostside.ContainerClients(container_id, init_pid, CLIENTS_DIR, CLIENT_RECORD.fullmatch)

    def _hang_up_from_host(self, client: docker.DockerClient, ref: str, client_id: str) -> bool:
        """Hang up one recorded client with no process in the container; False if none is recorded."""
        state = client.api.inspect_container(ref)
        if not state["State"]["Pid"]:
            return True  # not running: no client left to end
        clients = self._clients(state["Id"], state["State"]["Pid"])
        mine = [found for found in clients.recorded(time.time()) if found.client_id == self._record(client_id)]
        clients.hang_up(mine)
        return bool(mine)

    def _hang_up_stale(self, client: docker.DockerClient, container_id: str, init_pid: int) -> None:
        """Hang up the clients this server (this process or an earlier one on the same host and
        port) recorded and no terminal of it owns any more. Other replicas' are theirs."""
        try:
            clients = self._clients(container_id, init_pid)
            live = {self._record(client_id) for client_id in self._live_clients}
            stale = [found for found in clients.recorded(time.time())
                     if found.client_id.startswith(self._replica) and found.client_id not in live
                     and found.age > STALE_CLIENT_SECONDS]
            ended = clients.hang_up(stale)
        except OSError as exc:
            log.debug("cannot look at the tmux clients of pid %d: %s", init_pid, exc)
            return
        if ended:
            log.info("hung up %d tmux client(s) no terminal owned", len(ended))

    def _exec(self, client: docker.DockerClient, ref: str, cmd: list[str]) -> str:
        result = client.api.exec_create(ref, cmd, user=CONTAINER_USER, stdin=False, tty=False)
        output = client.api.exec_start(result["Id"])
        return output.decode(errors="replace") if isinstance(output, bytes) else ""

    def _cli_host_args(self, ref: str | None = None) -> list[str]:
        """`-H <url>` when the engine is not the default one, so the CLI finds the same engine
        (the one that runs container `ref`)."""
        url = self._engine_url()
        return [] if url == DEFAULT_DOCKER_HOST else ["-H", url]

    # -- the reaper's view ------------------------------------------------------------------

    async def running_boxes(self) -> dict[str, str]:
        """user id → container id for this deployment's running containers (also adoption)."""
        boxes = await self._run(self._list_running)
        self._running = len(boxes)
        self._ids.update(boxes)
        return boxes

    def _list_running(self, client: docker.DockerClient, states: tuple[str, ...] = ("running",)) -> dict[str, str]:
        found = client.api.containers(all=True, filters={"label": self._labels_filter(), "status": list(states)})
        return {c["Labels"][LABEL_USER]: c["Id"] for c in found if LABEL_USER in (c["Labels"] or {})}

    def _list_active(self, client: docker.DockerClient) -> dict[str, str]:
        """Running, or made and about to start (possibly by another replica)."""
        return self._list_running(client, ("created", "running", "restarting"))

    async def processes(self, ref: str) -> list[Proc]:
        top = await self._run(lambda client: client.api.top(ref, ps_args="-eo pid,ppid,args"))
        return parse_ps_rows(top.get("Processes") or [])

    def use_cluster(self, cluster: Cluster) -> None:
        self.cluster = self.reaper.cluster = cluster

    async def reap(self, user_id: str, ref: str) -> bool:
        async with self._user_locks.hold(user_id), self.cluster.lock(f"user:{user_id}"):
            # Look again under the lock every ensure takes: a terminal may just have been
            # opened on another replica.
            await self.reaper.refresh()
            if not self.reaper.is_due(user_id):
                return False
            await self._run(self._remove_quietly, ref)
            if self._ids.get(user_id) == ref:
                del self._ids[user_id]
            self._running = max(0, self._running - 1)
            return True

    def terminal_opened(self, user: UserRef) -> None:
        self.reaper.terminal_opened(user.user_id)

    def terminal_closed(self, user: UserRef) -> None:
        self.reaper.terminal_closed(user.user_id)

    # -- health and metrics -----------------------------------------------------------------

    async def health(self) -> dict:
        info: dict[str, Any] = {"firewall": self.firewall.status}
        loop = IOLoop.current()
        try:
            probe = loop.run_in_executor(self._health_pool, self._call, self._probe)
            info.update(await asyncio.wait_for(probe, HEALTH_TIMEOUT))
        except TimeoutError:
            info.update(ok=False, error=f"Docker engine did not answer within {HEALTH_TIMEOUT:g} s")
        except (BackendError, docker.errors.APIError) as exc:
            info.update(ok=False, error=str(exc))
        except Exception as exc:  # health must never raise
            info.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return info

    def _probe(self, client: docker.DockerClient) -> dict[str, Any]:
        client.ping()
        running = len(self._list_running(client))
        self._running = running
        info: dict[str, Any] = {"ok": True, "running": running}
        try:
            client.images.get(self.settings.container_image)
        except docker.errors.ImageNotFound:
            info.update(ok=False, error=f"container image {self.settings.container_image!r} not found")
        return info

    def metrics(self) -> dict[str, float]:
        return {"running_containers": self._running, "containers_reaped_total": self.reaper.reaped,
                **self._counters}

    # -- labels and names -------------------------------------------------------------------

    def container_name(self, user_id: str) -> str:
        return f"3compute-{self.deployment}-{UNSAFE_NAME_CHARS.sub('_', user_id)[:40]}"

    def _labels(self, user_id: str) -> dict[str, str]:
        return {LABEL_DEPLOYMENT: self.deployment, LABEL_USER: user_id}

    def _labels_filter(self, user_id: str | None = None) -> list[str]:
        labels = [f"{LABEL_DEPLOYMENT}={self.deployment}"]
        return labels if user_id is None else [*labels, f"{LABEL_USER}={user_id}"]

    # -- the engine connection --------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(client, *args)` in the backend's thread pool."""
        return await IOLoop.current().run_in_executor(self._pool, self._call, fn, *args)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        with self._client_lock:
            self._calls += 1
        try:
            return fn(self._get_client(), *args)
        except docker.errors.APIError:
            raise
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                docker.errors.DockerException) as exc:
            url = self._engine_url()
            self._drop_client()
            raise BackendError(f"Docker engine unreachable at {url}: {_engine_reason(exc)}") from exc
        finally:
            with self._client_lock:
                self._calls -= 1

    def forget_idle(self) -> None:
        """Close the engine connections that wait in the pool, each with its last response,
        when no call is under way (closing a pool under a call fails the call): the pool
        grows to the peak's concurrency and would otherwise keep that many."""
        with self._client_lock:
            if self._client is not None and self._calls == 0:
                self._client.close()

    def _get_client(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client is None:
                url = self._resolve_host()
                client = engine_client(url)
                self._client, self._client_url = client, url or os.environ.get("DOCKER_HOST")
            return self._client

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client, self._client_url = self._client, None, None
        if client is not None:
            client.close()

    def _engine_url(self) -> str:
        """The engine's URL as last used, else as it would be used now."""
        return self._client_url or self._resolve_host() or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST

    def _resolve_host(self) -> str | None:
        host = self._docker_host() if callable(self._docker_host) else self._docker_host
        return host or None


class _OneSocketPool(UnixHTTPAdapter):
    """The SDK keys its connection pools by request URL and keeps 25 of them, so the idle
    connections to a local engine grew with the variety of calls (a container's id is in
    most URLs). One socket, one pool: at most `max_pool_size` idle connections."""

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection("http+docker://localhost", proxies)


def engine_client(url: str | None, **kwargs: Any) -> docker.DockerClient:
    """A docker SDK client for the engine at `url` (None: DOCKER_HOST and friends, else the
    local socket)."""
    params = docker.utils.kwargs_from_env() if url is None else {"base_url": url}
    client = docker.DockerClient(**{**params, **kwargs}, version="auto", timeout=API_TIMEOUT)
    adapter = client.api.get_adapter("http+docker://localhost")
    if type(adapter) is UnixHTTPAdapter:
        client.api.mount("http+docker://", _OneSocketPool(f"http+unix://{adapter.socket_path}", API_TIMEOUT,
                                                          max_pool_size=adapter.max_pool_size))
        adapter.close()
    return client


def replica_tag(settings: Settings) -> str:
    """Names a server among the replicas sharing an engine, the same across its restarts (host
    name and port), so that it hangs up only tmux clients it left behind, not theirs."""
    return hashlib.sha256(f"{socket.gethostname()}:{settings.port}".encode()).hexdigest()[:8]


def _client_id(client_id: str) -> str:
    if not CLIENT_ID.fullmatch(client_id):
        raise ValueError(f"bad client id: {client_id!r}")
    return client_id
