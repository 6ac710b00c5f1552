"""The services one server runs with, built once from the settings and handed to the
handlers through `make_app` (never module globals, so a test can build its own)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from .classrooms import Classrooms
from .containers import make_backend
from .containers.backend import ContainerBackend, UserRef
from .deploy import Deployer
from .grading import Grader
from .identity import OAuthClient, TokenCodec
from .keepalive import Keepalive
from .limits import UserLimits
from .metrics import Metrics
from .pty.hub import TerminalHub, TerminalLimits
from .ratelimit import RateLimiter
from .settings import ConfigError, Settings
from .store import Store, User, open_store
from .threadpool import ThreadPool
from .workspace import Workspaces
from .workspace_disks import WorkspaceDisks, missing_tools

CONTAINER_OWNER = (999, 995)


@dataclass
class Services:
    settings: Settings
    store: Store
    tokens: TokenCodec
    oauth: OAuthClient
    workspaces: Workspaces
    backend: ContainerBackend
    hub: TerminalHub
    deployer: Deployer
    file_executor: ThreadPool
    rate_limits: dict[str, RateLimiter] = field(default_factory=dict)  # "files", "tabs", "signin"
    open_sockets: set = field(default_factory=set)  # live terminal connections, for shutdown
    keepalive: Keepalive = field(default_factory=Keepalive)  # pings the terminal WebSockets
    limits: UserLimits = field(default_factory=UserLimits)  # each user's share of uploads and threads
    metrics: Metrics = field(default_factory=Metrics)
    classrooms: Classrooms = field(init=False)
    grader: Grader = field(init=False)

    def __post_init__(self) -> None:
        self.classrooms = Classrooms(self.store, self.settings)
        self.grader = Grader(self.settings, self.classrooms)

    def user_ref(self, user: User) -> UserRef:
        return UserRef(user_id=user.id, port_start=user.port_start,
                       workspace=self.settings.workspaces_dir / user.id)

    async def terminal_user(self, user_id: str) -> UserRef | None:
        """The stored user, with their workspace folder made, ready to attach a terminal."""
        record = await self.store.get_user(user_id)
        if record is None:
            return None
        await asyncio.get_running_loop().run_in_executor(self.file_executor, self.workspaces.for_user, record.id)
        return self.user_ref(record)

    def forget_idle(self) -> None:
        """Let go of what only people who stopped working needed: verified tokens, workspace
        handles and their listings, full rate buckets, idle engine connections. Called
        periodically, each record is kept for one to two periods after its last use, so that
        memory follows the people working now, not everyone ever seen."""
        self.tokens.forget_idle()
        self.workspaces.forget_idle()
        for limiter in self.rate_limits.values():
            limiter.forget_idle()
        self.hub.forget_idle()
        self.backend.forget_idle()

    def close(self) -> None:
        self.backend.close()
        self.grader.close()
        self.file_executor.shutdown(wait=True)
        self.store.close()


def workspace_disks(settings: Settings, owner: tuple[int, int] | None) -> WorkspaceDisks | None:
    if settings.workspace_disks != "loop":
        return None
    if os.geteuid() != 0:
        raise ConfigError("WORKSPACE_DISKS=loop needs root: it mounts each workspace's filesystem")
    if missing := missing_tools():
        raise ConfigError(f"WORKSPACE_DISKS=loop needs {', '.join(missing)} (apt-get install e2fsprogs mount)")
    return WorkspaceDisks(settings.data_dir / "disks", settings.workspace_quota_mb * 2**20, owner)


def build_services(settings: Settings, backend: ContainerBackend | None = None) -> Services:
    owner = CONTAINER_OWNER if os.geteuid() == 0 else None
    disks = workspace_disks(settings, owner)  # refused settings stop the start before anything opens
    settings.workspaces_dir.mkdir(parents=True, exist_ok=True)
    backend = backend or make_backend(settings)
    store = open_store(settings)
    backend.use_cluster(store.cluster())
    metrics = Metrics()
    hub = TerminalHub(backend, TerminalLimits(settings.max_terminals_per_user, settings.max_terminals,
                                              settings.terminal_open_rate), metrics, settings.spare_attach_seconds)
    rate_limits = {"files": RateLimiter(settings.file_rate), "tabs": RateLimiter(settings.tabs_rate),
                   "signin": RateLimiter(settings.signin_rate)}
    metrics.watch(hub.metrics, backend.metrics,
                  lambda: {kind: limiter.refused for kind, limiter in rate_limits.items()})
    return Services(
        settings=settings,
        store=store,
        tokens=TokenCodec(settings.secret, settings.session_days * 86400),
        oauth=OAuthClient(settings),
        workspaces=Workspaces(settings.workspaces_dir, owner, quota_bytes=settings.workspace_quota_mb * 2**20,
                              disks=disks),
        backend=backend,
        hub=hub,
        deployer=Deployer(settings.deploy_command, metrics.deployed),
        file_executor=ThreadPool(8, "files"),
        metrics=metrics,
        rate_limits=rate_limits,
    )
