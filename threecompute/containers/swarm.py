"""The Swarm backend: one single-replica Swarm service per user, spread over many Docker hosts.

It is the Docker backend (docker.py) with a different owner for containers: the manager
engine (`DOCKER_HOST`, as the SDK reads it) holds one service per user, labelled like the
Docker backend's containers (`3compute.deployment`, `3compute.user`), and Swarm places and
restarts its one task. Everything that runs inside a container (the `docker exec -it … tmux`
of a terminal, detach, redraw, `cd`, the reaper's process list) goes to the engine of the
node that runs the task, named by that node's label `3compute.engine` (`tcp://HOST:2376`
with TLS from `DOCKER_CERT_PATH`/`DOCKER_TLS_VERIFY`, or a unix socket). A node without the
label is only usable when it is the manager itself.

Hardening is the Docker backend's, in service terms: every capability dropped, read-only
root with a 64 MB tmpfs /tmp, pids/memory/CPU limits, user 999:995. No-new-privileges has no
service option: each node's daemon.json sets `"no-new-privileges": true`. The user's ten
ports are published in host mode on the node that runs the task (the ingress mesh needs
IPVS and is not used).

Workspaces are bind-mounted from the same path on every node (shared storage, NFS in
production), so a task Swarm moves to another node finds the user's files there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import docker
import docker.errors
import docker.tls
import docker.types
import requests.exceptions
from tornado.ioloop import IOLoop

from threecompute.containers import hostside
from threecompute.containers.backend import PORTS_PER_USER, BackendError, Box, UserRef
from threecompute.containers.docker import (
    CONTAINER_USER,
    LABEL_DEPLOYMENT,
    LABEL_USER,
    DockerBackend,
    _api_message,
    _engine_reason,
    engine_client,
)
from threecompute.containers.reaper import Proc, parse_ps_rows
from threecompute.settings import Settings

log = logging.getLogger(__name__)

ENGINE_LABEL = "3compute.engine"
TASK_START_SECONDS = 60.0  # a fresh task, or one Swarm moves off a dead node
TASK_POLL_SECONDS = 0.1
TMPFS_BYTES = 64 * 1024 * 1024


class NoFirewall:
    """Under Swarm the containers run on other hosts: each node's firewall is the operator's."""

    status = "off (swarm: set on each node)"

    def install(self) -> str:
        return self.status

    def uninstall(self) -> None:
        pass


class SwarmBackend(DockerBackend):
    """One Swarm service per user; terminals on the node that runs it (see the module docstring)."""

    name = "swarm"

    def __init__(self, settings: Settings, docker_host: str | None = None, threads: int = 8) -> None:
        super().__init__(settings, docker_host, threads)
        self.firewall = NoFirewall()  # type: ignore[assignment]
        self._engines: dict[str, str] = {}  # container id → the engine URL of its node
        self._services: dict[str, str] = {}  # container id → its service id
        self._nodes: dict[str, docker.DockerClient] = {}
        self._nodes_lock = threading.Lock()

    async def purge(self) -> None:
        await self.reaper.stop()
        await self._run(self._purge)

    def _purge(self, client: docker.DockerClient) -> None:
        for service in client.api.services(filters={"label": self._labels_filter()}):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_service(service["ID"])
        self._ids.clear()
        self._running = 0

    # -- ensure -----------------------------------------------------------------------------

    async def _ensure_locked(self, user: UserRef) -> Box:
        try:
            service = await self._run(self._find_service, user.user_id)
            if service is None:
                async with self._cap_lock, self.cluster.lock("containers"):
                    await self._reserve(user.user_id)
                    service = await self._run(self._create_service, user)
            return await IOLoop.current().run_in_executor(self._pool, self._wait_for_task, user, service)
        except docker.errors.APIError as exc:
            raise BackendError(f"Swarm refused to start the container: {_api_message(exc)}") from None
        finally:
            self._starting.discard(user.user_id)

    def _find_service(self, client: docker.DockerClient, user_id: str) -> str | None:
        found = client.api.services(filters={"label": self._labels_filter(user_id)})
        return found[0]["ID"] if found else None

    def _create_service(self, client: docker.DockerClient, user: UserRef) -> str:
        """The user's service; the one another replica just made if it won the name."""
        self._prepare_workspace(user)
        try:
            made = client.api.create_service(**self._service_kwargs(user))
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            found = self._find_service(client, user.user_id)
            if found is None:
                raise
            return found
        self._counters["containers_created_total"] += 1
        log.info("created service %s for %s", made["ID"][:12], user.user_id)
        return made["ID"]

    def _service_kwargs(self, user: UserRef) -> dict[str, Any]:
        s = self.settings
        mounts = [
            docker.types.Mount("/app", str(user.workspace.absolute()), type="bind"),
            docker.types.Mount("/tmp", None, type="tmpfs", tmpfs_size=TMPFS_BYTES, tmpfs_mode=0o1777),
        ]
        spec = docker.types.ContainerSpec(
            s.container_image, command=["sleep", "infinity"], hostname="3compute", user=CONTAINER_USER,
            env={"HOME": "/app", "LANG": "C.UTF-8", "TERM": "xterm-256color"}, workdir="/app",
            labels=self._labels(user.user_id), mounts=mounts, read_only=True, init=True, cap_drop=["ALL"],
        )
        memory = docker.utils.parse_bytes(s.container_memory)
        resources = docker.types.Resources(cpu_limit=int(s.container_cpus * 1e9), mem_limit=memory)
        resources["Limits"]["Pids"] = s.container_pids  # API 1.41; the SDK has no argument for it
        # No restart delay: a task moved off a dead node starts as soon as the node is seen down.
        template = docker.types.TaskTemplate(spec, resources=resources,
                                             restart_policy=docker.types.RestartPolicy("any", delay=0))
        ports = [{"Protocol": "tcp", "TargetPort": p, "PublishedPort": p, "PublishMode": "host"}
                 for p in range(user.port_start, user.port_start + PORTS_PER_USER)]
        return {"task_template": template, "name": self.container_name(user.user_id),
                "labels": self._labels(user.user_id),
                "endpoint_spec": docker.types.EndpointSpec(mode="dnsrr", ports=ports)}

    def _wait_for_task(self, user: UserRef, service: str) -> Box:
        """The running container of the service's task on a live node; waits while Swarm
        places or moves it."""
        deadline = time.monotonic() + TASK_START_SECONDS
        last = "no task yet"
        while True:
            found, last = self._call(self._running_task, service, last)
            if found is not None:
                container_id, url = found
                self._engines[container_id], self._services[container_id] = url, service
                # The manager notices a dead node only after some heartbeats: ask the node.
                state = self._node_state(container_id)
                if state is not None:
                    self._ids[user.user_id] = container_id
                    self._hang_up_stale_on_node(container_id, state)
                    return Box(user=user, ref=container_id)
                last = f"the engine at {url} does not answer"
            if time.monotonic() >= deadline:
                raise BackendError(f"the container did not start within {TASK_START_SECONDS:g} s: {last}")
            time.sleep(TASK_POLL_SECONDS)

    def _running_task(self, client: docker.DockerClient, service: str,
                      last: str) -> tuple[tuple[str, str] | None, str]:
        """((container id, engine URL) or None, what the newest task says)."""
        try:
            tasks = client.api.tasks(filters={"service": service, "desired-state": "running"})
        except docker.errors.NotFound:
            raise BackendError("the container was removed while starting; try again") from None
        for task in sorted(tasks, key=lambda t: t.get("CreatedAt", ""), reverse=True):
            status = task.get("Status", {})
            container_id = status.get("ContainerStatus", {}).get("ContainerID")
            if status.get("State") == "running" and container_id:
                node = client.api.inspect_node(task["NodeID"])
                if node.get("Status", {}).get("State") == "ready":
                    return (container_id, self._node_engine(client, node)), last
                last = f"its node {node['Description']['Hostname']} is down"
            else:
                last = status.get("Err") or status.get("Message") or status.get("State") or last
        return None, last

    def _node_engine(self, client: docker.DockerClient, node: dict) -> str:
        url = node.get("Spec", {}).get("Labels", {}).get(ENGINE_LABEL)
        if url:
            return url
        if node["ID"] == client.info().get("Swarm", {}).get("NodeID"):
            return self._engine_url()
        raise BackendError(f"Swarm node {node['Description']['Hostname']} has no {ENGINE_LABEL} label")

    # -- the reaper's and the cap's view ----------------------------------------------------

    def _list_running(self, client: docker.DockerClient, states: tuple[str, ...] = ("running",)) -> dict[str, str]:
        """user id → container id of each service of ours whose task runs."""
        services = {s["ID"]: s["Spec"]["Labels"].get(LABEL_USER)
                    for s in client.api.services(filters={"label": self._labels_filter()})}
        found: dict[str, str] = {}
        for task in client.api.tasks(filters={"desired-state": "running"}):
            user_id = services.get(task.get("ServiceID"))
            container_id = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
            if user_id and container_id and task["Status"].get("State") == "running":
                found[user_id] = container_id
                self._services[container_id] = task["ServiceID"]
        return found

    def _list_active(self, client: docker.DockerClient) -> dict[str, str]:
        """Every service of ours counts against the cap, running or still being placed."""
        services = client.api.services(filters={"label": self._labels_filter()})
        return {s["Spec"]["Labels"][LABEL_USER]: s["ID"] for s in services if LABEL_USER in s["Spec"]["Labels"]}

    def _remove_quietly(self, client: docker.DockerClient, ref: str) -> None:
        """Remove the service of container `ref` (or the service `ref`): Swarm stops its task."""
        service = self._services.pop(ref, ref)
        self._engines.pop(ref, None)
        try:
            client.api.remove_service(service)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("cannot remove service %s: %s", service[:12], _api_message(exc))

    async def processes(self, ref: str) -> list[Proc]:
        top = await self._run_on(ref, lambda client: client.api.top(ref, ps_args="-eo pid,ppid,args"))
        return parse_ps_rows(top.get("Processes") or [])

    def _probe(self, client: docker.DockerClient) -> dict[str, Any]:
        info = super()._probe(client)
        nodes = client.api.nodes()
        info["nodes"] = len(nodes)
        info["nodes_ready"] = sum(1 for n in nodes if n.get("Status", {}).get("State") == "ready")
        return info

    # -- exec on the task's node ------------------------------------------------------------

    def _cli_host_args(self, ref: str | None = None) -> list[str]:
        url = self._engines.get(ref or "") or self._engine_url()
        args = ["-H", url]
        cert_path = os.environ.get("DOCKER_CERT_PATH")
        if url.startswith("tcp://") and cert_path:
            args += ["--tlsverify", f"--tlscacert={cert_path}/ca.pem", f"--tlscert={cert_path}/cert.pem",
                     f"--tlskey={cert_path}/key.pem"]
        return args

    def _exec(self, client: docker.DockerClient, ref: str, cmd: list[str]) -> str:
        return self._on_node(ref, lambda node: super(SwarmBackend, self)._exec(node, ref, cmd))

    def _hang_up_from_host(self, client: docker.DockerClient, ref: str, client_id: str) -> bool:
        return self._on_node(ref, lambda node: super(SwarmBackend, self)._hang_up_from_host(node, ref, client_id))

    def _node_state(self, container_id: str) -> dict | None:
        """The container's state on its node if it runs there, else None."""
        try:
            state = self._on_node(container_id, lambda node: node.api.inspect_container(container_id))
        except (BackendError, docker.errors.APIError):
            return None
        return state if state["State"]["Running"] else None

    def _hang_up_stale_on_node(self, container_id: str, state: dict) -> None:
        if self._host_side():
            self._hang_up_stale(None, container_id, state["State"]["Pid"])  # type: ignore[arg-type]

    async def _exec_for_user(self, user: UserRef, cmd: list[str]) -> None:
        ref = self._ids.get(user.user_id)
        if ref is None:
            ref = (await self.running_boxes()).get(user.user_id)
            if ref is None:
                return
        try:
            await self._run_on(ref, lambda node: super(SwarmBackend, self)._exec(node, ref, cmd))
        except docker.errors.APIError as exc:
            log.debug("exec %s in %s: %s", cmd[0], ref[:12], _api_message(exc))

    async def _run_on(self, ref: str, fn: Any) -> Any:
        return await IOLoop.current().run_in_executor(self._pool, self._on_node, ref, fn)

    def _on_node(self, ref: str, fn: Any) -> Any:
        """`fn(client of the engine that runs container ref)`; BackendError if it is unreachable."""
        url = self._engines.get(ref) or self._locate(ref)
        try:
            return fn(self._node_client(url))
        except docker.errors.APIError:
            raise
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                docker.errors.DockerException) as exc:
            with self._nodes_lock:
                dropped = self._nodes.pop(url, None)
            if dropped is not None:
                dropped.close()
            raise BackendError(f"the Docker engine of the container's node is unreachable at {url}: "
                               f"{_engine_reason(exc)}") from exc

    def _locate(self, ref: str) -> str:
        """The engine URL of the node that runs container `ref`, asked of the manager."""
        def find(client: docker.DockerClient) -> str:
            for task in client.api.tasks(filters={"desired-state": "running"}):
                if task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID") == ref:
                    return self._node_engine(client, client.api.inspect_node(task["NodeID"]))
            raise BackendError("the container is no longer running")
        url = self._call(find)
        self._engines[ref] = url
        return url

    def _node_client(self, url: str) -> docker.DockerClient:
        with self._nodes_lock:
            client = self._nodes.get(url)
            if client is None:
                base_url, tls = url, None
                cert_path = os.environ.get("DOCKER_CERT_PATH")
                if url.startswith("tcp://") and cert_path:  # mutual TLS, as the CLI does it
                    tls = docker.tls.TLSConfig(client_cert=(f"{cert_path}/cert.pem", f"{cert_path}/key.pem"),
                                               ca_cert=f"{cert_path}/ca.pem", verify=True)
                    base_url = url.replace("tcp://", "https://", 1)
                client = engine_client(base_url, tls=tls)
                self._nodes[url] = client
            return client

    def _host_side(self) -> bool:
        """Root on this host: the host-side detach checks the pid is the container's and
        falls back to a `docker exec` on the node when the node is another machine."""
        return hostside.available()


__all__ = ["ENGINE_LABEL", "LABEL_DEPLOYMENT", "SwarmBackend"]
