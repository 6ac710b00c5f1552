"""Containers under several replicas: each replica is a DockerBackend of its own on one
deployment (one DATA_DIR, one engine), sharing a PostgreSQL database as the real ones do."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from threecompute.containers.backend import BackendError
from threecompute.containers.docker import DockerBackend
from threecompute.store_pg import PostgresStore

from . import test_docker_backend as single
from .test_docker_backend import deployment_containers, make_user

engine, settings_for = single.engine, single.settings_for  # the fixtures, shared

pytestmark = pytest.mark.docker


@contextlib.asynccontextmanager
async def replicas(settings, url: str | None, count: int = 2) -> AsyncIterator[list[DockerBackend]]:
    """`count` backends; with `url`, each with its own store (own connections, own replica id)."""
    stores = [PostgresStore(url, settings.port_base) for _ in range(count)] if url else []
    backends = [DockerBackend(settings) for _ in range(count)]
    for backend, store in zip(backends, stores, strict=False):
        backend.use_cluster(store.cluster())
    try:
        yield backends
    finally:
        for backend in backends:
            await backend.stop()
        for store in stores:
            store.close()


def test_a_first_connect_racing_on_two_replicas_makes_one_container(engine, settings_for, postgres_url):
    settings = settings_for()
    user = make_user(settings, "racer")
    url = postgres_url

    async def scenario() -> set[str]:
        async with replicas(settings, url) as (a, b):
            boxes = await asyncio.gather(*(backend.ensure(user) for _ in range(4) for backend in (a, b)))
            return {box.ref for box in boxes}

    refs = asyncio.run(scenario())
    assert len(refs) == 1
    containers = deployment_containers(engine, settings)
    assert [c.id for c in containers] == list(refs) and containers[0].status == "running"


def test_max_containers_holds_across_replicas(engine, settings_for, postgres_url):
    settings = settings_for(max_containers=2)
    users = [make_user(settings, f"cap{i}") for i in range(4)]

    async def scenario() -> list:
        async with replicas(settings, postgres_url) as (a, b):
            return await asyncio.gather(*(backend.ensure(user) for backend, user in zip([a, b, a, b], users,
                                                                                         strict=True)),
                                        return_exceptions=True)

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 2 and all(isinstance(r, BackendError) and "limit" in str(r) for r in refused), results
    assert len(deployment_containers(engine, settings)) == 2


def test_one_reaper_at_a_time_and_a_tab_open_on_another_replica_keeps_the_container(
        engine, settings_for, postgres_url):
    settings = settings_for(idle_timeout_seconds=2.0, idle_poll_seconds=0.3)
    tabbed, idle = make_user(settings, "tabbed"), make_user(settings, "idle")

    async def scenario() -> None:
        async with replicas(settings, postgres_url) as (a, b):
            for backend in (a, b):
                await backend.start()
            box = await a.ensure(tabbed)
            a.terminal_opened(tabbed)  # the tab is open on A only; B knows of it through the store
            idle_box = await a.ensure(idle)
            deadline = time.monotonic() + 120  # generous: a busy engine takes tens of seconds to remove one
            while idle_box.ref in {c.id for c in deployment_containers(engine, settings)}:
                assert time.monotonic() < deadline, "the idle container was not removed"
                await asyncio.sleep(0.2)
            await asyncio.sleep(3.0)  # well past the timeout: the tabbed one stays, whoever sweeps
            assert [c.id for c in deployment_containers(engine, settings)] == [box.ref]
            assert a.reaper.reaped + b.reaper.reaped == 1
            assert {a.reaper._leading, b.reaper._leading} == {True, False}  # one lease holder

            a.terminal_closed(tabbed)
            deadline = time.monotonic() + 120  # generous: a busy engine takes tens of seconds to remove one
            while deployment_containers(engine, settings):
                assert time.monotonic() < deadline, "the container outlived its last tab"
                await asyncio.sleep(0.2)

    asyncio.run(scenario())
