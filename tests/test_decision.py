"""The decision path: every reason code, status and body, route matching and trusted proxies.

Addresses from documentation ranges appear here only as data for the pure decision
function; no traffic is sent anywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knoxcall_addon.decision import (
    ALLOWED_REASONS,
    DENIED_REASONS,
    Decision,
    RequestFacts,
    decide,
    decide_connection,
    internal_error,
)
from knoxcall_addon.policy import Policy, load_policy, normalize_path, path_prefixes


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


CONFIG = f"""\
settings:
  default_environment: production
  trusted_proxies: [127.0.0.50, "10.9.0.0/16", "2001:db8:ffff::1"]
  client_ip_header: X-Forwarded-For
  unmatched_requests: deny
environments:
  - name: production
  - name: staging
  - name: development
clients:
  - name: office
    ip_address: 10.0.0.0/24
  - name: laptop
    type: user
    ip_address: "10.0.1.5, 2001:db8::/64, fe80::/64"
  - name: retired
    ip_address: 10.0.2.0/24
    enabled: false
  - name: elsewhere
    ip_address: [10.0.3.0/24]
  - name: retired-overlap
    ip_address: 10.0.0.0/25
    enabled: false
routes:
  - name: api
    target_base_url: https://api.example.com/base
    allowed_methods: [GET, POST]
    match: {{hosts: [api.example.com], path_prefix: /v1}}
    environments:
      development: {{target_base_url: "http://127.0.0.1:9000", allowed_methods: [GET]}}
      staging: {{allowed_methods: [GET, POST, DELETE]}}
  - name: admin
    match: {{hosts: [api.example.com], path_prefix: /v1/admin}}
  - name: v10
    match: {{hosts: [api.example.com], path_prefix: /v10}}
  - name: health
    requires_clients: false
    match: {{hosts: [api.example.com], path_prefix: /health}}
  - name: wild
    match: {{hosts: ["*.example.com"], path_prefix: /v1}}
  - name: wild-deeper
    match: {{hosts: ["*.eu.example.com"], path_prefix: /v1}}
  - name: anyhost
    match: {{path_prefix: /anything}}
  - name: keyed
    requires_api_key: true
  - name: header-only
  - name: "off"
    enabled: false
    match: {{hosts: [off.example.com]}}
assignments:
  api:
    production: [office, retired]
    staging: [office]
    development: [laptop]
  admin:
    production: [laptop]
  v10: {{production: [office]}}
  wild: {{production: [office]}}
  wild-deeper: {{production: [office]}}
  anyhost: {{production: [office]}}
  keyed: {{production: [office], staging: [office]}}
  header-only: {{production: [office, laptop, elsewhere]}}
api_keys:
  - name: ci
    key_sha256: "{sha("live-secret")}"
  - name: tester
    key_sha256: "{sha("test-secret")}"
    type: test
  - name: old
    key_sha256: "{sha("old-secret")}"
    enabled: false
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    folder = tmp_path_factory.mktemp("decision")
    (folder / "config.yaml").write_text(CONFIG)
    return load_policy(folder)


def facts(peer: str = "10.0.0.7", **kw: Any) -> RequestFacts:
    kw.setdefault("host", "api.example.com")
    kw.setdefault("path", "/v1/users")
    return RequestFacts(peer=peer, **kw)


IP_BODY = "IP not authorized"

# (id, facts, expected reason, status, body or None for allowed, extra expectations)
CASES: list[tuple[str, RequestFacts, str, int, dict[str, Any] | None, dict[str, Any]]] = [
    ("client", facts(), "client", 0, None, {"client": "office", "route": "api", "environment": "production"}),
    (
        "client-second-assigned",
        facts("10.0.1.5", route="header-only", path="/"),
        "client",
        0,
        None,
        {"client": "laptop"},
    ),
    (
        "ip_not_whitelisted",
        facts("198.51.100.7"),
        "ip_not_whitelisted",
        403,
        {"error": IP_BODY, "status": 403, "ip": "198.51.100.7", "route": "api", "environment": "production"},
        {"client": None},
    ),
    (
        "client_not_assigned",
        facts("10.0.3.4"),
        "client_not_assigned",
        403,
        {"error": IP_BODY, "status": 403, "ip": "10.0.3.4", "route": "api", "environment": "production"},
        {"client": "elsewhere"},
    ),
    (
        "client_not_assigned-other-env",
        facts("10.0.1.5"),  # laptop is on api in development only
        "client_not_assigned",
        403,
        {"error": IP_BODY, "status": 403, "ip": "10.0.1.5", "route": "api", "environment": "production"},
        {"client": "laptop"},
    ),
    (
        "client_disabled-assigned",
        facts("10.0.2.9"),
        "client_disabled",
        403,
        {"error": IP_BODY, "status": 403, "ip": "10.0.2.9", "route": "api", "environment": "production"},
        {"client": "retired"},
    ),
    (
        "client_disabled-unassigned",
        facts("10.0.2.9", path="/v10"),
        "client_disabled",
        403,
        {"error": IP_BODY, "status": 403, "ip": "10.0.2.9", "route": "v10", "environment": "production"},
        {"client": "retired"},
    ),
    (
        "enabled-client-wins-over-disabled-overlap",
        facts("10.0.0.3"),  # in office (enabled) and retired-overlap (disabled)
        "client",
        0,
        None,
        {"client": "office"},
    ),
    (
        "open_route",
        facts("198.51.100.7", path="/health"),
        "open_route",
        0,
        None,
        {"route": "health", "client": None},
    ),
    (
        "route_not_found-unknown-header",
        facts(route="nope"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": "nope"},
        {},
    ),
    (
        "route_not_found-disabled",
        facts(route="off", host="off.example.com", path="/"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": "off"},
        {},
    ),
    (
        "route_not_found-disabled-by-match",
        facts(host="off.example.com", path="/"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": None},
        {},
    ),
    (
        "route_not_found-header-route-other-host",
        facts(route="health", host="internal.example.net", path="/health"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": "health"},
        {},
    ),
    (
        "route_not_found-header-route-other-path",
        facts(route="health", path="/v1/admin"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": "health"},
        {},
    ),
    (
        "route_not_found-no-match",
        facts(host="unknown.example.net", path="/"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": None},
        {},
    ),
    (
        "environment_not_found",
        facts(environment="qa"),
        "environment_not_found",
        404,
        {"error": "Environment not found", "status": 404, "environment": "qa"},
        {},
    ),
    (
        "method_not_allowed",
        facts(method="DELETE"),
        "method_not_allowed",
        405,
        {"error": "Method not allowed", "status": 405},
        {"allow_methods": ("GET", "POST")},
    ),
    (
        "method_not_allowed-head-is-not-get",
        facts(method="HEAD"),
        "method_not_allowed",
        405,
        {"error": "Method not allowed", "status": 405},
        {"allow_methods": ("GET", "POST")},
    ),
    (
        "method_not_allowed-override",
        facts("10.0.1.5", method="POST", environment="development"),
        "method_not_allowed",
        405,
        {"error": "Method not allowed", "status": 405},
        {"allow_methods": ("GET",), "environment": "development"},
    ),
    (
        "method_not_allowed-is-not-told-to-a-stranger",
        facts("198.51.100.7", method="DELETE"),
        "ip_not_whitelisted",
        403,
        {"error": IP_BODY, "status": 403, "ip": "198.51.100.7", "route": "api", "environment": "production"},
        {"allow_methods": ()},
    ),
    (
        "method_not_allowed-names-the-client",
        facts(method="DELETE"),
        "method_not_allowed",
        405,
        {"error": "Method not allowed", "status": 405},
        {"client": "office"},
    ),
    (
        "path_not_canonical",
        facts("198.51.100.7", path="/v1/../health"),
        "path_not_canonical",
        400,
        {"error": "Bad request", "status": 400, "reason": "path_not_canonical"},
        {"route": None, "detail": "dot segment ('.' or '..')"},
    ),
    (
        "uri_too_long",
        facts(path="/v1/" + "a" * 9000),
        "uri_too_long",
        414,
        {"error": "URI too long", "status": 414, "reason": "uri_too_long"},
        {},
    ),
    (
        "host_invalid-decimal-ipv4",
        facts(host="2130706453"),
        "host_invalid",
        400,
        {"error": "Bad request", "status": 400, "reason": "host_invalid"},
        {},
    ),
    (
        "host_invalid-authority",
        facts(bad_authority="api.example.com:80@secret.local"),
        "host_invalid",
        400,
        {"error": "Bad request", "status": 400, "reason": "host_invalid"},
        {},
    ),
    (
        "method_invalid",
        facts(method="po\u017ft"),  # its upper() is "POST": no upper(), and no non-token method
        "method_invalid",
        400,
        {"error": "Bad request", "status": 400, "reason": "method_invalid"},
        {},
    ),
    (
        "method-is-case-sensitive",
        facts(method="post"),
        "method_not_allowed",
        405,
        {"error": "Method not allowed", "status": 405},
        {"allow_methods": ("GET", "POST")},
    ),
    (
        "host_invalid-non-ascii-that-lowers-to-ascii",
        facts(host="api.example.co\u212a"),
        "host_invalid",
        400,
        {"error": "Bad request", "status": 400, "reason": "host_invalid"},
        {},
    ),
    (
        "host-mapped-ipv6-is-the-ipv4-host",
        facts(host="::ffff:127.0.0.21", route="api"),
        "route_not_found",
        404,
        {"error": "Route not found", "status": 404, "route": "api"},
        {},
    ),
    (
        "method-override-widens",
        facts(method="DELETE", environment="staging"),
        "client",
        0,
        None,
        {"environment": "staging"},
    ),
    (
        "invalid_api_key-unknown",
        facts(api_key="guess"),
        "invalid_api_key",
        401,
        {"error": "Invalid API key", "status": 401},
        {"api_key": None},
    ),
    (
        "invalid_api_key-disabled",
        facts(api_key="old-secret"),
        "invalid_api_key",
        401,
        {"error": "Invalid API key", "status": 401},
        {},
    ),
    (
        "invalid_api_key-even-on-open-route",
        facts("198.51.100.7", path="/health", api_key="guess"),
        "invalid_api_key",
        401,
        {"error": "Invalid API key", "status": 401},
        {},
    ),
    (
        "api_key_required",
        facts(route="keyed", path="/"),
        "api_key_required",
        401,
        {"error": "Invalid API key", "status": 401},
        {},
    ),
    (
        "live-key-and-client",
        facts(route="keyed", path="/", api_key="live-secret"),
        "client",
        0,
        None,
        {"api_key": "ci", "client": "office"},
    ),
    (
        "live-key-does-not-replace-client",
        facts("198.51.100.7", route="keyed", path="/", api_key="live-secret"),
        "ip_not_whitelisted",
        403,
        {"error": IP_BODY, "status": 403, "ip": "198.51.100.7", "route": "keyed", "environment": "production"},
        {"api_key": "ci"},
    ),
    (
        "test_key",
        facts("198.51.100.7", environment="staging", api_key="test-secret"),
        "test_key",
        0,
        None,
        {"api_key": "tester", "environment": "staging", "client": None},
    ),
    (
        "test_key-on-keyed-route",
        facts("198.51.100.7", route="keyed", path="/", environment="staging", api_key="test-secret"),
        "test_key",
        0,
        None,
        {"api_key": "tester"},
    ),
    (
        "test_key_not_allowed",
        facts("10.0.0.7", api_key="test-secret"),
        "test_key_not_allowed",
        403,
        {
            "error": "Test keys are not allowed in the default environment",
            "status": 403,
            "ip": "10.0.0.7",
            "route": "api",
            "environment": "production",
        },
        {"api_key": "tester"},
    ),
    (
        "test_key_not_allowed-explicit-default-on-open-route",
        facts("10.0.0.7", path="/health", environment="production", api_key="test-secret"),
        "test_key_not_allowed",
        403,
        {
            "error": "Test keys are not allowed in the default environment",
            "status": 403,
            "ip": "10.0.0.7",
            "route": "health",
            "environment": "production",
        },
        {},
    ),
]


@pytest.mark.parametrize(
    ("facts_", "reason", "status", "body", "extra"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decision_table(
    policy: Policy,
    facts_: RequestFacts,
    reason: str,
    status: int,
    body: dict[str, Any] | None,
    extra: dict[str, Any],
) -> None:
    decision = decide(policy, facts_)
    assert decision.reason == reason, decision.summary()
    assert decision.status == status
    assert decision.allowed is (body is None)
    if body is None:
        assert decision.body == {}
    else:
        assert decision.body == body
        assert list(decision.body)[:2] == ["error", "status"]
    for name, value in extra.items():
        assert getattr(decision, name) == value, name
    assert decision.config_version == policy.version


def test_every_reason_code_is_covered() -> None:
    """The table above exercises every reason code of the contract (internal_error and
    unmatched_allowed have their own tests)."""
    covered = {c[2] for c in CASES} | {"internal_error", "unmatched_allowed", "not_http"}  # not_http: raw flows
    assert covered == set(ALLOWED_REASONS) | set(DENIED_REASONS)


def test_environment_override_target(policy: Policy) -> None:
    prod = decide(policy, facts())
    assert prod.target_url == "https://api.example.com/base"
    dev = decide(policy, facts("10.0.1.5", environment="development"))
    assert (dev.allowed, dev.reason, dev.target_url) == (True, "client", "http://127.0.0.1:9000")
    staging = decide(policy, facts(environment="staging"))
    assert staging.target_url == "https://api.example.com/base"  # override without a target keeps the route's
    assert decide(policy, facts(route="header-only", path="/")).target_url is None


def test_unmatched_allowed(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "settings: {unmatched_requests: allow}\nenvironments: [{name: production}]\n"
        "routes: [{name: r, match: {path_prefix: /r}}]\n"
    )
    open_policy = load_policy(tmp_path)
    decision = decide(open_policy, RequestFacts(peer="198.51.100.7", host="x.example.net", path="/other"))
    assert (decision.allowed, decision.reason, decision.route, decision.target_url) == (
        True,
        "unmatched_allowed",
        None,
        None,
    )
    # a matched route is still checked
    matched = decide(open_policy, RequestFacts(peer="198.51.100.7", host="x.example.net", path="/r/1"))
    assert (matched.allowed, matched.reason) == (False, "ip_not_whitelisted")
    # a named route that does not exist is not "unmatched"
    named = decide(open_policy, RequestFacts(peer="198.51.100.7", route="nope"))
    assert named.reason == "route_not_found"


def test_internal_error_decision() -> None:
    decision = internal_error("10.0.0.1", "10.0.0.1", "boom", "v1")
    assert (decision.allowed, decision.reason, decision.status) == (False, "internal_error", 500)
    assert decision.body == {"error": "Internal error", "status": 500}
    assert "boom" in decision.summary()


# -- route matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "route"),
    [
        ("api.example.com", "/v1", "api"),
        ("api.example.com", "/v1/", "api"),
        ("api.example.com", "/v1/users?x=/v1/admin", "api"),
        ("api.example.com", "/v1/admin", "admin"),  # longest prefix wins
        ("api.example.com", "/v1/admin/users/7", "admin"),
        ("api.example.com", "/v1/administrators", "api"),  # segment boundary
        ("api.example.com", "/v10", "v10"),
        ("api.example.com", "/v10/x", "v10"),
        ("api.example.com", "/v100", None),  # neither /v1 nor /v10
        ("api.example.com", "/v1x", None),
        ("api.example.com", "/", None),
        ("foo.example.com", "/v1/x", "wild"),
        ("a.b.example.com", "/v1/x", "wild"),
        ("x.eu.example.com", "/v1/x", "wild-deeper"),  # the more specific wildcard
        ("example.com", "/v1/x", None),  # *.example.com is not the apex
        ("badexample.com", "/v1/x", None),
        ("api.example.com", "/health/../v1/admin", "admin"),  # dot segments resolved
        ("api.example.com", "/health/./../v1/admin", "admin"),
        ("api.example.com", "/health/%2e%2e/v1/admin", "admin"),  # percent-encoded dots
        ("api.example.com", "//v1//admin", "admin"),
        ("api.example.com", "/%76%31/admin", "admin"),
        ("api.example.com", "/../../v1", "api"),
        ("anything.example.net", "/anything/x", "anyhost"),
        ("api.example.com", "/anything", "anyhost"),  # any-host route serves every host
    ],
)
def test_route_matching(policy: Policy, host: str, path: str, route: str | None) -> None:
    found = policy.route_table.find(host, path)
    assert (found.name if found else None) == route


def test_exact_host_beats_wildcard_on_equal_prefix(policy: Policy) -> None:
    decision = decide(policy, facts(host="api.example.com", path="/v1/x"))
    assert decision.route == "api"
    assert decide(policy, facts(host="www.example.com", path="/v1/x")).route == "wild"


def test_dot_segments_are_refused_before_any_route_is_chosen(policy: Policy) -> None:
    """/health is open; /health/../v1/admin is refused outright, named route or not: an
    upstream would serve it as /v1/admin, so no decision on either spelling is safe."""
    decision = decide(policy, facts("198.51.100.7", path="/health/../v1/admin"))
    assert (decision.route, decision.reason, decision.status) == (None, "path_not_canonical", 400)
    named = decide(policy, facts("198.51.100.7", route="health", path="/health/../v1/admin"))
    assert named.reason == "path_not_canonical"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../health",
        "/v1/%2e%2e/health",
        "/v1/%2E%2e/health",
        "/v1/..%2fhealth",
        "/v1/..%2Fhealth",
        "/v1/..%5chealth",
        "/v1/..\\health",
        "/v1/admin;/../../health",
        "/v1/admin;x=1",
        "//v1/admin",
        "/v1//admin",
        "/v1/./admin",
        "/v1/admin/.",
        "/v1/%252e%252e/health",
        "/v1/%c0%ae%c0%ae/health",
        "/v1/%e0%80%ae/health",
        "/v1/%ef%bc%8e%ef%bc%8e/health",
        "/v1/%ef%bc%8fhealth",
        "/v1/%00/health",
        "/v1/%2",
        "/v1/%u002e%u002e/health",
        "/v1/a b",
        "/v1/\u00e9",
        "v1/admin",
        "*",
    ],
)
def test_every_non_canonical_spelling_is_refused(policy: Policy, path: str) -> None:
    decision = decide(policy, facts("10.0.0.7", path=path))
    assert (decision.reason, decision.status) == ("path_not_canonical", 400), path


@pytest.mark.parametrize("path", ["/v1/users", "/v1/users/", "/v1/J%C3%BCrgen", "/v1/a%20b", "/v1/.well-known",
                                  "/v1/users?next=/../admin;x", "/v1/~x/a-b_c.d/!$&'()*+,=:@"])
def test_canonical_paths_are_decided_as_usual(policy: Policy, path: str) -> None:
    assert decide(policy, facts("10.0.0.7", path=path)).reason == "client", path


def test_header_route_with_wildcard_match(policy: Policy) -> None:
    assert decide(policy, facts(route="wild", host="x.example.com")).reason == "client"
    assert decide(policy, facts(route="wild", host="example.com")).reason == "route_not_found"
    assert decide(policy, facts(route="wild", host="x.example.com", path="/v10")).reason == "route_not_found"


def test_normalize_path() -> None:
    assert normalize_path("/a/./b/../c?q=1#f") == "/a/c"
    assert normalize_path("a/b") == "/a/b"
    assert normalize_path("//a//b/") == "/a/b"
    assert normalize_path("/a\\..\\b") == "/b"
    assert path_prefixes("/a/b") == ["/a/b", "/a", "/"]


# -- client IP: peers and trusted proxies -------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "xff", "client_ip", "reason"),
    [
        ("10.0.0.7", (), "10.0.0.7", "client"),
        ("::ffff:10.0.0.7", (), "10.0.0.7", "client"),  # IPv4-mapped peer
        ("fe80::9%eth0", (), "fe80::9", "client_not_assigned"),  # zone dropped, laptop found
        ("2001:db8::5", (), "2001:db8::5", "client_not_assigned"),
        # an untrusted peer's header is ignored, however convincing
        ("198.51.100.2", ("10.0.0.7",), "198.51.100.2", "ip_not_whitelisted"),
        ("10.0.3.1", ("10.0.0.7",), "10.0.3.1", "client_not_assigned"),
        # a trusted proxy: the rightmost untrusted entry is the client
        ("127.0.0.50", ("10.0.0.7",), "10.0.0.7", "client"),
        ("::ffff:127.0.0.50", ("10.0.0.7",), "10.0.0.7", "client"),
        ("127.0.0.50", ("198.51.100.1, 10.0.0.7",), "10.0.0.7", "client"),  # forged left part ignored
        ("127.0.0.50", ("10.0.0.7, 198.51.100.1",), "198.51.100.1", "ip_not_whitelisted"),
        ("127.0.0.50", ("198.51.100.1, 10.0.0.7, 10.9.1.1",), "10.0.0.7", "client"),  # trusted hops skipped
        ("127.0.0.50", ("198.51.100.1, 10.0.0.7", "10.9.1.1"), "10.0.0.7", "client"),  # several header lines
        ("2001:db8:ffff::1", ("10.0.0.7, [2001:db8:ffff::1]:443",), "10.0.0.7", "client"),
        ("127.0.0.50", ("10.0.0.7:51234",), "10.0.0.7", "client"),
        ("127.0.0.50", ("[::ffff:10.0.0.7]",), "10.0.0.7", "client"),
        # garbage stops the walk at the last trusted hop, never further left
        ("127.0.0.50", ("10.0.0.7, garbage",), "127.0.0.50", "ip_not_whitelisted"),
        ("127.0.0.50", ("10.0.0.7, unknown, 10.9.1.1",), "10.9.1.1", "ip_not_whitelisted"),
        ("127.0.0.50", ("10.0.0.7, , 10.9.1.1",), "10.0.0.7", "client"),  # empty entries are skipped
        # only trusted addresses: the leftmost of them
        ("127.0.0.50", ("10.9.1.1, 10.9.2.2",), "10.9.1.1", "ip_not_whitelisted"),
        ("127.0.0.50", (), "127.0.0.50", "ip_not_whitelisted"),
    ],
)
def test_client_ip_resolution(policy: Policy, peer: str, xff: tuple[str, ...], client_ip: str, reason: str) -> None:
    decision = decide(policy, facts(peer, forwarded_for=xff))
    assert decision.client_ip == client_ip
    assert decision.reason == reason
    assert decision.peer_ip == peer.split("%")[0].removeprefix("::ffff:")
    if not decision.allowed and decision.status == 403:
        assert decision.body["ip"] == client_ip


def test_unparsable_peer_is_denied(policy: Policy) -> None:
    decision = decide(policy, facts("not-an-ip"))
    assert (decision.allowed, decision.reason) == (False, "ip_not_whitelisted")
    assert decide(policy, facts("")).allowed is False


def test_summary_and_fields(policy: Policy) -> None:
    decision = decide(policy, facts("127.0.0.50", forwarded_for=("10.0.0.7",), api_key="live-secret"))
    line = decision.summary()
    assert line.startswith("knoxcall: allowed client 10.0.0.7 route=api env=production")
    assert "client=office" in line and "key=ci" in line and "peer=127.0.0.50" in line
    assert "live-secret" not in line
    fields = decision.fields()
    assert fields["api_key"] == "ci" and fields["client_ip"] == "10.0.0.7" and fields["peer_ip"] == "127.0.0.50"
    assert "live-secret" not in repr(decision)


# -- connections without a readable request ------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "tunnel", "allowed", "reason"),
    [
        ("10.0.0.7", True, True, "client"),
        ("10.0.0.7", False, True, "client"),
        ("::ffff:10.0.0.7", False, True, "client"),
        ("10.0.3.9", False, True, "client"),  # any enabled client, whatever its routes
        ("198.51.100.7", False, False, "ip_not_whitelisted"),
        ("10.0.2.9", False, False, "client_disabled"),
        # open routes and test keys exist: a tunnel may carry requests they allow
        ("198.51.100.7", True, True, "open_route"),
    ],
)
def test_decide_connection(policy: Policy, peer: str, tunnel: bool, allowed: bool, reason: str) -> None:
    decision = decide_connection(policy, peer, tunnel=tunnel)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    if not allowed:
        assert decision.status == 403


def test_decide_connection_without_open_routes(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "environments: [{name: production}]\nclients: [{name: c, ip_address: 127.0.0.0/29}]\n"
        "routes: [{name: r}]\nassignments: {r: {production: [c]}}\n"
    )
    closed = load_policy(tmp_path)
    assert decide_connection(closed, "127.0.0.99", tunnel=True).reason == "ip_not_whitelisted"
    assert decide_connection(closed, "127.0.0.5", tunnel=True).allowed
    (tmp_path / "c.yaml").write_text("settings: {unmatched_requests: allow}\nenvironments: [{name: production}]\n")
    anything = load_policy(tmp_path)
    assert decide_connection(anything, "127.0.0.99", tunnel=False).reason == "unmatched_allowed"


def test_decision_is_a_value() -> None:
    """Decisions are frozen: a hot reload or another request cannot change one in flight."""
    decision = Decision(True, "client", 0, "10.0.0.1", "10.0.0.1")
    with pytest.raises(AttributeError):
        decision.reason = "other"  # type: ignore[misc]


def test_other_client_ip_header(tmp_path: Path) -> None:
    """settings.client_ip_header names the header that is walked; X-Forwarded-For is then just a header."""
    (tmp_path / "c.yaml").write_text(
        "settings: {trusted_proxies: [127.0.0.50], client_ip_header: X-Real-IP}\n"
        "environments: [{name: production}]\nclients: [{name: c, ip_address: 10.0.0.0/24}]\n"
        "routes: [{name: r}]\nassignments: {r: {production: [c]}}\n"
    )
    policy = load_policy(tmp_path)
    assert policy.settings.client_ip_header == "X-Real-IP"
    decision = decide(policy, RequestFacts(peer="127.0.0.50", route="r", forwarded_for=("10.0.0.7",)))
    assert (decision.reason, decision.client_ip) == ("client", "10.0.0.7")


# -- properties over random requests ---------------------------------------------------------

PEERS = st.sampled_from(
    ["10.0.0.7", "10.0.1.5", "10.0.2.9", "10.0.3.4", "198.51.100.7", "127.0.0.50", "::ffff:10.0.0.7", "2001:db8::5"]
)
TEXT = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=20)
FACTS = st.builds(
    RequestFacts,
    peer=PEERS | TEXT,
    method=st.sampled_from(["GET", "POST", "DELETE", "HEAD"]) | TEXT,
    host=st.sampled_from(["api.example.com", "x.example.com", "x.eu.example.com", "example.com"]) | TEXT,
    path=st.sampled_from(["/v1", "/v1/admin", "/health", "/health/../v1/admin", "/anything", "/v10"]) | TEXT,
    route=st.none() | st.sampled_from(["api", "admin", "health", "keyed", "off", "nope"]),
    environment=st.none() | st.sampled_from(["production", "staging", "development", "qa"]),
    api_key=st.none() | st.sampled_from(["live-secret", "test-secret", "old-secret", "guess"]),
    forwarded_for=st.lists(st.sampled_from(["10.0.0.7", "198.51.100.1", "10.9.1.1", "garbage"]) | TEXT, max_size=3).map(
        tuple
    ),
)


@settings(max_examples=400, deadline=None)
@given(facts_=FACTS)
def test_decide_never_raises_and_answers_consistently(policy: Policy, facts_: RequestFacts) -> None:
    decision = decide(policy, facts_)
    if decision.allowed:
        assert decision.reason in ALLOWED_REASONS and decision.status == 0 and decision.body == {}
    else:
        assert decision.reason in DENIED_REASONS
        assert decision.body["status"] == decision.status and decision.status in (400, 401, 403, 404, 405, 414)
        if decision.status == 403:
            assert decision.body["ip"] == decision.client_ip
    # a header from an untrusted peer never changes anything
    if decision.peer_ip not in ("127.0.0.50",):
        assert decide(policy, RequestFacts(**{**facts_.__dict__, "forwarded_for": ()})) == decision


def test_other_host_names_must_agree(policy: Policy) -> None:
    same = decide(policy, facts(other_hosts=("API.Example.com.",)))
    assert same.reason == "client"
    # a name in brackets is not a spelling of the name (only IPv6 literals go in brackets)
    assert decide(policy, facts(other_hosts=("[api.example.com]",))).reason == "route_not_found"
    other = decide(policy, facts(other_hosts=("api.example.com", "admin.example.com")))
    assert (other.reason, other.status, other.body["route"]) == ("route_not_found", 404, None)
    assert "names host 'admin.example.com' but goes to 'api.example.com'" in other.summary()
    # a route named by header does not help
    named = decide(policy, facts(route="api", other_hosts=("admin.example.com",)))
    assert (named.reason, named.body["route"]) == ("route_not_found", "api")


def test_caller_values_in_the_log_line_cannot_drive_a_terminal(policy: Policy) -> None:
    line = decide(policy, facts(route="a\x1b[2Jb")).summary()
    assert "\x1b" not in line and "route=a\\x1b[2Jb" in line
    line = decide(policy, facts(environment="\x07")).summary()
    assert "\x07" not in line and "env=\\x07" in line
