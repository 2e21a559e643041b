"""End to end in forward-proxy mode: absolute-URL requests, routes chosen by host, CONNECT.

Every destination is 127.0.0.1 (the echo upstream) or ``localhost`` for requests that are
denied before mitmproxy connects anywhere.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e_util import REQUEST_ID, assert_denial, record_for
from tests.harness import MitmDump, Upstream

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
IP_BODY = "IP not authorized"

# No open routes and no test keys: a CONNECT from a peer no client covers can carry
# nothing that could be allowed, so it is refused.
CONFIG = """\
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
routes:
  - name: local
    match: {hosts: [127.0.0.1], path_prefix: /v1}
  - name: by-name
    match: {hosts: [localhost], path_prefix: /v1}
assignments:
  local: {production: [office]}
  by-name: {production: [office]}
"""


class Forward:
    def __init__(self, proxy: MitmDump, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream

    def get(self, source: str, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET an absolute URL through the proxy from ``source``.

        Raw socket, because httpx drops ``local_address`` when it talks to a proxy (every
        request would come from 127.0.0.1).
        """
        parsed = httpx.URL(url)
        fields = {"Host": parsed.netloc.decode(), **(headers or {})}
        request = f"GET {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", self.proxy.port))
            sock.sendall(request.encode())
            head, body = _read_response(sock)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        return httpx.Response(
            int(status_line.split(" ")[1]),
            headers=[tuple(line.split(": ", 1)) for line in lines],
            content=body,
        )


@pytest.fixture(scope="module")
def forward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forward]:
    root = tmp_path_factory.mktemp("e2e-forward")
    folder = root / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG)
    with Upstream("main") as upstream:
        proxy = MitmDump(
            folder,
            access_log=root / "access.jsonl",
            extra=["--set", f"confdir={root / 'conf'}", "--set", "upstream_cert=false"],
        )
        with proxy:
            yield Forward(proxy, upstream)


def test_plain_http_through_the_proxy(forward: Forward) -> None:
    r = forward.get(OFFICE, f"http://127.0.0.1:{forward.upstream.port}/v1/items?x=1")
    assert r.status_code == 200
    assert (r.json()["upstream"], r.json()["path"]) == ("main", "/v1/items?x=1")
    assert REQUEST_ID.fullmatch(r.headers["x-knoxcall-request-id"])
    record = record_for(forward.proxy, r.headers["x-knoxcall-request-id"])
    assert (record["route"], record["reason"], record["host"]) == ("local", "client", "127.0.0.1")


def test_route_chosen_by_host(forward: Forward) -> None:
    by_ip = forward.get(STRANGER, f"http://127.0.0.1:{forward.upstream.port}/v1/a")
    by_name = forward.get(STRANGER, f"http://localhost:{forward.upstream.port}/v1/a")
    unmatched = forward.get(STRANGER, f"http://127.0.0.1:{forward.upstream.port}/other")
    ip_body = {"error": IP_BODY, "status": 403, "ip": STRANGER, "environment": "production"}
    assert_denial(by_ip, 403, {**ip_body, "route": "local"})
    assert_denial(by_name, 403, {**ip_body, "route": "by-name"})
    assert_denial(unmatched, 404, {"error": "Route not found", "status": 404, "route": None})
    assert not [s for s in forward.upstream.seen if s["path"] in ("/v1/a", "/other")]


def test_a_host_header_naming_another_host_is_refused(forward: Forward) -> None:
    """The route is chosen for where the request goes (127.0.0.1); an upstream doing virtual
    hosting would serve the Host header's site instead, so a request naming two hosts is refused."""
    r = forward.get(OFFICE, f"http://127.0.0.1:{forward.upstream.port}/v1/h", headers={"Host": "localhost"})
    assert_denial(r, 404, {"error": "Route not found", "status": 404, "route": None})
    record = record_for(forward.proxy, r.headers["x-knoxcall-request-id"])
    assert (record["reason"], record["host"]) == ("route_not_found", "localhost")
    assert not [s for s in forward.upstream.seen if s["path"] == "/v1/h"]
    # the same request with a Host that agrees (port included) is allowed
    r = forward.get(OFFICE, f"http://127.0.0.1:{forward.upstream.port}/v1/h2")
    assert r.status_code == 200 and r.json()["path"] == "/v1/h2"


def test_tls_sni_naming_another_host_is_refused(forward: Forward) -> None:
    """Inside an intercepted CONNECT tunnel, the TLS SNI must name the host the tunnel goes to."""
    sock, head, _ = _connect(OFFICE, forward)
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname="admin.internal") as tls:
        tls.sendall(f"GET /v1/sni HTTP/1.1\r\nHost: 127.0.0.1:{forward.upstream.port}\r\n\r\n".encode())
        response_head, body = _read_response(tls)
    assert response_head.startswith(b"HTTP/1.1 404"), response_head
    assert json.loads(body)["error"] == "Route not found"
    forward.proxy.wait_for_log("the request names host 'admin.internal' but goes to '127.0.0.1'")


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response (head, body) with a Content-Length, or an empty-bodied one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def _connect(source: str, forward: Forward) -> tuple[socket.socket, bytes, bytes]:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", forward.proxy.port))
    target = f"127.0.0.1:{forward.upstream.port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head, body = _read_response(sock)
    return sock, head, body


def test_connect_from_uncovered_peer_is_refused(forward: Forward) -> None:
    sock, head, body = _connect(STRANGER, forward)
    with sock:
        assert head.startswith(b"HTTP/1.1 403"), head
        assert b"content-type: application/json" in head.lower()
        data = json.loads(body)
        assert data["error"] == IP_BODY and data["ip"] == STRANGER
        request_id = re.search(rb"(?i)x-knoxcall-request-id: ([0-9a-f]{32})", head)
        assert request_id is not None and data["request_id"] == request_id.group(1).decode()
    record = record_for(forward.proxy, data["request_id"])
    assert (record["decision"], record["reason"], record["method"], record["status"]) == (
        "denied",
        "ip_not_whitelisted",
        "CONNECT",
        403,
    )


def test_requests_inside_an_allowed_tunnel_are_decided_one_by_one(forward: Forward) -> None:
    sock, head, _ = _connect(OFFICE, forward)
    with sock:
        assert head.startswith(b"HTTP/1.1 200"), head
        host = f"127.0.0.1:{forward.upstream.port}"
        plan = [("/v1/tunnel", b"200"), ("/elsewhere", b"404"), ("/v1/tunnel2", b"200")]
        for path, status in plan:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            response_head, body = _read_response(sock)
            assert response_head.split(b" ")[1] == status, response_head
            assert b"x-knoxcall-request-id" in response_head.lower()
            if status == b"200":
                assert json.loads(body)["path"] == path
            else:
                assert json.loads(body) == {
                    "error": "Route not found",
                    "status": 404,
                    "route": None,
                    "request_id": json.loads(body)["request_id"],
                }
    assert [s["path"] for s in forward.upstream.seen if "tunnel" in s["path"]] == ["/v1/tunnel", "/v1/tunnel2"]


def test_upstream_proxy_mode(tmp_path) -> None:
    """--mode upstream: requests are decided like in forward mode, then go to the next proxy
    (the echo server stands in for it and shows the absolute-form request it got)."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG)
    with Upstream("next-proxy") as next_proxy:
        proxy = MitmDump(folder, mode=f"upstream:{next_proxy.url}", access_log=tmp_path / "a.jsonl")
        with proxy:
            via = Forward(proxy, next_proxy)
            target = "http://127.0.0.1:9/v1/up"  # only named: the next proxy is the echo server
            allowed = via.get(OFFICE, target)
            assert allowed.status_code == 200 and allowed.json()["path"] == target
            assert_denial(
                via.get(STRANGER, target),
                403,
                {"error": IP_BODY, "status": 403, "ip": STRANGER, "route": "local", "environment": "production"},
            )
            assert_denial(
                via.get(OFFICE, target, headers={"Host": "localhost"}),
                404,
                {"error": "Route not found", "status": 404, "route": None},
            )
            assert [s["path"] for s in next_proxy.seen] == [target]
