"""End to end in reverse-proxy mode: a real mitmdump, real echo upstreams, callers bound to
different 127.0.0.x sources. Every request, allowed or denied, is checked over the wire.

Sources used (all in 127.0.0.0/8): office 127.0.0.8/29 (127.0.0.9 calls), elsewhere
127.0.0.32/29, retired (disabled) 127.0.0.40/29, the trusted proxy 127.0.0.60, and
127.0.0.99 which no client covers.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_util import (
    REQUEST_ID,
    assert_denial,
    h2_client,
    h2_concurrent,
    raw_http,
    record_for,
    sha,
    upstream_headers,
)
from tests.harness import MitmDump, Upstream, client_from

LIVE_KEY = "e2e-live-key"
TEST_KEY = "e2e-test-key"
OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
TRUSTED_PROXY = "127.0.0.60"


def config_text(main: Upstream, second: Upstream) -> dict[str, str]:
    return {
        "settings.yaml": f"""\
settings:
  default_environment: production
  trusted_proxies: [{TRUSTED_PROXY}]
environments:
  - name: production
  - name: staging
  - name: development
""",
        "clients.yml": """\
clients:
  - name: office
    ip_address: 127.0.0.8/29
  - name: elsewhere
    ip_address: 127.0.0.32/29
  - name: retired
    ip_address: 127.0.0.40/29
    enabled: false
""",
        "routes.yaml": f"""\
routes:
  - name: api
    target_base_url: {main.url}
    allowed_methods: [GET, POST]
    match: {{path_prefix: /v1}}
    environments:
      staging: {{target_base_url: "{second.url}/base", allowed_methods: [GET]}}
  - name: keyed
    requires_api_key: true
    match: {{path_prefix: /keyed}}
  - name: open
    requires_clients: false
    match: {{path_prefix: /open}}
  - name: other
    match: {{path_prefix: /other}}
  - name: rewrite
    target_base_url: "{second.url}/base/"
    match: {{path_prefix: /rw}}
  - name: ws
    match: {{path_prefix: /ws}}
  - name: "off"
    enabled: false
    match: {{path_prefix: /off}}
assignments:
  api:
    production: [office, retired]
    staging: [office]
    development: [office]
  keyed: {{production: [office]}}
  other: {{production: [elsewhere]}}
  rewrite: {{production: [office]}}
  ws: {{production: [office]}}
api_keys:
  - name: ci
    key_sha256: "{sha(LIVE_KEY)}"
  - name: tester
    key_sha256: "{sha(TEST_KEY)}"
    type: test
""",
    }


class Setup:
    def __init__(self, proxy: MitmDump, main: Upstream, second: Upstream) -> None:
        self.proxy = proxy
        self.main = main
        self.second = second

    def call(self, source: str, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
        with client_from(source) as client:
            return client.request(method, self.proxy.url + path, headers=headers)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("e2e-reverse")
    with Upstream("main") as main, Upstream("second") as second:
        folder = root / "config"
        folder.mkdir()
        for name, text in config_text(main, second).items():
            (folder / name).write_text(text)
        proxy = MitmDump(
            folder,
            mode=f"reverse:{main.url}",
            access_log=root / "access.jsonl",
            extra=["--set", f"confdir={root / 'mitmproxy-conf'}"],
        )
        with proxy:
            yield Setup(proxy, main, second)


def test_allowed_request_reaches_upstream_cleaned(setup: Setup) -> None:
    r = setup.call(
        OFFICE,
        "POST",
        "/v1/users?page=2&q=a%20b",
        headers={
            "x-knoxcall-route": "api",
            "x-knoxcall-environment": "production",
            "x-knoxcall-key": LIVE_KEY,
            "X-KnoxCall-Debug": "1",
            "X-Custom": "kept",
        },
    )
    assert r.status_code == 200
    request_id = r.headers["x-knoxcall-request-id"]
    assert REQUEST_ID.fullmatch(request_id)
    echoed = r.json()
    assert (echoed["upstream"], echoed["method"], echoed["path"]) == ("main", "POST", "/v1/users?page=2&q=a%20b")
    headers = upstream_headers(r)
    assert not [n for n in headers if n.startswith("x-knoxcall-")]
    assert headers["x-forwarded-for"] == [OFFICE]
    assert headers["x-custom"] == ["kept"]
    record = record_for(setup.proxy, request_id)
    assert (record["decision"], record["reason"], record["status"]) == ("allowed", "client", 200)
    assert (record["client"], record["api_key"], record["client_ip"], record["peer_ip"]) == (
        "office",
        "ci",
        OFFICE,
        OFFICE,
    )
    assert (record["method"], record["path"], record["route"], record["environment"]) == (
        "POST",
        "/v1/users?page=2&q=a%20b",
        "api",
        "production",
    )
    assert LIVE_KEY not in setup.proxy.log_text()
    assert LIVE_KEY not in (setup.proxy.access_log.read_text() if setup.proxy.access_log else "")


IP_BODY = "IP not authorized"


@pytest.mark.parametrize(
    ("source", "method", "path", "headers", "status", "body", "reason"),
    [
        (
            STRANGER,
            "GET",
            "/v1/a",
            {},
            403,
            {"error": IP_BODY, "status": 403, "ip": STRANGER, "route": "api", "environment": "production"},
            "ip_not_whitelisted",
        ),
        (
            "127.0.0.33",
            "GET",
            "/v1/a",
            {},
            403,
            {"error": IP_BODY, "status": 403, "ip": "127.0.0.33", "route": "api", "environment": "production"},
            "client_not_assigned",
        ),
        (
            "127.0.0.41",
            "GET",
            "/v1/a",
            {},
            403,
            {"error": IP_BODY, "status": 403, "ip": "127.0.0.41", "route": "api", "environment": "production"},
            "client_disabled",
        ),
        (
            OFFICE,
            "GET",
            "/nothing",
            {},
            404,
            {"error": "Route not found", "status": 404, "route": None},
            "route_not_found",
        ),
        (
            OFFICE,
            "GET",
            "/off/x",
            {},
            404,
            {"error": "Route not found", "status": 404, "route": None},
            "route_not_found",
        ),
        (
            OFFICE,
            "GET",
            "/v1/a",
            {"x-knoxcall-route": "nope"},
            404,
            {"error": "Route not found", "status": 404, "route": "nope"},
            "route_not_found",
        ),
        (
            OFFICE,
            "GET",
            "/v1/a",
            {"x-knoxcall-route": "open"},  # the open route does not fit /v1
            404,
            {"error": "Route not found", "status": 404, "route": "open"},
            "route_not_found",
        ),
        (
            OFFICE,
            "GET",
            "/v1/a",
            {"x-knoxcall-environment": "qa"},
            404,
            {"error": "Environment not found", "status": 404, "environment": "qa"},
            "environment_not_found",
        ),
        (OFFICE, "DELETE", "/v1/a", {}, 405, {"error": "Method not allowed", "status": 405}, "method_not_allowed"),
        (
            OFFICE,
            "GET",
            "/v1/a",
            {"x-knoxcall-key": "wrong"},
            401,
            {"error": "Invalid API key", "status": 401},
            "invalid_api_key",
        ),
        (OFFICE, "GET", "/keyed/a", {}, 401, {"error": "Invalid API key", "status": 401}, "api_key_required"),
        (
            OFFICE,
            "GET",
            "/v1/a",
            {"x-knoxcall-key": TEST_KEY},
            403,
            {
                "error": "Test keys are not allowed in the default environment",
                "status": 403,
                "ip": OFFICE,
                "route": "api",
                "environment": "production",
            },
            "test_key_not_allowed",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.islower() and "_" in v else None,
)
def test_denials_over_the_wire(
    setup: Setup,
    source: str,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    body: dict[str, Any],
    reason: str,
) -> None:
    seen_before = len(setup.main.seen) + len(setup.second.seen)
    marker = f"/{reason}-{status}"
    r = setup.call(source, method, path + ("&" if "?" in path else "?m=") + marker, headers)
    request_id = assert_denial(r, status, body)
    if status == 405:
        assert r.headers["allow"] == "GET, POST"
    record = record_for(setup.proxy, request_id)
    assert (record["decision"], record["reason"], record["status"]) == ("denied", reason, status)
    assert record["client_ip"] == source
    setup.proxy.wait_for_log(f"knoxcall: denied {reason} {source}")
    # the upstreams never saw it
    assert not [s for s in [*setup.main.seen, *setup.second.seen] if marker in s["path"]]
    assert len(setup.main.seen) + len(setup.second.seen) == seen_before


def test_open_route_and_test_key(setup: Setup) -> None:
    r = setup.call(STRANGER, "GET", "/open/status")
    assert r.status_code == 200 and r.json()["upstream"] == "main"
    assert record_for(setup.proxy, r.headers["x-knoxcall-request-id"])["reason"] == "open_route"
    r = setup.call(STRANGER, "GET", "/v1/t", {"x-knoxcall-key": TEST_KEY, "x-knoxcall-environment": "staging"})
    assert r.status_code == 200
    assert r.json()["upstream"] == "second"
    record = record_for(setup.proxy, r.headers["x-knoxcall-request-id"])
    assert (record["reason"], record["api_key"], record["client"]) == ("test_key", "tester", None)


def test_environments_via_header(setup: Setup) -> None:
    staging = setup.call(OFFICE, "GET", "/v1/env?x=1", {"x-knoxcall-environment": "staging"})
    assert staging.status_code == 200
    assert (staging.json()["upstream"], staging.json()["path"]) == ("second", "/base/v1/env?x=1")
    dev = setup.call(OFFICE, "GET", "/v1/env", {"x-knoxcall-environment": "development"})
    assert dev.status_code == 200 and dev.json()["upstream"] == "main"
    # the staging override allows GET only
    post = setup.call(OFFICE, "POST", "/v1/env", {"x-knoxcall-environment": "staging"})
    assert_denial(post, 405, {"error": "Method not allowed", "status": 405})
    assert post.headers["allow"] == "GET"
    # elsewhere is not assigned in any environment of api
    r = setup.call("127.0.0.33", "GET", "/v1/env", {"x-knoxcall-environment": "staging"})
    assert_denial(
        r, 403, {"error": IP_BODY, "status": 403, "ip": "127.0.0.33", "route": "api", "environment": "staging"}
    )


def test_trusted_proxy_and_forged_forwarded_for(setup: Setup) -> None:
    # a trusted proxy forwards for the office: allowed, and the header is extended
    r = setup.call(TRUSTED_PROXY, "GET", "/v1/p", {"X-Forwarded-For": OFFICE})
    assert r.status_code == 200
    assert upstream_headers(r)["x-forwarded-for"] == [f"{OFFICE}, {TRUSTED_PROXY}"]
    record = record_for(setup.proxy, r.headers["x-knoxcall-request-id"])
    assert (record["client_ip"], record["peer_ip"], record["client"]) == (OFFICE, TRUSTED_PROXY, "office")
    # the trusted proxy forwards for a stranger that forged the office into the header
    r = setup.call(TRUSTED_PROXY, "GET", "/v1/p", {"X-Forwarded-For": f"{OFFICE}, {STRANGER}"})
    assert_denial(
        r, 403, {"error": IP_BODY, "status": 403, "ip": STRANGER, "route": "api", "environment": "production"}
    )
    # an untrusted caller's own forged header changes nothing
    r = setup.call(STRANGER, "GET", "/v1/p", {"X-Forwarded-For": OFFICE})
    assert_denial(
        r, 403, {"error": IP_BODY, "status": 403, "ip": STRANGER, "route": "api", "environment": "production"}
    )
    record = record_for(setup.proxy, r.headers["x-knoxcall-request-id"])
    assert (record["client_ip"], record["peer_ip"]) == (STRANGER, STRANGER)
    # garbage in the header stops the walk at the trusted proxy itself
    r = setup.call(TRUSTED_PROXY, "GET", "/v1/p", {"X-Forwarded-For": f"{OFFICE}, not-an-ip"})
    assert_denial(
        r, 403, {"error": IP_BODY, "status": 403, "ip": TRUSTED_PROXY, "route": "api", "environment": "production"}
    )


def test_target_rewriting_to_second_upstream(setup: Setup) -> None:
    r = setup.call(OFFICE, "GET", "/rw/items/7?x=1&y=%2F")
    assert r.status_code == 200
    echoed = r.json()
    assert (echoed["upstream"], echoed["path"]) == ("second", "/base/rw/items/7?x=1&y=%2F")
    assert upstream_headers(r)["host"] == [f"127.0.0.1:{setup.second.port}"]
    record = record_for(setup.proxy, r.headers["x-knoxcall-request-id"])
    assert record["path"] == "/rw/items/7?x=1&y=%2F"  # what the caller sent


def test_keep_alive_connection_is_decided_per_request(setup: Setup) -> None:
    expected = [
        ("GET", "/v1/k", {}, 200),
        ("GET", "/v1/k", {"x-knoxcall-route": "other"}, 404),  # other does not fit /v1
        ("GET", "/other/k", {}, 403),  # office is not assigned to other
        ("DELETE", "/v1/k", {}, 405),
        ("GET", "/v1/k", {"x-knoxcall-route": "api"}, 200),
        ("GET", "/nothing", {}, 404),
        ("GET", "/keyed/k", {"x-knoxcall-key": LIVE_KEY}, 200),
        ("GET", "/keyed/k", {}, 401),
        ("POST", "/other/k", {}, 403),  # a denied request with a body: the body is consumed
        ("POST", "/v1/k", {}, 200),
        ("HEAD", "/v1/k", {}, 405),
        ("GET", "/v1/k", {}, 200),
    ]
    local_ports = set()
    with client_from(OFFICE) as client:
        for method, path, headers, status in expected:
            body = b"payload " * 1000 if method == "POST" else None
            r = client.request(method, setup.proxy.url + path, headers=headers, content=body)
            if method == "POST" and status == 200:
                assert r.json()["body"] == body.decode()
            assert r.status_code == status, (method, path, headers, r.text)
            assert REQUEST_ID.fullmatch(r.headers["x-knoxcall-request-id"])
            local_ports.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(local_ports) == 1  # one connection carried them all


def test_http2_every_stream_decided(setup: Setup) -> None:
    with h2_client(OFFICE) as client:
        base = f"https://127.0.0.1:{setup.proxy.port}"
        r = client.get(base + "/v1/h2")
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200 and r.json()["upstream"] == "main"
        assert upstream_headers(r)["x-forwarded-for"] == [OFFICE]
        assert REQUEST_ID.fullmatch(r.headers["x-knoxcall-request-id"])
        denied = client.get(base + "/other/h2")
        assert denied.http_version == "HTTP/2"
        assert_denial(
            denied, 403, {"error": IP_BODY, "status": 403, "ip": OFFICE, "route": "other", "environment": "production"}
        )
    # concurrent streams on one connection, each decided on its own
    plan = [("/v1/s", 200), ("/nothing", 404), ("/other/s", 403), ("/rw/s", 200), ("/keyed/s", 401)] * 2
    answers = h2_concurrent(OFFICE, setup.proxy.port, [path for path, _ in plan])
    assert [status for status, _, _ in answers] == [status for _, status in plan]
    ids = [headers["x-knoxcall-request-id"] for _, headers, _ in answers]
    assert len(set(ids)) == len(ids)
    for (path, status), (_, headers, body) in zip(plan, answers, strict=True):
        data = json.loads(body)
        if status == 200:
            assert data["path"].endswith(path)
        else:
            assert headers["content-type"] == "application/json"
            assert data["status"] == status and data["request_id"] == headers["x-knoxcall-request-id"]
    with h2_client(STRANGER) as client:
        r = client.get(f"https://127.0.0.1:{setup.proxy.port}/v1/h2")
        assert r.http_version == "HTTP/2"
        assert_denial(
            r, 403, {"error": IP_BODY, "status": 403, "ip": STRANGER, "route": "api", "environment": "production"}
        )


def test_websocket_upgrade_is_decided(setup: Setup) -> None:
    upgrade = (
        "GET /ws/chat HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{setup.proxy.port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    denied = raw_http(STRANGER, "127.0.0.1", setup.proxy.port, upgrade)
    head, _, payload = denied.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), denied
    assert b"content-type: application/json" in head.lower()
    assert json.loads(payload)["error"] == IP_BODY
    assert not [s for s in setup.main.seen if s["path"] == "/ws/chat"]
    # an allowed upgrade goes upstream (the echo server answers it as a plain request)
    allowed = raw_http(OFFICE, "127.0.0.1", setup.proxy.port, upgrade)
    assert allowed.startswith(b"HTTP/1.1 200"), allowed
    seen = [s for s in setup.main.seen if s["path"] == "/ws/chat"]
    assert len(seen) == 1
    assert {k.lower(): v for k, v in seen[0]["headers"]}["upgrade"] == "websocket"


def test_event_log_explains_decisions(setup: Setup) -> None:
    r = setup.call("127.0.0.33", "GET", "/v1/log")
    request_id = r.headers["x-knoxcall-request-id"]
    text = setup.proxy.wait_for_log(request_id)
    line = next(line for line in text.splitlines() if request_id in line)
    assert "knoxcall: denied client_not_assigned 127.0.0.33 route=api env=production client=elsewhere" in line


def test_access_log_has_every_field(setup: Setup, tmp_path: Path) -> None:
    r = setup.call(OFFICE, "GET", "/v1/fields", {"User-Agent": "e2e-agent/2"})
    record = record_for(setup.proxy, r.headers["x-knoxcall-request-id"])
    assert set(record) >= {
        "ts",
        "request_id",
        "decision",
        "reason",
        "status",
        "method",
        "host",
        "path",
        "route",
        "environment",
        "client",
        "client_ip",
        "peer_ip",
        "api_key",
        "user_agent",
        "latency_ms",
    }
    assert record["user_agent"] == "e2e-agent/2"
    assert record["host"] == "127.0.0.1"
    assert record["ts"].endswith("Z")
    assert record["latency_ms"] >= 0


def test_pipelined_requests_are_decided_one_by_one(setup: Setup) -> None:
    """Several requests written at once on one connection: each gets its own decision, and
    a denied request's body (or a denied HEAD's missing body) never shifts the next answer."""
    host = f"Host: 127.0.0.1:{setup.proxy.port}\r\n"
    requests = (
        f"POST /other/pipe1 HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhello"
        f"GET /v1/pipe2 HTTP/1.1\r\n{host}\r\n"
        f"HEAD /other/pipe3 HTTP/1.1\r\n{host}\r\n"
        f"GET /v1/pipe4 HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
    ).encode()
    data = b""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((OFFICE, 0))
        sock.connect(("127.0.0.1", setup.proxy.port))
        sock.sendall(requests)
        while chunk := sock.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"403", b"200", b"403", b"200"], data
    assert data.count(b'"error": "IP not authorized"') == 1  # the HEAD denial has no body
    assert [s["path"] for s in setup.main.seen if "pipe" in s["path"]] == ["/v1/pipe2", "/v1/pipe4"]
