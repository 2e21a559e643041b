"""Prometheus metrics and a readiness probe, on their own loopback port (option ``knoxcall_metrics``).

- `Metrics`: a prometheus_client registry with what KnoxCall counts per decision (HTTP
  requests, connections, decision latency, rate limits) and a collector that reads the
  rest at scrape time (config version, reloads, connectivity, access-log lines lost).
- `MetricsServer`: ``/metrics`` (prometheus_client's WSGI app: text format, OpenMetrics,
  gzip) and ``/healthz`` (200 with the config version while a policy is in force and
  KnoxCall's hooks decide, 503 otherwise, and while draining before a stop), served by a stdlib server thread: never on
  mitmproxy's event loop, never through the proxy.

Per request the proxy pays two dict lookups, an addition and a bisection: the request
counts and the decision latency histogram are plain numbers on the event loop, which the
scrape thread copies (`RequestCollector`; the event loop is their only writer, and a copy
of a dict or list is one step under the GIL), instead of prometheus_client's locked
values (a quarter of what metrics cost per request). Nothing at all when the option is off. Label
values are bounded: route and environment names come from the config in force (a name a
caller made up is counted as ``-``), decisions and reasons from the code's fixed lists.
No client IP, key or other caller value is ever a label. A failure in here is logged
once and never stops a decision (fail closed is the decision's business, not this one's).

No mitmproxy import: the addon hands in a function that returns its `State`.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from knoxcall_addon.decision import ALLOWED_REASONS, DENIED_REASONS, Decision
from knoxcall_addon.policy import Policy
from knoxcall_addon.ratelimit import RATE_LIMITED, STORE_UNAVAILABLE

logger = logging.getLogger("knoxcall")

DEFAULT_HOST = "127.0.0.1"
UNKNOWN = "-"  # the label of a route or environment that is not in the config in force (or none)
OTHER = "other"  # a decision or reason outside the fixed lists (none today: a guard against a new one)
REASONS = frozenset({*ALLOWED_REASONS, *DENIED_REASONS, RATE_LIMITED, STORE_UNAVAILABLE})
DECISIONS = frozenset({"allowed", "denied", "report"})
CONNECTION_KINDS = ("tunnel", "connection", "raw", "dns")
CONNECTIVITY_STATUSES = ("Healthy", "Degraded", "Down")
# decisions take 10-20 µs; a shared rate limit store adds a network round trip
LATENCY_BUCKETS = (
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
SOCKET_TIMEOUT = 10.0  # seconds a scrape connection may stay silent: a stuck client holds no thread for ever


@dataclass(frozen=True)
class State:
    """The addon's state as a scrape sees it; plain values, made on demand."""

    version: str | None  # the config version in force, None when no policy is
    ready: bool  # a policy is in force and KnoxCall's hooks decide (what /healthz says)
    loaded_at: float | None = None  # when the policy in force came into force (Unix time)
    reloads_ok: int = 0
    reloads_invalid: int = 0
    access_log_lost: int = 0  # access-log lines that could not be written, since start
    # (client, status) per monitored address; None when connectivity monitoring is off
    connectivity: tuple[tuple[str, str], ...] | None = None
    draining: bool = False  # SIGTERM came: not ready, stopping soon (drain.py)


def parse_address(value: str) -> tuple[str, int]:
    """``knoxcall_metrics`` as (host, port): ``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT``.

    A bare port listens on 127.0.0.1: the endpoint is not for the callers of the proxy.
    Raises ValueError with what is wrong.
    """
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    elif host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: an IPv6 address is written [address]:port")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address as [address]:port")
    if not host:
        host = DEFAULT_HOST
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{value!r}: {host!r} is not an IP address (or localhost)") from None
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def connection_kind(tunnel: bool, raw: bool, method: str | None) -> str:
    """The ``kind`` label of a connection decided without an HTTP request."""
    if tunnel:
        return "tunnel"
    if raw:
        return "raw"
    return "dns" if method == "DNS" else "connection"


class Metrics:
    """The registry and the per-decision counters; `policy_installed` keeps the labels bounded."""

    def __init__(self, state: Callable[[], State] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # knoxcall_requests and knoxcall_decision_duration_seconds: see RequestCollector
        self.request_counts: dict[tuple[str, ...], int] = {}  # label values -> requests
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last: +Inf
        self.latency_sum = 0.0
        self.connections = Counter(
            "knoxcall_connections",
            "Connections decided without an HTTP request: tunnel (CONNECT), connection (raw reverse modes), "
            "raw (TCP/UDP KnoxCall cannot read), dns; by decision and reason",
            ("kind", "decision", "reason"),
            registry=self.registry,
        )
        self.rate_limit_refusals = Counter(
            "knoxcall_rate_limit_refusals",
            "Requests over a rate limit, by route and environment; report_only=true: let through in report mode",
            ("route", "environment", "report_only"),
            registry=self.registry,
        )
        self.rate_limit_store_errors = Counter(
            "knoxcall_rate_limit_store_errors",
            "Requests whose rate limit store could not be asked (the fallback decided)",
            registry=self.registry,
        )
        self.registry.register(RequestCollector(self))
        if state is not None:
            self.registry.register(StateCollector(state))
        # (route, env, decision, reason, report_only) -> (label values, the rate limit refusals child or None)
        self._children: dict[tuple[Any, ...], tuple[tuple[str, ...], Any]] = {}
        self._connection_children: dict[tuple[Any, ...], Any] = {}
        self._routes: frozenset[str] = frozenset()
        self._environments: frozenset[str] = frozenset()
        self._failed = False

    def policy_installed(self, policy: Policy) -> None:
        """The route and environment names that may be labels from now on (on the event loop)."""
        self._routes = frozenset(policy.routes)
        self._environments = frozenset(policy.config.environments)
        self._children = {}  # a name the new config dropped is "-" from now on

    # -- per decision (event loop) ------------------------------------------------------

    def request_decided(self, decision: Decision, seconds: float) -> None:
        """Count one HTTP request's decision and how long it took."""
        try:
            key = (decision.route, decision.environment, decision.decision, decision.reason, decision.report_only)
            bound = self._children.get(key)
            if bound is None:
                bound = self._bind(key)
            values, refusals = bound
            counts = self.request_counts
            counts[values] = counts.get(values, 0) + 1
            if refusals is not None:
                refusals.inc()
            self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
            self.latency_sum += seconds
        except Exception:
            self._failure()

    def connection_decided(self, decision: Decision, kind: str) -> None:
        """Count a CONNECT, raw connection or DNS request decided (``kind`` in CONNECTION_KINDS)."""
        try:
            key = (kind, decision.decision, decision.reason)
            child = self._connection_children.get(key)
            if child is None:
                labels = (kind if kind in CONNECTION_KINDS else OTHER, *self._fixed(key[1], key[2]))
                child = self._connection_children[key] = self.connections.labels(*labels)
            child.inc()
        except Exception:
            self._failure()

    def rate_limit_refused(self, route: str | None, environment: str | None, report_only: bool = False) -> None:
        """Count a request over a rate limit (refused with 429, or let through in report mode).

        `request_decided` counts these by itself (reason rate_limited); this is for other callers."""
        try:
            labels = (self._route(route), self._environment(environment), "true" if report_only else "false")
            self.rate_limit_refusals.labels(*labels).inc()
        except Exception:
            self._failure()

    def rate_limit_store_error(self) -> None:
        """Count a request whose rate limit store could not be asked."""
        try:
            self.rate_limit_store_errors.inc()
        except Exception:
            self._failure()

    def _bind(self, key: tuple[Any, ...]) -> tuple[tuple[str, ...], Any]:
        """A decision's label values, and the rate limit refusals child it also counts in (or
        None); kept only when every label is its own value, so that names made up by callers
        (all "-") never grow the cache."""
        route, environment, decision, reason, report_only = key
        report = "true" if report_only else "false"
        labels = (self._route(route), self._environment(environment), *self._fixed(decision, reason), report)
        refusals = self.rate_limit_refusals.labels(labels[0], labels[1], report) if reason == RATE_LIMITED else None
        bound = (labels, refusals)
        if (route or UNKNOWN) == labels[0] and (environment or UNKNOWN) == labels[1]:
            self._children[key] = bound
        return bound

    def _route(self, name: str | None) -> str:
        return name if name in self._routes else UNKNOWN

    def _environment(self, name: str | None) -> str:
        return name if name in self._environments else UNKNOWN

    @staticmethod
    def _fixed(decision: str, reason: str) -> tuple[str, str]:
        return (decision if decision in DECISIONS else OTHER, reason if reason in REASONS else OTHER)

    def _failure(self) -> None:
        if not self._failed:  # once: a metrics bug must not flood the event log either
            self._failed = True
            logger.warning("knoxcall: updating a metric failed (decisions are not affected)", exc_info=True)


class RequestCollector:
    """knoxcall_requests and knoxcall_decision_duration_seconds, from `Metrics`' plain counts.

    Read in the scrape's thread while the event loop counts: each is copied in one step
    (``dict(...)``, ``list(...)``: no Python code runs meanwhile, so the GIL is not let go).
    """

    REQUEST_LABELS = ("route", "environment", "decision", "reason", "report_only")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families({}, [0] * (len(LATENCY_BUCKETS) + 1), 0.0)

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        return self._families(dict(metrics.request_counts), list(metrics.latency_counts), metrics.latency_sum)

    def _families(self, counts: dict[tuple[str, ...], int], latency: list[int], total: float) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "knoxcall_requests",
            "HTTP requests decided, by route, environment, decision and reason (- for a route or environment "
            "not in the config); report_only=true: let through in report mode, refused once enforced",
            labels=self.REQUEST_LABELS,
        )
        for values, count in counts.items():
            requests.add_metric(values, count)
        cumulative = list(itertools.accumulate(latency))
        buckets = [(floatToGoString(bound), count) for bound, count in zip(LATENCY_BUCKETS, cumulative, strict=False)]
        yield requests
        yield HistogramMetricFamily(
            "knoxcall_decision_duration_seconds",
            "Time KnoxCall took to decide an HTTP request (reading it, deciding, preparing it for upstream)",
            buckets=[*buckets, ("+Inf", cumulative[-1])],
            sum_value=total,
        )


class StateCollector:
    """Metrics read from the addon at scrape time: nothing to update per request or reload."""

    def __init__(self, state: Callable[[], State]) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            state = self.state()
        except Exception:
            logger.warning("knoxcall: reading the state for /metrics failed", exc_info=True)
            state = State(None, False)
        return self._families(state)

    @staticmethod
    def _families(state: State | None) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "knoxcall_ready", "1 while a config is in force and KnoxCall's hooks decide (as /healthz), else 0"
        )
        info = GaugeMetricFamily(
            "knoxcall_config_info", "The config version in force (always 1; absent while none is)", labels=["version"]
        )
        loaded = GaugeMetricFamily(
            "knoxcall_config_loaded_timestamp_seconds", "When the config in force came into force (Unix time)"
        )
        reloads = CounterMetricFamily(
            "knoxcall_config_reloads",
            "Reloads of the config folder (hot reload, knoxcall.reload), by result: ok (put in force) or invalid "
            "(refused; the config in force stays)",
            labels=["result"],
        )
        lost = CounterMetricFamily(
            "knoxcall_access_log_lines_lost", "Access-log lines that could not be written (disk full, file gone)"
        )
        connectivity = GaugeMetricFamily(
            "knoxcall_client_connectivity",
            "Monitored addresses (knoxcall_ping_interval) of each client, by ICMP status",
            labels=["client", "status"],
        )
        if state is not None:
            ready.add_metric([], 1 if state.ready else 0)
            if state.version is not None:
                info.add_metric([state.version], 1)
            if state.loaded_at is not None:
                loaded.add_metric([], state.loaded_at)
            reloads.add_metric(["ok"], state.reloads_ok)
            reloads.add_metric(["invalid"], state.reloads_invalid)
            lost.add_metric([], state.access_log_lost)
            by_client: dict[str, dict[str, int]] = {}
            for client, status in state.connectivity or ():
                counts = by_client.setdefault(client, dict.fromkeys(CONNECTIVITY_STATUSES, 0))
                counts[status if status in counts else "Down"] += 1
            for client, counts in sorted(by_client.items()):
                for status, count in counts.items():
                    connectivity.add_metric([client, status.lower()], count)
        yield from (ready, info, loaded, reloads, lost, connectivity)


# -- the HTTP endpoint ---------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds up mitmproxy's exit


class _QuietHandler(WSGIRequestHandler):
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


def _server_class(host: str) -> type[_Server]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("MetricsHTTPServer", (_Server,), {"address_family": family})


class MetricsServer:
    """``/metrics`` and ``/healthz`` on (host, port), in a daemon thread; `start` binds or raises OSError."""

    def __init__(self, metrics: Metrics, health: Callable[[], State], host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self.port = port
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        self._server = make_server(
            self.host, self.port, self._app, server_class=_server_class(self.host), handler_class=_QuietHandler
        )
        self.port = self._server.server_address[1]  # port 0: the one the system chose
        self._thread = threading.Thread(target=self._server.serve_forever, name="knoxcall-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        try:
            if path == "/metrics":
                return self._metrics_app(environ, start_response)
            if path == "/healthz":
                return self._healthz(environ, start_response)
            return _answer(start_response, "404 Not Found", {"error": "not found", "paths": ["/metrics", "/healthz"]})
        except Exception:
            logger.warning(f"knoxcall: the metrics endpoint failed to answer {path[:100]!r}", exc_info=True)
            return _answer(start_response, "500 Internal Server Error", {"error": "internal error"})

    def _healthz(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", {"error": "method not allowed"})
        state = self.health()
        if state.ready and state.version is not None:
            body = {"status": "ready", "config_version": state.version}
            return _answer(start_response, "200 OK", body, environ.get("REQUEST_METHOD") == "HEAD")
        why = "no config in force" if state.version is None else "KnoxCall's hooks are not active"
        if state.draining:
            why = "draining: this proxy is stopping (SIGTERM)"
        body = {"status": "not ready", "reason": why}
        return _answer(start_response, "503 Service Unavailable", body, environ.get("REQUEST_METHOD") == "HEAD")


def _answer(start_response: Callable[..., Any], status: str, body: dict[str, Any], head: bool = False) -> list[bytes]:
    payload = json.dumps(body).encode() + b"\n"
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), ("Cache-Control", "no-store")],
    )
    return [] if head else [payload]


def reconfigure(
    server: MetricsServer | None, value: str, state: Callable[[], State], policy: Policy | None
) -> MetricsServer | None:
    """The endpoint for a new ``knoxcall_metrics`` value: started, moved (counts kept) or stopped.

    Raises ValueError for a bad value and OSError when the address cannot be listened on;
    the endpoint running before (if any) then runs on unchanged.
    """
    if not value.strip():
        if server is not None:
            server.stop()
            logger.info(f"knoxcall: metrics endpoint {server.address} stopped")
        activate(None)
        return None
    host, port = parse_address(value)
    if server is not None and (server.host, server.port) == (host, port):
        return server
    metrics = server.metrics if server is not None else Metrics(state)
    if policy is not None:
        metrics.policy_installed(policy)
    new = MetricsServer(metrics, state, host, port)
    try:
        new.start()  # OSError: the old one runs on
    except OSError:
        if server is None or server.port != port:
            raise
        # e.g. 127.0.0.1:9464 -> 0.0.0.0:9464: the old one holds the port; hand it over
        server.stop()
        try:
            new.start()
        except OSError:
            server.start()  # back where it was (its port was just freed)
            raise
        server = None
    if server is not None:
        server.stop()
    activate(metrics)
    exposed = "" if is_loopback(host) else " (not loopback: reachable from other hosts, firewall it)"
    logger.info(f"knoxcall: metrics at http://{new.address}/metrics, readiness at /healthz{exposed}")
    return new


# -- for the rate-limit code: counted when metrics are on, nothing otherwise -----------------

_active: Metrics | None = None


def activate(metrics: Metrics | None) -> None:
    """The Metrics that the module-level functions below count into (None: they do nothing)."""
    global _active
    _active = metrics


def count_rate_limit_refusal(route: str | None, environment: str | None, report_only: bool = False) -> None:
    """A request went over a rate limit (refused, or let through in report mode)."""
    metrics = _active
    if metrics is not None:
        metrics.rate_limit_refused(route, environment, report_only)


def count_rate_limit_store_error() -> None:
    """A request's rate limit store could not be asked (the fallback decided)."""
    metrics = _active
    if metrics is not None:
        metrics.rate_limit_store_error()
