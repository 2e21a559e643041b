"""`knoxcall explain` and `knoxcall.explain` agree with `decide` and with a real flow through the addon."""

from __future__ import annotations

import hashlib
import io

import pytest
from mitmproxy.test import taddons, tflow

from knoxcall_addon.cli import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.explain import explain, explain_text, request_for
from knoxcall_addon.policy import load_policy
from knoxcall_addon.proxy_addon import KnoxCall

LIVE = "live-secret"
TEST = "test-secret"
SECRETS = {"ci-live": LIVE, "ci-test": TEST}

CONFIG = {
    "settings": {"default_environment": "production", "trusted_proxies": ["127.0.0.250"]},
    "environments": [{"name": "production"}, {"name": "staging"}],
    "clients": [
        {"name": "office", "ip_address": "10.0.0.0/24, 10.9.9.9", "description": "x"},
        {"name": "server", "ip_address": "10.0.0.7", "description": "x"},
        {"name": "runner", "ip_address": "10.1.0.0/24", "description": "x"},
        {"name": "retired", "ip_address": "10.2.0.0/24", "enabled": False, "description": "x"},
        {"name": "spare", "ip_address": "10.3.0.0/24", "description": "x"},
    ],
    "routes": [
        {
            "name": "api",
            "target_base_url": "http://127.0.0.1:9",
            "match": {"hosts": ["*.example.com"], "path_prefix": "/v1"},
        },
        {"name": "keyed", "requires_api_key": True, "allowed_methods": ["POST"]},
        {"name": "open", "requires_clients": False},
        {"name": "off", "enabled": False},
    ],
    "assignments": {
        "api": {"production": ["office", "server", "retired"], "staging": ["runner"]},
        "keyed": {"production": ["office"]},
    },
    "api_keys": [
        {"name": "ci-live", "key_sha256": hashlib.sha256(LIVE.encode()).hexdigest()},
        {"name": "ci-test", "key_sha256": hashlib.sha256(TEST.encode()).hexdigest(), "type": "test"},
        {"name": "gone", "key_sha256": "1" * 64, "enabled": False},
    ],
}

# ip, route, env, key name, extra headers -> reason, client
CASES = [
    ("10.0.0.5", "api", None, None, (), "client", "office"),
    ("10.0.0.7", "api", None, None, (), "client", "office"),  # first client in declaration order
    ("10.9.9.9", "api", "production", None, (), "client", "office"),
    ("10.1.0.5", "api", None, None, (), "client_not_assigned", "runner"),
    ("10.1.0.5", "api", "staging", None, (), "client", "runner"),
    ("10.2.0.5", "api", None, None, (), "client_disabled", "retired"),
    ("10.3.0.5", "api", None, None, (), "client_not_assigned", "spare"),
    ("192.0.2.1", "api", None, None, (), "ip_not_whitelisted", None),
    ("192.0.2.1", "api", "nowhere", None, (), "environment_not_found", None),
    ("192.0.2.1", "nope", None, None, (), "route_not_found", None),
    ("10.0.0.5", "off", None, None, (), "route_not_found", None),
    ("192.0.2.1", "open", None, None, (), "open_route", None),
    ("10.0.0.5", "keyed", None, None, (), "api_key_required", None),
    ("10.0.0.5", "keyed", None, "ci-live", (), "client", "office"),
    ("10.0.0.5", "keyed", None, "gone", (), "invalid_api_key", None),
    ("192.0.2.1", "api", "staging", "ci-test", (), "test_key", None),
    ("192.0.2.1", "api", "production", "ci-test", (), "test_key_not_allowed", None),
    ("127.0.0.250", "api", None, None, (("X-Forwarded-For", "10.0.0.5"),), "client", "office"),
    ("192.0.2.1", "api", None, None, (("X-Forwarded-For", "10.0.0.5"),), "ip_not_whitelisted", None),
    ("::ffff:10.0.0.5", "api", None, None, (), "client", "office"),
]


@pytest.fixture
def config_dir(make_config):
    return make_config(**{"k.yaml": CONFIG})


def flow_for(facts: RequestFacts, key_name: str | None):
    """A mitmproxy flow carrying the same request, with the real key secret for a key name."""
    flow = tflow.tflow()
    flow.client_conn.peername = (facts.peer, 40000)
    flow.request.method = facts.method
    flow.request.host = facts.host or "unmatched.invalid"
    flow.request.path = facts.path
    flow.request.headers["x-knoxcall-route"] = facts.route
    if facts.environment is not None:
        flow.request.headers["x-knoxcall-environment"] = facts.environment
    if key_name is not None:
        flow.request.headers["x-knoxcall-key"] = SECRETS.get(key_name, "unknown-secret")
    for value in facts.forwarded_for:
        flow.request.headers.add("X-Forwarded-For", value)
    return flow


@pytest.mark.parametrize(("ip", "route", "env", "key", "headers", "reason", "client"), CASES)
def test_explain_agrees_with_decide_and_with_the_addon(config_dir, ip, route, env, key, headers, reason, client):
    policy = load_policy(config_dir)
    facts = request_for(policy, ip, route, env, key, headers)
    result = explain(policy, facts)
    assert (result.decision.reason, result.decision.client) == (reason, client)
    assert result.decision == decide(policy, facts)
    assert result.lines[0].endswith(f": {reason}")

    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(config_dir))
        flow = flow_for(facts, key)
        addon.requestheaders(flow)
        meta = flow.metadata["knoxcall"]
        assert (meta["reason"], meta["client"], meta["status"]) == (reason, client, result.decision.status)
        assert meta["decision"] == result.decision.decision
        assert meta["client_ip"] == result.decision.client_ip
        assert meta["api_key"] == result.decision.api_key


def test_matched_range_and_near_misses(config_dir):
    policy = load_policy(config_dir)
    text = explain_text(policy, "10.9.9.9", "api")
    assert "matched: client office range 10.9.9.9/32" in text
    text = explain_text(policy, "10.0.0.7", "api")
    assert "matched: client office range 10.0.0.0/24" in text
    text = explain_text(policy, "10.1.0.5", "api")
    assert "client runner (10.1.0.0/24) is assigned to api only in staging, not in production" in text
    text = explain_text(policy, "10.2.0.5", "api")
    # retired is assigned to api in production, where it is asked about: not "assigned nowhere"
    assert "client retired (10.2.0.0/24) is disabled (it is assigned to api in production)\n" in text + "\n"
    text = explain_text(policy, "10.3.0.5", "api")
    assert "client spare (10.3.0.0/24) is not assigned to api in production; assigned nowhere" in text
    text = explain_text(policy, "192.0.2.1", "api")
    assert "no client contains 192.0.2.1" in text
    here = "assigned here: office (10.0.0.0/24, 10.9.9.9/32), retired (10.2.0.0/24; disabled), server (10.0.0.7/32)"
    assert here in text
    assert explain_text(policy, "not-an-ip", "api").startswith("error:")


def test_a_denial_before_the_ip_check_still_says_what_the_address_gets(config_dir):
    """A wrong method or key is what the caller hears first; explain also answers
    "would my address pass?" by deciding again with the method and key put right."""
    policy = load_policy(config_dir)
    text = explain(policy, request_for(policy, "10.0.0.5", "keyed")).text()  # no key: api_key_required
    assert "with the key put right: allowed, as client office" in text
    text = explain(policy, request_for(policy, "10.3.0.5", "keyed", key_name="gone")).text()
    assert "invalid_api_key" in text.splitlines()[0]
    assert "with the key put right: still denied, client_not_assigned" in text
    assert "client spare (10.3.0.0/24) is not assigned to keyed in production" in text
    text = explain(policy, request_for(policy, "192.0.2.1", "keyed", key_name="ci-live", method="GET")).text()
    assert "ip_not_whitelisted" in text.splitlines()[0]  # the method is checked after the clients
    text = explain(policy, request_for(policy, "192.0.2.1", "keyed", key_name="gone", method="GET")).text()
    assert "with the method and key put right: still denied, ip_not_whitelisted" in text
    text = explain(policy, request_for(policy, "10.0.0.5", "keyed", key_name="ci-live", method="GET")).text()
    assert "method_not_allowed" in text.splitlines()[0]
    text = explain(policy, request_for(policy, "10.0.0.5", "api", key_name="ci-test")).text()
    assert "test_key_not_allowed" in text.splitlines()[0]
    assert "with the key put right: allowed, as client office" in text


def test_cli_explain(config_dir):
    out = io.StringIO()
    args = ["explain", "--config", str(config_dir), "--ip", "10.1.0.5", "--route", "api", "--env", "staging"]
    assert main(args, out=out) == EXIT_OK
    assert out.getvalue().startswith("ALLOWED: client")
    assert "matched: client runner range 10.1.0.0/24" in out.getvalue()

    out = io.StringIO()
    args = ["explain", "--config", str(config_dir), "--ip", "127.0.0.250", "--route", "api", "--exit-code",
            "--header", "X-Forwarded-For: 192.0.2.1"]  # fmt: skip
    assert main(args, out=out) == EXIT_FINDINGS
    assert "caller: 192.0.2.1 (via trusted proxy 127.0.0.250)" in out.getvalue()

    out = io.StringIO()
    args = ["explain", "--config", str(config_dir), "--ip", "10.0.0.5", "--route", "keyed", "--key-name", "ci-live"]
    assert main(args, out=out) == EXIT_OK
    assert "request: POST" in out.getvalue()  # GET is not allowed there: the route's method is used

    assert main(["explain", "--config", str(config_dir), "--ip", "nope", "--route", "api"], out=io.StringIO()) == 2
    bad_header = ["explain", "--config", str(config_dir), "--ip", "10.0.0.5", "--route", "api", "--header", "x"]
    assert main(bad_header, out=io.StringIO()) == EXIT_USAGE
    assert main(["explain", "--ip", "10.0.0.5"], out=io.StringIO()) == EXIT_USAGE


def test_mitmproxy_command_returns_the_same_text(config_dir):
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(config_dir))
        policy = addon.current.policy
        for ip, route, env in [("10.1.0.5", "api", "staging"), ("10.2.0.5", "api", ""), ("192.0.2.1", "open", "")]:
            text = tctx.master.commands.call("knoxcall.explain", ip, route, env)
            assert text == explain_text(policy, ip, route, env or None)
        assert tctx.master.commands.call("knoxcall.explain", "10.0.0.5", "api").startswith("ALLOWED: client")


def test_decide_resolves_a_key_name(config_dir):
    """RequestFacts.api_key_name: the key as if its secret had been sent; unknown or disabled -> invalid."""
    policy = load_policy(config_dir)
    facts = RequestFacts(peer="10.0.0.5", route="keyed", method="POST", api_key_name="ci-live")
    assert (decide(policy, facts).reason, decide(policy, facts).api_key) == ("client", "ci-live")
    for name in ("gone", "nope"):
        facts = RequestFacts(peer="10.0.0.5", route="keyed", method="POST", api_key_name=name)
        assert decide(policy, facts).reason == "invalid_api_key"
    secret = RequestFacts(peer="10.0.0.5", route="keyed", method="POST", api_key=LIVE)
    assert decide(policy, secret).api_key == "ci-live"
