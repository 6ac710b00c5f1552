"""Operations: /healthz for load balancers and /metrics for Prometheus."""

from __future__ import annotations

import asyncio

from ..metrics import CONTENT_TYPE
from .base import BaseHandler

HEALTH_TIMEOUT_SECONDS = 3.0


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        store, docker = await asyncio.gather(
            bounded(self.services.store.health()), bounded(self.services.backend.health())
        )
        status = "down" if not store["ok"] else "ok" if docker["ok"] else "degraded"
        self.answer({"status": status, "store": store, "docker": docker, "backend": self.services.backend.name},
                    200 if store["ok"] else 503)


async def bounded(check) -> dict:  # noqa: ANN001 - an awaitable health check
    try:
        return await asyncio.wait_for(check, HEALTH_TIMEOUT_SECONDS)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {HEALTH_TIMEOUT_SECONDS:.0f} s"}
    except Exception as exc:  # a health check reports failures; it never raises
        return {"ok": False, "error": str(exc) or type(exc).__name__}


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        metrics = self.services.metrics
        metrics.users.set(await self.services.store.count_users())
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(metrics.text())
