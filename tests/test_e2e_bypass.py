"""End to end: the request-path bypasses of the outside review, each class over the wire.

A real mitmdump, an echo upstream that records every request it receives, callers bound to
127.0.0.x sources. The proof of each refusal is that the upstream never saw the request.
Reverse mode for paths and Host spellings (HTTP/1 and HTTP/2), forward mode for IP-literal
host spellings.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e_util import h2_concurrent, raw_http, record_for
from tests.harness import MitmDump, Upstream, client_from

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
TRUSTED_PROXY = "127.0.0.60"
SECRET_HOST = "127.0.0.21"  # a host that a route protects, in forward mode

REVERSE_CONFIG = """\
settings:
  trusted_proxies: [{trusted}]
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
routes:
  - name: health
    requires_clients: false
    match: {{path_prefix: /health}}
  - name: api
    allowed_methods: [GET]
    match: {{path_prefix: /v1}}
  - name: public
    requires_clients: false
    match: {{hosts: [public.local]}}
  - name: secret
    match: {{hosts: [secret.local]}}
assignments:
  api: {{production: [office]}}
  secret: {{production: [office]}}
"""

# Spellings of "/v1/..." that an upstream framework may resolve differently from their text.
BYPASS_PATHS = [
    "/v1/../health",
    "/health/../v1/admin",
    "/v1/%2e%2e/health",
    "/v1/%2E%2e/health",
    "/v1/..%2fhealth",
    "/v1/..%2Fhealth",
    "/v1/..%5chealth",
    "/v1/..\\health",
    "/v1/admin;/../../health",
    "/health;/../v1/admin",
    "/health//../v1/admin",
    "//health/../v1/admin",
    "/health/./../v1/admin",
    "/health/%252e%252e/v1/admin",
    "/health/%c0%ae%c0%ae/v1/admin",
    "/health/%ef%bc%8e%ef%bc%8e/v1/admin",
    "/health/..%ef%bc%8fv1/admin",
    "/health/%00/../v1/admin",
]


class Reverse:
    def __init__(self, proxy: MitmDump, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream

    def raw(self, source: str, target: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
        return raw_http(source, "127.0.0.1", self.proxy.port, request.encode("utf-8", "surrogateescape"))


@pytest.fixture(scope="module")
def reverse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reverse]:
    root = tmp_path_factory.mktemp("e2e-bypass")
    folder = root / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(REVERSE_CONFIG.format(trusted=TRUSTED_PROXY))
    with Upstream("main") as upstream:
        proxy = MitmDump(
            folder,
            mode=f"reverse:{upstream.url}",
            access_log=root / "access.jsonl",
            extra=["--set", f"confdir={root / 'mitmproxy-conf'}"],
        )
        with proxy:
            yield Reverse(proxy, upstream)


def _status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


@pytest.mark.parametrize("path", BYPASS_PATHS)
@pytest.mark.parametrize("source", [STRANGER, OFFICE])
def test_non_canonical_paths_never_reach_the_upstream_http1(reverse: Reverse, path: str, source: str) -> None:
    before = len(reverse.upstream.seen)
    status, body = _status_and_body(reverse.raw(source, path))
    assert status == 400, (path, body)
    assert body["error"] == "Bad request" and body["reason"] == "path_not_canonical"
    record = record_for(reverse.proxy, body["request_id"])
    assert (record["decision"], record["reason"], record["status"]) == ("denied", "path_not_canonical", 400)
    assert len(reverse.upstream.seen) == before, reverse.upstream.seen[before:]


def test_non_canonical_paths_never_reach_the_upstream_http2(reverse: Reverse) -> None:
    """The same spellings as HTTP/2 :path values, all on one TLS+h2 connection."""
    before = len(reverse.upstream.seen)
    answers = h2_concurrent(STRANGER, reverse.proxy.port, BYPASS_PATHS)
    assert [status for status, _, _ in answers] == [400] * len(BYPASS_PATHS)
    assert all(json.loads(body)["reason"] == "path_not_canonical" for _, _, body in answers)
    assert len(reverse.upstream.seen) == before
    assert [status for status, _, _ in h2_concurrent(OFFICE, reverse.proxy.port, ["/v1/users"])] == [200]


def test_canonical_paths_are_forwarded_exactly(reverse: Reverse) -> None:
    for path in ["/v1/users/", "/v1/J%C3%BCrgen?x=/../y;z", "/v1/a%20b"]:
        status, body = _status_and_body(reverse.raw(OFFICE, path))
        assert status == 200, (path, body)
        assert body["path"] == path  # the upstream receives the bytes the decision was made on


def test_a_long_target_is_refused_cheaply(reverse: Reverse) -> None:
    before = len(reverse.upstream.seen)
    for size in (8193, 40_000):
        status, body = _status_and_body(reverse.raw(STRANGER, "/health/" + "a/" * (size // 2)))
        assert (status, body["error"], body["reason"]) == (414, "URI too long", "uri_too_long")
    assert len(reverse.upstream.seen) == before
    status, _ = _status_and_body(reverse.raw(OFFICE, "/v1/" + "a" * 8000))
    assert status == 200


@pytest.mark.parametrize(
    "host",
    [
        "public.local:80@secret.local",
        "public.local:@secret.local",
        "public.local:secret.local",
        "[public.local]",
        "public.local:0",
        "public.local:65536",
        "public.local:",
        "public.local, secret.local",
        "public.local secret.local",
    ],
)
def test_malformed_host_headers_are_refused(reverse: Reverse, host: str) -> None:
    before = len(reverse.upstream.seen)
    status, body = _status_and_body(reverse.raw(STRANGER, "/x", host=host))
    assert (status, body.get("reason")) == (400, "host_invalid"), (host, body)
    assert len(reverse.upstream.seen) == before


def test_a_target_naming_another_host_is_refused(reverse: Reverse) -> None:
    before = len(reverse.upstream.seen)
    status, body = _status_and_body(reverse.raw(STRANGER, "//secret.local/x", host="public.local"))
    assert (status, body["reason"]) == (400, "path_not_canonical")
    status, _ = _status_and_body(reverse.raw(STRANGER, "http://secret.local/x", host="public.local"))
    assert status == 404  # absolute-form naming another host: route_not_found, as before
    assert len(reverse.upstream.seen) == before
    status, _ = _status_and_body(reverse.raw(STRANGER, "/x", host="public.local:8080"))
    assert status == 200  # a well-formed host:port is fine


def test_proxy_headers_from_untrusted_peers_are_removed(reverse: Reverse) -> None:
    forged = (
        "X-Forwarded-Host: secret.local\r\nForwarded: host=secret.local;for=10.0.0.1\r\n"
        "X-Forwarded-Proto: https\r\nX-Real-IP: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.1\r\n"
    )
    status, body = _status_and_body(reverse.raw(STRANGER, "/x", host="public.local", extra=forged))
    assert status == 200
    seen = {name.lower(): value for name, value in body["headers"]}
    for name in ("x-forwarded-host", "forwarded", "x-forwarded-proto", "x-real-ip"):
        assert name not in seen, name
    assert seen["x-forwarded-for"] == f"10.0.0.1, {STRANGER}"  # extended: the proxy's entry is last
    # a trusted proxy's are its own words: kept
    status, body = _status_and_body(reverse.raw(TRUSTED_PROXY, "/x", host="public.local", extra=forged))
    seen = {name.lower(): value for name, value in body["headers"]}
    assert seen["x-forwarded-host"] == "secret.local" and seen["x-real-ip"] == "10.0.0.1"


def test_a_refused_caller_learns_nothing_of_the_routes_methods(reverse: Reverse) -> None:
    with client_from(STRANGER) as client:
        r = client.delete(reverse.proxy.url + "/v1/users")
    assert r.status_code == 403 and "allow" not in r.headers
    assert r.json()["error"] == "IP not authorized"
    with client_from(OFFICE) as client:
        r = client.delete(reverse.proxy.url + "/v1/users")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


# -- forward mode: IP-literal hosts ------------------------------------------------------------

FORWARD_CONFIG = """\
settings:
  unmatched_requests: allow
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
routes:
  - name: secret
    match: {{hosts: ["{secret}"]}}
assignments:
  secret: {{production: [office]}}
"""


@pytest.fixture(scope="module")
def forward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MitmDump, Upstream]]:
    root = tmp_path_factory.mktemp("e2e-bypass-forward")
    folder = root / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(FORWARD_CONFIG.format(secret=SECRET_HOST))
    with Upstream("secret", host=SECRET_HOST) as upstream:
        proxy = MitmDump(folder, access_log=root / "access.jsonl", extra=["--set", f"confdir={root / 'conf'}"])
        with proxy:
            yield proxy, upstream


@pytest.mark.parametrize(
    "spelling",
    ["2130706453", "0x7f000015", "0x7F.0.0.21", "127.0.21", "127.0.0.021", "0177.0.0.21", "[::ffff:127.0.0.21]"],
)
def test_ip_literal_spellings_cannot_dodge_a_host_route(forward: tuple[MitmDump, Upstream], spelling: str) -> None:
    proxy, upstream = forward
    before = len(upstream.seen)
    authority = f"{spelling}:{upstream.port}"
    request = f"GET http://{authority}/admin HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    status, body = _status_and_body(raw_http(STRANGER, "127.0.0.1", proxy.port, request.encode()))
    assert status in (400, 403), (spelling, body)
    if status == 403:  # the mapped IPv6 form is the protected host itself
        assert body["route"] == "secret"
    assert len(upstream.seen) == before
    # the standard spelling from an assigned client still works
    authority = f"{SECRET_HOST}:{upstream.port}"
    request = f"GET http://{authority}/admin HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    status, _ = _status_and_body(raw_http(OFFICE, "127.0.0.1", proxy.port, request.encode()))
    assert status == 200


def test_ignore_hosts_makes_the_proxy_refuse_to_start(tmp_path: Path) -> None:
    """Ignored hosts' connections are relayed without any hook: KnoxCall cannot run with them."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(FORWARD_CONFIG.format(secret=SECRET_HOST))
    proxy = MitmDump(folder, extra=["--set", "ignore_hosts=example.com", "--set", f"confdir={tmp_path / 'conf'}"])
    try:
        with contextlib.suppress(RuntimeError):  # it may exit before or after it says "listening"
            proxy.start()
        assert proxy.process is not None and proxy.process.wait(30) != 0
    finally:
        proxy.stop()
    assert "ignore_hosts/allow_hosts" in proxy.log_text()
