"""metrics.py on its own: the option's value, bounded labels, the endpoint over real HTTP,
and the addon's option (off: nothing counted; a bad value: an OptionsError)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families

from knoxcall_addon import metrics
from knoxcall_addon.decision import ALLOWED_REASONS, DENIED_REASONS, RequestFacts, decide
from knoxcall_addon.metrics import Metrics, MetricsServer, State, parse_address
from knoxcall_addon.policy import load_policy
from knoxcall_addon.proxy_addon import KnoxCall
from tests.harness import free_port

CONFIG = {
    "environments": [{"name": "production"}, {"name": "staging"}],
    "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
    "routes": [{"name": "api"}, {"name": "old"}],
    "assignments": {"api": {"production": ["office"]}},
}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("127.0.0.2:9464", ("127.0.0.2", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:9464", ("localhost", 9464)),
    ],
)
def test_address_values(given: str, expected: tuple[str, int]) -> None:
    assert parse_address(given) == expected


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("metrics.example:9464", "is not an IP address"),
        ("::1:9464", "[address]:port"),
        ("[::1:9464", "[address]:port"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:65536", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
        ("127.0.0.1", "from 1 to 65535"),
    ],
)
def test_bad_address_values(given: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        parse_address(given)


def test_every_reason_of_the_decision_is_a_label_of_its_own() -> None:
    assert set(ALLOWED_REASONS) | set(DENIED_REASONS) <= metrics.REASONS


def samples_of(registry_metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client import generate_latest

    text = generate_latest(registry_metrics.registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def labels(route: str, env: str, decision: str, reason: str, report_only: str = "false") -> tuple[tuple[str, str], ...]:
    values = {"route": route, "environment": env, "decision": decision, "reason": reason, "report_only": report_only}
    return tuple(sorted(values.items()))


def test_labels_are_the_configs_names_and_callers_inventions_are_dashes(make_config) -> None:
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    counted = Metrics()
    counted.policy_installed(policy)
    for i in range(500):  # every request names another route or environment that no config has
        counted.request_decided(decide(policy, RequestFacts(peer="127.0.0.9", route=f"guess-{i}")), 0.00001)
        counted.request_decided(decide(policy, RequestFacts(peer="127.0.0.9", route="api", environment=f"e{i}")), 0.0)
    counted.request_decided(decide(policy, RequestFacts(peer="127.0.0.9", route="api")), 0.00002)
    counted.request_decided(decide(policy, RequestFacts(peer="127.0.0.99", route="api")), 0.00002)
    found = samples_of(counted, "knoxcall_requests_total")
    assert found == {
        labels("-", "-", "denied", "route_not_found"): 500,
        labels("api", "-", "denied", "environment_not_found"): 500,
        labels("api", "production", "allowed", "client"): 1,
        labels("api", "production", "denied", "ip_not_whitelisted"): 1,
    }
    assert len(counted._children) <= 2  # only the configs' own names are cached
    assert samples_of(counted, "knoxcall_decision_duration_seconds_count") == {(): 1002}


def test_a_route_the_new_config_dropped_is_a_dash(make_config, tmp_path: Path) -> None:
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    counted = Metrics()
    counted.policy_installed(policy)
    facts = RequestFacts(peer="127.0.0.9", route="old")
    counted.request_decided(decide(policy, facts), 0.0)  # route "old" exists: unassigned, refused
    smaller = dict(CONFIG, routes=[{"name": "api"}])
    policy = load_policy(make_config("second", **{"k.yaml": smaller}))
    counted.policy_installed(policy)
    counted.request_decided(decide(policy, facts), 0.0)
    routes = {dict(labels)["route"] for labels in samples_of(counted, "knoxcall_requests_total")}
    assert routes == {"old", "-"}


def test_report_mode_and_rate_limits_have_labels_of_their_own(make_config) -> None:
    config = dict(CONFIG, routes=[{"name": "api", "mode": "report"}, {"name": "old"}])
    policy = load_policy(make_config(**{"k.yaml": config}))
    counted = Metrics()
    counted.policy_installed(policy)
    reported = decide(policy, RequestFacts(peer="127.0.0.99", route="api"))
    assert reported.allowed and reported.report_only and reported.reason == "ip_not_whitelisted"
    counted.request_decided(reported, 0.0)
    allowed = decide(policy, RequestFacts(peer="127.0.0.9", route="api"))
    over = dataclasses.replace(allowed, allowed=False, reason="rate_limited", status=429)
    over_reported = dataclasses.replace(allowed, reason="rate_limited", report_only=True)
    for _ in range(2):
        counted.request_decided(over, 0.0)
        counted.request_decided(over_reported, 0.0)
    assert samples_of(counted, "knoxcall_requests_total") == {
        labels("api", "production", "allowed", "ip_not_whitelisted", "true"): 1,
        labels("api", "production", "denied", "rate_limited"): 2,
        labels("api", "production", "allowed", "rate_limited", "true"): 2,
    }
    assert samples_of(counted, "knoxcall_rate_limit_refusals_total") == {
        (("environment", "production"), ("report_only", "false"), ("route", "api")): 2,
        (("environment", "production"), ("report_only", "true"), ("route", "api")): 2,
    }


def test_a_failing_update_never_raises_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    counted = Metrics()
    with caplog.at_level(logging.WARNING, logger="knoxcall"):
        for _ in range(3):
            counted.request_decided(object(), 0.0)  # type: ignore[arg-type]
            counted.connection_decided(object(), "tunnel")  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "knoxcall: updating a metric failed (decisions are not affected)"
    ]


def test_rate_limit_functions_count_only_while_metrics_are_on(make_config) -> None:
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    counted = Metrics()
    counted.policy_installed(policy)
    metrics.activate(None)
    metrics.count_rate_limit_refusal("api", "production")  # off: nothing, and no error
    metrics.activate(counted)
    try:
        metrics.count_rate_limit_refusal("api", "production")
        metrics.count_rate_limit_refusal("api", "production", report_only=True)
        metrics.count_rate_limit_refusal("guess", "production")
        metrics.count_rate_limit_store_error()
    finally:
        metrics.activate(None)
    assert samples_of(counted, "knoxcall_rate_limit_refusals_total") == {
        (("environment", "production"), ("report_only", "false"), ("route", "api")): 1,
        (("environment", "production"), ("report_only", "true"), ("route", "api")): 1,
        (("environment", "production"), ("report_only", "false"), ("route", "-")): 1,
    }
    assert samples_of(counted, "knoxcall_rate_limit_store_errors_total") == {(): 1}


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, list[State]]]:
    states = [State(None, False)]
    server = MetricsServer(Metrics(lambda: states[-1]), lambda: states[-1], "127.0.0.1", free_port())
    server.start()
    try:
        yield server, states
    finally:
        server.stop()


def test_healthz_is_503_until_a_policy_is_in_force(served: tuple[MetricsServer, list[State]]) -> None:
    server, states = served
    url = f"http://127.0.0.1:{server.port}"
    response = httpx.get(url + "/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "reason": "no config in force"}
    states.append(State("abc123", False))  # a policy, but the launch guard refuses everything
    assert httpx.get(url + "/healthz").status_code == 503
    states.append(State("abc123", True, loaded_at=1.5, reloads_ok=2, reloads_invalid=1))
    response = httpx.get(url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "config_version": "abc123"}
    assert httpx.head(url + "/healthz").status_code == 200
    assert httpx.post(url + "/healthz").status_code == 405
    text = httpx.get(url + "/metrics").text
    assert 'knoxcall_config_info{version="abc123"} 1.0' in text
    assert 'knoxcall_config_reloads_total{result="invalid"} 1.0' in text
    assert "knoxcall_ready 1.0" in text


def test_a_failing_state_is_not_ready_and_metrics_still_answer(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> State:
        raise RuntimeError("boom")

    server = MetricsServer(Metrics(broken), broken, "127.0.0.1", free_port())
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        with caplog.at_level(logging.WARNING, logger="knoxcall"):
            assert httpx.get(url + "/healthz").status_code == 500  # fails closed: never "ready"
            response = httpx.get(url + "/metrics")
    finally:
        server.stop()
    assert response.status_code == 200
    assert "knoxcall_ready 0.0" in response.text


def test_connectivity_counts_addresses_per_client(served: tuple[MetricsServer, list[State]]) -> None:
    server, states = served
    states.append(
        State("v", True, connectivity=(("db", "Healthy"), ("db", "Down"), ("web", "Degraded"), ("web", "Degraded")))
    )
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    found = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "knoxcall_client_connectivity"
    }
    assert found == {
        (("client", "db"), ("status", "healthy")): 1,
        (("client", "db"), ("status", "down")): 1,
        (("client", "db"), ("status", "degraded")): 0,
        (("client", "web"), ("status", "healthy")): 0,
        (("client", "web"), ("status", "degraded")): 2,
        (("client", "web"), ("status", "down")): 0,
    }


def test_the_addon_counts_nothing_with_the_option_off_and_refuses_bad_values(make_config) -> None:
    config = make_config(**{"k.yaml": CONFIG})
    addon = KnoxCall()
    with taddons.context(addon) as context:
        context.configure(addon, knoxcall_config=str(config))
        assert addon.metrics is None and addon.metrics_server is None and metrics._active is None
        with pytest.raises(exceptions.OptionsError, match="knoxcall_metrics=somewhere:1"):
            context.configure(addon, knoxcall_metrics="somewhere:1")
        assert addon.metrics is None
        port = free_port()
        context.configure(addon, knoxcall_metrics=f"127.0.0.1:{port}")
        try:
            assert addon.metrics is not None and metrics._active is addon.metrics
            response = httpx.get(f"http://127.0.0.1:{port}/healthz")
            assert response.json()["config_version"] == addon.current.policy.version
            with pytest.raises(exceptions.OptionsError, match="knoxcall_metrics=oops"):
                context.configure(addon, knoxcall_metrics="oops")
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # the old one runs on
            counted = addon.metrics
            context.configure(addon, knoxcall_metrics=f"127.0.0.2:{port}")  # moved: the counts go along
            assert addon.metrics is counted
            assert httpx.get(f"http://127.0.0.2:{port}/healthz").status_code == 200
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/healthz")
        finally:
            context.configure(addon, knoxcall_metrics="")
        assert addon.metrics is None and metrics._active is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}/healthz")


def test_the_latency_histogram_is_what_prometheus_clients_histogram_serves(make_config) -> None:
    """The plain counts (RequestCollector) against prometheus_client's own Histogram, fed the same
    values: bounds themselves, between them, past the last one, zero."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from knoxcall_addon.metrics import LATENCY_BUCKETS

    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    counted = Metrics()
    counted.policy_installed(policy)
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "knoxcall_decision_duration_seconds", "x", buckets=LATENCY_BUCKETS, registry=reference_registry
    )
    decision = decide(policy, RequestFacts(peer="127.0.0.9", route="api"))
    values = [0.0, *LATENCY_BUCKETS, *(b * 1.5 for b in LATENCY_BUCKETS), 7.0, 0.000_012_5]
    for seconds in values:
        counted.request_decided(decision, seconds)
        reference.observe(seconds)
    text = generate_latest(reference_registry).decode()
    expected = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }
    for (name, label_items), value in expected.items():
        assert samples_of(counted, name)[label_items] == pytest.approx(value), (name, label_items)
    assert samples_of(counted, "knoxcall_requests_total") == {
        labels("api", "production", "allowed", "client"): len(values)
    }
