"""/metrics and /healthz of a real mitmdump, scraped over HTTP while real traffic flows.

Forward-proxy mode, raw sockets from chosen 127.0.0.0/8 sources (httpx drops the source
address when it talks to a proxy); the upstream is the echo server on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import write_yaml
from tests.e2e_util import raw_http
from tests.harness import ROOT, MitmDump, Upstream, free_port
from tests.test_ping import icmp_permitted

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
DASHBOARD = ROOT / "deploy" / "grafana" / "knoxcall.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config_for(upstream: Upstream, route: str = "api") -> dict:
    return {
        "environments": [{"name": "production"}, {"name": "staging"}],
        "clients": [
            {"name": "office", "ip_address": "127.0.0.8/29"},
            {"name": "lo-server", "ip_address": "127.0.0.1", "description": "pinged"},
        ],
        "routes": [{"name": route, "target_base_url": upstream.url}],
        "assignments": {route: {"production": ["office"]}},
    }


class Proxy:
    """A mitmdump in forward mode with the metrics endpoint on a free loopback port."""

    def __init__(self, dump: MitmDump, upstream: Upstream, metrics_port: int) -> None:
        self.dump = dump
        self.upstream = upstream
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"

    def get(self, source: str, headers: dict[str, str]) -> int:
        netloc = f"127.0.0.1:{self.upstream.port}"
        fields = {"Host": netloc, "Connection": "close", **headers}
        request = f"GET http://{netloc}/v1/x HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        answer = raw_http(source, "127.0.0.1", self.dump.port, (request + "\r\n").encode())
        return int(answer.split(b" ", 2)[1])

    def connect(self, source: str) -> int:
        target = f"127.0.0.1:{self.upstream.port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        return int(raw_http(source, "127.0.0.1", self.dump.port, request).split(b" ", 2)[1])

    def scrape_text(self) -> str:
        response = httpx.get(self.metrics_url + "/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    def scrape(self) -> Samples:
        return samples(self.scrape_text())


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    config = tmp_path / "config"
    config.mkdir()
    port = free_port()
    with Upstream("main") as upstream:
        write_yaml(config / "k.yaml", config_for(upstream))
        extra = ["--set", f"knoxcall_metrics=127.0.0.1:{port}", "--set", "knoxcall_ping_interval=1"]
        extra += ["--set", "knoxcall_drain_seconds=0"]  # stopped between tests: no balancer to wait for
        with MitmDump(config, access_log=tmp_path / "access.jsonl", extra=extra) as dump:
            yield Proxy(dump, upstream, port)


def test_counters_move_by_exactly_the_requests_sent_while_scraped(proxy: Proxy) -> None:
    before = proxy.scrape()
    sent = {"allowed": 0, "stranger": 0, "route": 0, "environment": 0, "connect": 0}
    statuses: list[int] = []

    def traffic() -> None:
        for i in range(20):
            statuses.append(proxy.get(OFFICE, {"x-knoxcall-route": "api"}))
            sent["allowed"] += 1
            statuses.append(proxy.get(STRANGER, {"x-knoxcall-route": "api"}))
            sent["stranger"] += 1
            if i % 2 == 0:  # names a caller made up: never a label, counted under "-"
                statuses.append(proxy.get(OFFICE, {"x-knoxcall-route": f"made-up-{i}"}))
                sent["route"] += 1
                statuses.append(proxy.get(OFFICE, {"x-knoxcall-route": "api", "x-knoxcall-environment": f"nope-{i}"}))
                sent["environment"] += 1
            if i % 5 == 0:
                statuses.append(proxy.connect(STRANGER))
                sent["connect"] += 1

    sender = threading.Thread(target=traffic)
    sender.start()
    scrapes = 0
    previous = 0.0
    try:
        for _ in range(2000):  # bounded; scrape as long as the traffic flows
            if not sender.is_alive():
                break
            total = sum(v for (name, _), v in proxy.scrape().items() if name == "knoxcall_requests_total")
            assert total >= previous  # counters only grow, and every scrape parses
            previous = total
            scrapes += 1
    finally:
        sender.join(120)
    assert not sender.is_alive()
    assert scrapes >= 1
    assert statuses.count(200) == sent["allowed"]
    after = proxy.scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "knoxcall_requests_total"
    assert (
        moved(requests, route="api", environment="production", decision="allowed", reason="client", report_only="false")
        == 20
    )
    assert (
        moved(
            requests,
            route="api",
            environment="production",
            decision="denied",
            reason="ip_not_whitelisted",
            report_only="false",
        )
        == 20
    )
    assert (
        moved(requests, route="-", environment="-", decision="denied", reason="route_not_found", report_only="false")
        == 10
    )
    assert (
        moved(
            requests,
            route="api",
            environment="-",
            decision="denied",
            reason="environment_not_found",
            report_only="false",
        )
        == 10
    )
    http_total = sum(sent[k] for k in ("allowed", "stranger", "route", "environment"))
    assert moved("knoxcall_decision_duration_seconds_count") == http_total
    assert (
        sum(v for (n, _), v in after.items() if n == requests) - sum(v for (n, _), v in before.items() if n == requests)
        == http_total
    )
    connections = "knoxcall_connections_total"
    assert moved(connections, kind="tunnel", decision="denied", reason="ip_not_whitelisted") == sent["connect"]

    text = proxy.scrape_text()
    for caller_value in (STRANGER, OFFICE, "made-up-", "nope-"):  # no caller's value is a label
        assert caller_value not in text


def test_healthz_names_the_config_version_in_force(proxy: Proxy) -> None:
    assert proxy.get(OFFICE, {"x-knoxcall-route": "api"}) == 200
    version = proxy.dump.access_records()[-1]["config_version"] if proxy.dump.access_records() else None
    response = httpx.get(proxy.metrics_url + "/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    assert response.json()["config_version"] == version
    assert value(proxy.scrape(), "knoxcall_config_info", version=version) == 1
    assert value(proxy.scrape(), "knoxcall_ready") == 1
    assert httpx.get(proxy.metrics_url + "/other", timeout=10).status_code == 404


def test_reloads_are_counted_by_result(proxy: Proxy, tmp_path: Path) -> None:
    old = json.loads(httpx.get(proxy.metrics_url + "/healthz", timeout=10).text)["config_version"]
    config = proxy.dump.config
    mark = len(proxy.dump.log_text())
    (config / "broken.yaml").write_text("clients: [\n", encoding="utf-8")
    proxy.dump.wait_for_log("is invalid, still serving", timeout=30, after=mark)
    found = proxy.scrape()
    assert value(found, "knoxcall_config_reloads_total", result="invalid") == 1
    assert value(found, "knoxcall_config_reloads_total", result="ok") == 0
    assert value(found, "knoxcall_config_info", version=old) == 1  # still serving it

    mark = len(proxy.dump.log_text())
    (config / "broken.yaml").unlink()
    write_yaml(config / "k.yaml", config_for(proxy.upstream, route="renamed"))
    proxy.dump.wait_for_log("reloaded", timeout=30, after=mark)
    found = proxy.scrape()
    assert value(found, "knoxcall_config_reloads_total", result="ok") == 1
    new = json.loads(httpx.get(proxy.metrics_url + "/healthz", timeout=10).text)["config_version"]
    assert new != old
    assert value(found, "knoxcall_config_info", version=new) == 1
    assert ("knoxcall_config_info", (("version", old),)) not in found
    # the route the new config dropped is "-" from now on; the new one is its own label
    before = proxy.scrape()
    assert proxy.get(OFFICE, {"x-knoxcall-route": "api"}) == 404
    assert proxy.get(OFFICE, {"x-knoxcall-route": "renamed"}) == 200
    after = proxy.scrape()
    for labels in (
        {"route": "-", "environment": "-", "decision": "denied", "reason": "route_not_found", "report_only": "false"},
        {
            "route": "renamed",
            "environment": "production",
            "decision": "allowed",
            "reason": "client",
            "report_only": "false",
        },
    ):
        assert (
            value(after, "knoxcall_requests_total", **labels) - value(before, "knoxcall_requests_total", **labels) == 1
        )


def test_connectivity_of_monitored_clients(proxy: Proxy) -> None:
    if not icmp_permitted():
        pytest.skip("ICMP sockets are not permitted here")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = proxy.scrape()
        if value(found, "knoxcall_client_connectivity", client="lo-server", status="healthy") == 1:
            break
        time.sleep(0.2)
    assert value(found, "knoxcall_client_connectivity", client="lo-server", status="healthy") == 1
    assert value(found, "knoxcall_client_connectivity", client="lo-server", status="down") == 0
    assert not any(
        name == "knoxcall_client_connectivity" and dict(labels)["client"] == "office" for name, labels in found
    )


def dashboard_metric_names() -> set[str]:
    """Every knoxcall_* name in the dashboard's queries (panels' expr, variables' query)."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {name for query in queries for name in re.findall(r"\bknoxcall_[a-z_]+\b", query)}


def test_every_metric_the_dashboard_queries_is_served(proxy: Proxy) -> None:
    assert proxy.get(OFFICE, {"x-knoxcall-route": "api"}) == 200
    assert proxy.get(STRANGER, {"x-knoxcall-route": "api"}) == 403
    assert proxy.connect(STRANGER) == 403
    text = proxy.scrape_text()
    served = {name for name, _ in samples(text)}
    # families declared but without a sample yet (e.g. no rate limit has refused anyone)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    # (the text format declares a counter by its _total name)
    suffixes = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = dashboard_metric_names()
    assert {
        "knoxcall_requests_total",
        "knoxcall_decision_duration_seconds_bucket",
        "knoxcall_config_reloads_total",
    } <= names
    missing = [
        name
        for name in names
        if name not in served
        and not any(name == family + suffix for family, kind in types.items() for suffix in suffixes.get(kind, ()))
    ]
    assert not missing, f"the dashboard queries metrics that /metrics does not serve: {missing}"
