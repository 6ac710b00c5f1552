"""The server's Prometheus metrics: one registry per Services, never the library's global one,
so that several servers in one process (the tests) each count their own.

Events the server sees once (a request, a sign-in, an attach, a deploy) are counted or timed
where they happen. Per-chunk terminal figures (bytes, pauses, overflows) are kept as plain
integers on each session and summed only when /metrics is scraped, so the hot path pays no
lock per read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DEPLOY = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Live figures read from the hub and the backend at scrape time: name -> (type, help, source key).
HUB_GAUGES = {
    "open_terminals": "Terminal clients attached now",
    "terminal_users": "Users with at least one terminal open",
    "paused_terminals": "Terminals whose output is paused for flow control",
    "spares_waiting": "Attachments started ahead of need, ready for a user's next tab",
}
HUB_COUNTERS = {
    "terminal_output_bytes": ("pty_bytes_out_total", "Bytes read from terminals and sent to clients"),
    "terminal_input_bytes": ("pty_bytes_in_total", "Bytes typed into terminals"),
    "terminal_output_frames": ("pty_frames_out_total", "Output frames sent to terminal clients"),
    "terminal_flow_pauses": ("pty_pauses_total", "Times a terminal stopped reading for flow control"),
    "terminal_input_overflows": ("pty_input_overflows_total", "Inputs refused because the program stopped reading"),
    "terminals_opened": ("terminals_opened_total", "Terminal clients attached"),
    "terminals_closed": ("terminals_closed_total", "Terminal clients detached"),
    "terminals_exited": ("terminals_exited_total", "Terminals whose program ended by itself"),
    "spares_used": ("spares_used_total", "Tabs attached by taking a spare attachment"),
}
HUB_ERRORS = {"ensure": "ensure_errors_total", "spawn": "spawn_errors_total",
              "detach": "detach_errors_total", "send": "pty_send_errors_total"}


class LiveCollector(Collector):
    """Gauges and counters computed from the hub's and the backend's own figures on scrape."""

    def __init__(self, hub: Callable[[], dict[str, float]], backend: Callable[[], dict[str, float]],
                 errors: Callable[[], dict[str, float]], refusals: Callable[[], dict[str, float]]) -> None:
        self._hub, self._backend, self._errors, self._refusals = hub, backend, errors, refusals

    def collect(self) -> Iterator[Metric]:
        hub, backend = self._hub(), self._backend()
        for name, help_text in HUB_GAUGES.items():
            yield GaugeMetricFamily(f"threecompute_{name}", help_text, value=hub.get(name, 0))
        yield GaugeMetricFamily("threecompute_running_containers", "Containers running (last count)",
                                value=backend.get("running_containers", 0))
        for name, (key, help_text) in HUB_COUNTERS.items():
            yield CounterMetricFamily(f"threecompute_{name}", help_text, value=hub.get(key, 0))
        yield CounterMetricFamily("threecompute_containers_created", "Containers created",
                                  value=backend.get("containers_created_total", 0))
        yield CounterMetricFamily("threecompute_containers_reaped", "Idle containers stopped",
                                  value=backend.get("containers_reaped_total", 0))
        errors = CounterMetricFamily("threecompute_errors", "Errors, by kind", labels=["kind"])
        for kind, key in HUB_ERRORS.items():
            errors.add_metric([kind], hub.get(key, 0))
        for kind, value in self._errors().items():
            errors.add_metric([kind], value)
        yield errors
        refused = CounterMetricFamily("threecompute_refused", "Requests and terminals refused by a limit, by limit",
                                      labels=["limit"])
        refused.add_metric(["terminals"], hub.get("terminals_refused_total", 0))
        for limit, value in self._refusals().items():
            refused.add_metric([limit], value)
        yield refused


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_seconds = Histogram(
            "threecompute_http_request_duration_seconds", "HTTP requests, by route pattern, method and status",
            ["route", "method", "status"], buckets=FAST, registry=r)
        self.attach_seconds = Histogram(
            "threecompute_terminal_attach_seconds",
            "Connect to attached terminal; cold when the container had to be started", ["start"],
            buckets=SLOW, registry=r)
        self.first_output_seconds = Histogram(
            "threecompute_terminal_first_output_seconds", "Connect to the terminal's first output", ["start"],
            buckets=SLOW, registry=r)
        self.container_start_seconds = Histogram(
            "threecompute_container_start_seconds", "Creating or starting a user's container", buckets=SLOW,
            registry=r)
        self.deploy_seconds = Histogram(
            "threecompute_deploy_duration_seconds", "Runs of the deploy command, by outcome", ["outcome"],
            buckets=DEPLOY, registry=r)
        self.sign_ins = Counter("threecompute_sign_ins", "Sign-ins, by method", ["method"], registry=r)
        self.http_errors = 0  # 5xx answers, reported under threecompute_errors_total{kind="http_5xx"}
        self.users = Gauge("threecompute_users", "Users known to the store", registry=r)
        # Every series exists from the start (at 0), so that rate() sees the first event.
        for method in ("dev", "oauth"):
            self.sign_ins.labels(method)
        for start in ("cold", "warm"):
            self.attach_seconds.labels(start)
            self.first_output_seconds.labels(start)
        for outcome in ("ok", "failed"):
            self.deploy_seconds.labels(outcome)

    def watch(self, hub: Callable[[], dict[str, float]], backend: Callable[[], dict[str, float]],
              refusals: Callable[[], dict[str, float]] = dict) -> None:
        """Figures read from the hub, the backend and the rate limiters on every scrape."""
        self.registry.register(LiveCollector(hub, backend, lambda: {"http_5xx": self.http_errors}, refusals))

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(route, method, str(status)).observe(seconds)
        if status >= 500:
            self.http_errors += 1

    def attached(self, cold: bool, attach_seconds: float) -> None:
        self.attach_seconds.labels("cold" if cold else "warm").observe(attach_seconds)

    def first_output(self, cold: bool, seconds: float) -> None:
        self.first_output_seconds.labels("cold" if cold else "warm").observe(seconds)

    def deployed(self, exit_code: int | None, seconds: float) -> None:
        self.deploy_seconds.labels("ok" if exit_code == 0 else "failed").observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
