"""Operations: /healthz for load balancers and /metrics for Prometheus."""

from __future__ import annotations

import asyncio

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
        users = await self.services.store.count_users()
        gauges = {
            "users": users,
            **prefixed("terminal", self.services.hub.metrics()),
            **prefixed("backend", self.services.backend.metrics()),
            **{f"ratelimit_{kind}_refused_total": limiter.refused
               for kind, limiter in self.services.rate_limits.items()},
        }
        lines = []
        for name, value in sorted(gauges.items()):
            lines.append(f"# TYPE threecompute_{name} gauge")
            lines.append(f"threecompute_{name} {float(value):g}")
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish("\n".join(lines) + "\n")


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in values.items()}
