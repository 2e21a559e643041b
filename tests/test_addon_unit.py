"""The mitmproxy adapter on test flows: options, fail-closed hooks, annotations, rewriting, logs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, flowfilter, hooks
from mitmproxy.http import Headers, HTTPFlow
from mitmproxy.net.dns import response_codes as dns_response_codes
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

import knoxcall_addon.addon as entry_point
from knoxcall_addon import connections, proxy_addon
from knoxcall_addon.accesslog import ACCESS_LOG_FIELDS
from knoxcall_addon.proxy_addon import KnoxCall

LIVE_KEY = "unit-live-secret"
TEST_KEY = "unit-test-secret"


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


CONFIG = f"""\
settings:
  trusted_proxies: [127.0.0.50]
environments:
  - name: production
  - name: staging
clients:
  - name: local
    ip_address: 127.0.0.0/29
  - name: v6
    ip_address: "::1, fe80::/64"
  - name: gone
    ip_address: 127.0.3.0/24
    enabled: false
routes:
  - name: api
    target_base_url: https://backend.example.com:8443/base/
    allowed_methods: [GET, POST]
    match: {{hosts: [api.example.com], path_prefix: /v1}}
    environments:
      staging: {{target_base_url: "http://[::1]:9000"}}
  - name: plain
    target_base_url: http://127.0.0.1/api
    match: {{hosts: [plain.example.com]}}
  - name: same-host
    match: {{hosts: [same.example.com]}}
  - name: open
    requires_clients: false
    match: {{hosts: [open.example.com]}}
assignments:
  api: {{production: [local, v6], staging: [local]}}
  plain: {{production: [local]}}
  same-host: {{production: [local]}}
api_keys:
  - name: live
    key_sha256: "{sha(LIVE_KEY)}"
  - name: tester
    key_sha256: "{sha(TEST_KEY)}"
    type: test
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG)
    return folder


@pytest.fixture
def tctx(config_dir: Path) -> Iterator[tuple[KnoxCall, taddons.context]]:
    addon = KnoxCall()
    with taddons.context(addon) as context:
        context.configure(addon, knoxcall_config=str(config_dir))
        yield addon, context
    addon.done()


def make_flow(
    peer: Any = ("127.0.0.5", 50000),
    host: str = "api.example.com",
    path: str = "/v1/users",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    mode: str = "regular",
    port: int = 80,
) -> HTTPFlow:
    fields = [("user-agent", "unit-test/1"), *(headers or [])]
    request = tutils.treq(
        host=host,
        port=port,
        method=method.encode(),
        path=path.encode(),
        headers=Headers([(k.encode(), v.encode()) for k, v in fields]),
        content=b"",
    )
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = peer
    flow.client_conn.proxy_mode = ProxyMode.parse(mode)
    return flow


def body(flow: HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    return json.loads(flow.response.get_text())


# -- options -------------------------------------------------------------------------------


def test_configure_loads_and_logs(tctx, caplog, tmp_path: Path) -> None:
    addon, context = tctx
    assert addon.current is not None
    assert set(addon.current.policy.routes) == {"api", "plain", "same-host", "open"}
    caplog.set_level(logging.INFO, logger="knoxcall")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "knoxcall.yaml").write_text(CONFIG)
    context.configure(addon, knoxcall_config=str(copy))
    assert re.search(r"knoxcall: config \w+ loaded from .*: 3 clients, 4 ranges, 4 routes", caplog.text)


def test_invalid_config_raises_options_error_and_keeps_the_previous_policy(tctx, tmp_path: Path) -> None:
    addon, context = tctx
    before = addon.current
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "clients.yaml").write_text(
        "environments: [{name: production}]\nclients:\n  - name: a\n    ip_address: 10.0.0.1/8\n"
    )
    with pytest.raises(exceptions.OptionsError) as caught:
        context.configure(addon, knoxcall_config=str(bad))
    assert f"{bad}/clients.yaml:4: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8" in str(caught.value)
    assert addon.current is before  # the last good policy stays in force, untouched
    assert context.options.knoxcall_config != str(bad)  # and the option is rolled back
    flow = make_flow()
    addon.requestheaders(flow)
    assert flow.response is None  # still deciding with the old policy: allowed


def test_missing_config_folder_at_start_refuses_to_start(tmp_path: Path, monkeypatch, caplog) -> None:
    """At start there is no policy to keep: each problem logged on its own line, no traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    addon = KnoxCall()
    with taddons.context(addon) as context:
        with pytest.raises(SystemExit) as caught:
            context.configure(addon, knoxcall_config=str(tmp_path / "nowhere"))
        assert caught.value.code == 1
        assert addon.current is None
    errors = [r for r in caplog.records if r.name == "knoxcall" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "knoxcall: invalid config, not starting (1 problem(s)):",
        f"knoxcall:   {tmp_path / 'nowhere'}: config folder does not exist",
    ]
    assert not any(r.exc_info for r in errors)


def test_no_policy_loaded_denies_everything(caplog) -> None:
    addon = KnoxCall()
    with taddons.context(addon):
        flow = make_flow()
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 500
        assert flow.metadata["knoxcall"]["reason"] == "internal_error"
        tcp = tflow.ttcpflow()
        addon.tcp_start(tcp)
        assert tcp.metadata["knoxcall"]["decision"] == "denied"
        assert tcp.error is not None
    assert "no policy loaded" in caplog.text


def test_entry_point_holds_only_knoxcalls_hooks() -> None:
    """mitmproxy calls a module-level function named like an event as a hook: the entry
    point's are KnoxCall's own, bound to its one KnoxCall, and the four lifecycle ones that
    also run the connectivity monitor's (hooktable); no addon tree below it."""
    names = {n for n in vars(entry_point) if not n.startswith("__")} & set(hooks.all_hooks)
    knoxcall = entry_point.knoxcall
    assert isinstance(knoxcall, KnoxCall)
    lifecycle = {"load", "configure", "running", "done"}
    own = {n for n in hooks.all_hooks if callable(getattr(knoxcall, n, None))}
    assert names == own | lifecycle, names ^ (own | lifecycle)
    for name in own - lifecycle:
        hook = getattr(entry_point, name)
        if hook is None:  # no access log open: nothing to complete
            assert name in ("response", "error") and knoxcall.access_log is None
        else:
            assert hook.__self__ is knoxcall and hook.__func__ is getattr(KnoxCall, name)
    assert not hasattr(entry_point, "addons")


# -- fail closed ---------------------------------------------------------------------------


def test_exception_while_deciding_denies_with_500(tctx, monkeypatch, caplog) -> None:
    addon, _ = tctx

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("kaboom")

    monkeypatch.setattr(proxy_addon, "decide_request", explode)
    flow = make_flow()
    addon.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 500
    data = body(flow)
    assert data == {"error": "Internal error", "status": 500, "request_id": data["request_id"]}
    assert flow.response.headers["content-type"] == "application/json"
    meta = flow.metadata["knoxcall"]
    assert (meta["decision"], meta["reason"], meta["client_ip"]) == ("denied", "internal_error", "127.0.0.5")
    assert flow.marked
    errors = [r for r in caplog.records if r.name == "knoxcall" and r.levelno == logging.ERROR]
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in errors)  # logged with traceback
    assert any("denied internal_error" in r.getMessage() for r in errors)


def test_exception_while_rewriting_denies(tctx, monkeypatch) -> None:
    """An allowed request that cannot be prepared for upstream is not sent half-prepared."""
    addon, _ = tctx

    def explode(*args: Any) -> None:
        raise RuntimeError("rewrite failed")

    monkeypatch.setattr(proxy_addon, "forward", explode)
    flow = make_flow()
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 500


def test_exception_while_deciding_a_connection_denies(tctx, monkeypatch) -> None:
    addon, _ = tctx

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("kaboom")

    monkeypatch.setattr(connections, "decide_connection", explode)
    monkeypatch.setattr(connections, "decide_raw_flow", explode)
    flow = make_flow(method="CONNECT", path="")
    addon.http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 500
    tcp = tflow.ttcpflow()
    tcp.client_conn.peername = ("127.0.0.5", 1)
    addon.tcp_start(tcp)
    assert tcp.metadata["knoxcall"]["reason"] == "internal_error"
    assert refused_at_connect(addon, tcp)


@pytest.mark.parametrize("broken", ["_log_decision", "_annotate"])
def test_error_after_a_denial_still_refuses(tctx, monkeypatch, broken: str) -> None:
    """Logging or annotating that fails must not let a denied request (or flow) through."""
    addon, _ = tctx

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{broken} failed")

    monkeypatch.setattr(KnoxCall, broken, explode)
    denied = make_flow(peer=("127.0.0.99", 1))
    addon.requestheaders(denied)
    assert denied.response is not None and denied.response.status_code == 500
    assert denied.marked
    connect = make_flow(peer=("127.0.0.99", 1), method="CONNECT", path="")
    addon.http_connect(connect)
    assert connect.response is not None and connect.response.status_code == 500
    raw = tflow.ttcpflow()
    raw.client_conn.peername = ("127.0.0.5", 1)  # a covered peer: refused all the same
    addon.tcp_start(raw)
    assert refused_at_connect(addon, raw)
    query = tflow.tdnsflow()
    query.client_conn.peername = ("127.0.0.5", 1)
    addon.dns_request(query)
    assert query.response is not None and query.response.response_code == dns_response_codes.REFUSED


def test_error_fallback_answers_head_without_body_and_closes_streams(tctx, monkeypatch) -> None:
    """The fallback denial follows the same rules as a normal one (HEAD, streamed bodies)."""
    addon, _ = tctx

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("annotate failed")

    monkeypatch.setattr(KnoxCall, "_annotate", explode)
    head = make_flow(peer=("127.0.0.99", 1), method="HEAD")
    addon.requestheaders(head)
    assert head.response is not None and head.response.status_code == 500
    assert head.response.content == b""
    streamed = make_flow(peer=("127.0.0.99", 1), method="POST")
    streamed.request.stream = True
    addon.requestheaders(streamed)
    assert streamed.response is None and streamed.error is not None  # killed, not answered


def test_error_after_allowing_refuses_instead(tctx, monkeypatch) -> None:
    """An allowed request whose log line cannot be written is refused, not sent unlogged."""
    addon, _ = tctx

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("log failed")

    monkeypatch.setattr(KnoxCall, "_log_decision", explode)
    flow = make_flow()
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 500


# -- annotations -------------------------------------------------------------------------


def test_allowed_flow_annotations(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(headers=[("x-knoxcall-key", LIVE_KEY)])
    addon.requestheaders(flow)
    assert flow.response is None
    assert not flow.marked
    assert flow.comment.startswith("allowed client 127.0.0.5 route=api env=production client=local key=live")
    meta = flow.metadata["knoxcall"]
    assert meta["decision"] == "allowed" and meta["reason"] == "client" and meta["status"] == 0
    assert meta["route"] == "api" and meta["environment"] == "production" and meta["client"] == "local"
    assert meta["client_ip"] == meta["peer_ip"] == "127.0.0.5"
    assert meta["api_key"] == "live"
    assert meta["method"] == "GET" and meta["host"] == "api.example.com" and meta["path"] == "/v1/users"
    assert meta["user_agent"] == "unit-test/1"
    assert re.fullmatch(r"[0-9a-f]{32}", meta["request_id"])
    assert meta["request_id"] in flow.comment
    assert LIVE_KEY not in json.dumps(meta) and LIVE_KEY not in flow.comment


def test_denied_flow_annotations(tctx, caplog) -> None:
    addon, _ = tctx
    caplog.set_level(logging.INFO, logger="knoxcall")
    flow = make_flow(peer=("127.0.0.9", 1234))
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.marked == proxy_addon.DENIED_MARKER
    # the useful words first, for mitmweb's comment column: reason, caller (the status has its column)
    assert flow.comment.startswith("ip_not_whitelisted 127.0.0.9 route=api env=production")
    meta = flow.metadata["knoxcall"]
    assert (meta["decision"], meta["reason"], meta["status"]) == ("denied", "ip_not_whitelisted", 403)
    data = body(flow)
    assert data == {
        "error": "IP not authorized",
        "status": 403,
        "ip": "127.0.0.9",
        "route": "api",
        "environment": "production",
        "request_id": meta["request_id"],
    }
    assert flow.response.headers["x-knoxcall-request-id"] == meta["request_id"]
    assert flow.response.headers["content-type"] == "application/json"
    warnings = [r for r in caplog.records if r.name == "knoxcall" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["knoxcall: denied " + flow.comment]


def test_405_has_allow_header(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(method="DELETE")
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 405
    assert flow.response.headers["allow"] == "GET, POST"
    assert body(flow)["error"] == "Method not allowed"


def test_a_replayed_flow_is_decided_again(tctx) -> None:
    """mitmweb's replay sends a flow through requestheaders again: it gets a fresh decision."""
    addon, _ = tctx
    flow = make_flow(peer=("127.0.0.9", 1))
    addon.requestheaders(flow)
    first = flow.metadata["knoxcall"]["request_id"]
    flow.response = None
    addon.requestheaders(flow)
    assert flow.metadata["knoxcall"]["request_id"] != first
    assert flow.response is not None and flow.response.status_code == 403


def test_a_replay_without_knoxcalls_replay_information_proves_no_key(tctx) -> None:
    """A replayed flow KnoxCall never forwarded (e.g. a flow file from elsewhere) is decided
    without the key it carries, as every replay (replay.py)."""
    addon, _ = tctx
    flow = make_flow(headers=[("x-knoxcall-key", LIVE_KEY)])
    flow.is_replay = "request"
    addon.requestheaders(flow)
    assert flow.response is None and flow.metadata["knoxcall"]["reason"] == "client"
    assert flow.metadata["knoxcall"]["api_key"] is None


# -- peers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "client_ip", "allowed"),
    [
        (("127.0.0.5", 1), "127.0.0.5", True),
        (("::ffff:127.0.0.5", 1, 0, 0), "127.0.0.5", True),
        (("::1", 1, 0, 0), "::1", True),
        (("fe80::7%eth0", 1, 0, 2), "fe80::7", True),
        (("::ffff:127.0.0.9", 1, 0, 0), "127.0.0.9", False),
        (("2001:db8::1", 1, 0, 0), "2001:db8::1", False),
        (("127.0.3.1", 1), "127.0.3.1", False),
    ],
)
def test_peer_forms(tctx, peer: tuple, client_ip: str, allowed: bool) -> None:
    addon, _ = tctx
    flow = make_flow(peer=peer)
    addon.requestheaders(flow)
    assert flow.metadata["knoxcall"]["client_ip"] == client_ip
    assert (flow.response is None) is allowed


def test_trusted_proxy_header(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(peer=("127.0.0.50", 1), headers=[("X-Forwarded-For", "203.0.113.9, 127.0.0.5")])
    addon.requestheaders(flow)
    assert flow.response is None
    meta = flow.metadata["knoxcall"]
    assert (meta["client_ip"], meta["peer_ip"]) == ("127.0.0.5", "127.0.0.50")
    assert flow.request.headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.5, 127.0.0.50"
    forged = make_flow(peer=("127.0.0.9", 1), headers=[("X-Forwarded-For", "127.0.0.5")])
    addon.requestheaders(forged)
    assert forged.response is not None and forged.response.status_code == 403
    assert body(forged)["ip"] == "127.0.0.9"


# -- forwarding -----------------------------------------------------------------------------


def test_headers_stripped_and_forwarded_for_extended(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(
        headers=[
            ("X-KnoxCall-Route", "api"),
            ("x-knoxcall-environment", "production"),
            ("x-knoxcall-key", LIVE_KEY),
            ("X-Knoxcall-Anything-Else", "1"),
            ("X-Forwarded-For", "10.1.1.1"),
            ("X-Forwarded-For", "10.2.2.2"),
            ("X-Other", "kept"),
        ]
    )
    addon.requestheaders(flow)
    assert flow.response is None
    headers = flow.request.headers
    assert not [n for n in headers if n.lower().startswith("x-knoxcall-")]
    assert headers.get_all("X-Forwarded-For") == ["10.1.1.1, 10.2.2.2, 127.0.0.5"]
    assert headers["X-Other"] == "kept"
    assert headers["user-agent"] == "unit-test/1"


def test_forwarded_for_added_when_absent(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(host="same.example.com", path="/x")
    addon.requestheaders(flow)
    assert flow.request.headers["X-Forwarded-For"] == "127.0.0.5"
    # no target: the request goes where it was going
    assert (flow.request.host, flow.request.port, flow.request.path) == ("same.example.com", 80, "/x")


def test_target_rewrite_keeps_path_and_query(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(path="/v1/users?q=a%20b&x=1")
    addon.requestheaders(flow)
    request = flow.request
    assert (request.scheme, request.host, request.port) == ("https", "backend.example.com", 8443)
    assert request.path == "/base/v1/users?q=a%20b&x=1"
    assert request.query["q"] == "a b"
    assert request.host_header == "backend.example.com:8443"
    assert flow.metadata["knoxcall"]["path"] == "/v1/users?q=a%20b&x=1"  # the log keeps what the caller sent
    assert flow.metadata["knoxcall"]["host"] == "api.example.com"


def test_target_rewrite_default_port_and_ipv6(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(host="plain.example.com", path="/items/7")
    addon.requestheaders(flow)
    assert (flow.request.host, flow.request.port, flow.request.path) == ("127.0.0.1", 80, "/api/items/7")
    assert flow.request.host_header == "127.0.0.1"
    staged = make_flow(path="/v1/x?y=2", headers=[("x-knoxcall-environment", "staging")])
    addon.requestheaders(staged)
    assert (staged.request.scheme, staged.request.host, staged.request.port) == ("http", "::1", 9000)
    assert staged.request.path == "/v1/x?y=2"
    assert staged.request.host_header == "[::1]:9000"


@pytest.mark.parametrize("mode", ["regular", "upstream:http://127.0.0.1:9"])
def test_a_request_naming_two_hosts_is_refused(tctx, mode: str) -> None:
    """A virtual-hosting upstream serves the Host header (or the TLS SNI), not the host the
    route was chosen for: a Host naming the open route must not reach same.example.com."""
    addon, _ = tctx
    for headers, sni in [([("Host", "open.example.com")], None), ([("Host", "same.example.com")], "open.example.com")]:
        flow = make_flow(host="same.example.com", path="/", headers=headers, mode=mode)
        if sni:
            flow.client_conn.tls = True
            flow.client_conn.sni = sni
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 404, (headers, sni)
        assert body(flow)["error"] == "Route not found"
        assert "the request names host 'open.example.com' but goes to 'same.example.com'" in flow.comment


def test_absolute_form_in_reverse_mode_must_agree_with_host(tctx) -> None:
    """An HTTP/1 upstream takes an absolute-form URL's host over the Host header."""
    addon, _ = tctx
    flow = make_flow(
        host="127.0.0.1", port=9, path="/", headers=[("Host", "open.example.com")], mode="reverse:http://127.0.0.1:9"
    )
    flow.request.authority = "same.example.com"
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 404


def test_route_host_in_regular_and_reverse_mode(tctx) -> None:
    """Forward mode matches where the request really goes; reverse mode the Host the client sent."""
    addon, _ = tctx
    # forward: request.host is same.example.com; the Host header (with a port) agrees
    forward = make_flow(
        peer=("127.0.0.9", 1), host="same.example.com", path="/", headers=[("Host", "Same.Example.com:80")]
    )
    addon.requestheaders(forward)
    assert forward.metadata["knoxcall"]["route"] == "same-host"
    assert forward.response is not None and forward.response.status_code == 403
    # reverse: the destination is fixed by --mode; the Host header picks the route
    reverse = make_flow(
        peer=("127.0.0.9", 1),
        host="127.0.0.1",
        port=9,
        path="/",
        headers=[("Host", "open.example.com")],
        mode="reverse:http://127.0.0.1:9",
    )
    addon.requestheaders(reverse)
    assert reverse.metadata["knoxcall"]["route"] == "open"
    assert reverse.response is None


# -- responses and the access log ---------------------------------------------------------


def test_request_id_on_forwarded_responses(tctx) -> None:
    addon, _ = tctx
    flow = make_flow()
    addon.requestheaders(flow)
    flow.response = tutils.tresp()
    flow.response.headers["X-KnoxCall-Request-Id"] = "forged-by-upstream"
    addon.responseheaders(flow)
    # ours replaces anything an upstream sent under that name
    assert flow.response.headers.get_all("x-knoxcall-request-id") == [flow.metadata["knoxcall"]["request_id"]]


def test_access_log_lines(tctx, tmp_path: Path) -> None:
    addon, context = tctx
    log = tmp_path / "logs" / "access.jsonl"
    context.configure(addon, knoxcall_access_log=str(log))
    allowed = make_flow(headers=[("x-knoxcall-key", LIVE_KEY)])
    addon.requestheaders(allowed)
    allowed.response = tutils.tresp(status_code=201)
    addon.responseheaders(allowed)
    addon.response(allowed)
    denied = make_flow(peer=("::ffff:127.0.0.9", 2, 0, 0), method="POST", path="/v1/x?y=1")
    addon.requestheaders(denied)
    addon.response(denied)
    failed = make_flow()
    addon.requestheaders(failed)
    failed.error = tflow.terr()
    addon.error(failed)
    addon.response(failed)  # a second completion does not write a second line
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert list(record) == list(ACCESS_LOG_FIELDS)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
        assert isinstance(record["latency_ms"], int | float)
    first, second, third = records
    assert first["request_id"] == allowed.metadata["knoxcall"]["request_id"]
    assert (first["decision"], first["reason"], first["status"]) == ("allowed", "client", 201)
    assert (first["method"], first["host"], first["path"]) == ("GET", "api.example.com", "/v1/users")
    assert (first["route"], first["environment"], first["client"]) == ("api", "production", "local")
    assert (first["client_ip"], first["peer_ip"], first["api_key"]) == ("127.0.0.5", "127.0.0.5", "live")
    assert first["user_agent"] == "unit-test/1"
    assert first["config_version"] == addon.current.policy.version
    assert (second["decision"], second["reason"], second["status"]) == ("denied", "ip_not_whitelisted", 403)
    assert (second["method"], second["path"], second["client_ip"]) == ("POST", "/v1/x?y=1", "127.0.0.9")
    assert second["client"] is None and second["api_key"] is None
    assert (third["decision"], third["status"]) == ("allowed", None)
    assert LIVE_KEY not in log.read_text()


def test_access_log_can_be_turned_off(tctx, tmp_path: Path) -> None:
    addon, context = tctx
    log = tmp_path / "a.jsonl"
    context.configure(addon, knoxcall_access_log=str(log))
    context.configure(addon, knoxcall_access_log="")
    flow = make_flow()
    addon.requestheaders(flow)
    addon.response(flow)
    assert log.read_text() == ""


# -- CONNECT, TCP and UDP -----------------------------------------------------------------


def test_connect_from_uncovered_peer_is_refused(tctx) -> None:
    addon, _ = tctx
    flow = make_flow(peer=("127.0.0.9", 1), method="CONNECT", host="api.example.com", port=443, path="")
    # The config has an open route and a test key, so a tunnel could carry allowed requests.
    addon.http_connect(flow)
    assert flow.response is None
    assert flow.metadata["knoxcall"]["reason"] == "open_route"


def test_connect_refused_without_open_routes(tctx, tmp_path: Path) -> None:
    addon, context = tctx
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "c.yaml").write_text(
        "environments: [{name: production}]\nclients: [{name: local, ip_address: 127.0.0.0/29}]\n"
        "routes: [{name: api}]\nassignments: {api: {production: [local]}}\n"
    )
    context.configure(addon, knoxcall_config=str(closed))
    assert not addon.current.policy.any_open_route and not addon.current.policy.any_test_key
    flow = make_flow(peer=("127.0.0.9", 1), method="CONNECT", port=443, path="")
    addon.http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert body(flow)["error"] == "IP not authorized"
    assert flow.response.headers["x-knoxcall-request-id"] == flow.metadata["knoxcall"]["request_id"]
    ok = make_flow(peer=("127.0.0.5", 1), method="CONNECT", port=443, path="")
    addon.http_connect(ok)
    assert ok.response is None


def refused_at_connect(addon: KnoxCall, flow: Any) -> bool:
    """Would mitmproxy's connect to the server be refused (server_connect hook)?"""
    data = server_hooks.ServerConnectionHookData(server=flow.server_conn, client=flow.client_conn)
    data.server.error = None
    addon.server_connect(data)
    return bool(data.server.error)


@pytest.mark.parametrize("make", [tflow.ttcpflow, tflow.tudpflow], ids=["tcp", "udp"])
def test_raw_flows_are_refused_whoever_sends_them(tctx, tmp_path: Path, make: Any) -> None:
    """Raw TCP/UDP outside the raw reverse modes could carry any request to any route:
    refused for strangers and clients alike."""
    addon, context = tctx
    log = tmp_path / "access.jsonl"
    context.configure(addon, knoxcall_access_log=str(log))
    start = addon.tcp_start if make is tflow.ttcpflow else addon.udp_start
    message = addon.tcp_message if make is tflow.ttcpflow else addon.udp_message
    message_type = type(make().messages[0])

    flows = []
    for peer in [("127.0.0.9", 1), ("::ffff:127.0.0.5", 1, 0, 0), ("127.0.3.3", 1)]:
        flow = make(messages=[])
        flow.client_conn.peername = peer
        start(flow)
        assert flow.metadata["knoxcall"]["decision"] == "denied"
        assert flow.error is not None  # killed, as mitmweb shows it
        assert flow.marked
        assert refused_at_connect(addon, flow)  # mitmproxy ignores kill() here: the connect must fail
        flow.messages.append(message_type(True, b"secret"))
        message(flow)
        assert flow.messages[-1].content == b""  # nothing is relayed, even if upstream was open
        flows.append(flow)

    # the refusal is forgotten with the client connection
    addon.client_disconnected(flows[0].client_conn)
    assert not refused_at_connect(addon, flows[0])

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["decision"], r["reason"], r["client_ip"]) for r in records] == [
        ("denied", "not_http", "127.0.0.9"),
        ("denied", "not_http", "127.0.0.5"),
        ("denied", "not_http", "127.0.3.3"),
    ]


@pytest.mark.parametrize(
    "mode", ["reverse:tcp://127.0.0.1:9", "reverse:udp://127.0.0.1:9", "reverse:dns://127.0.0.1:9"]
)
def test_raw_reverse_modes_decide_at_connect(tctx, mode: str) -> None:
    addon, _ = tctx
    stranger = tflow.tclient_conn()
    stranger.peername = ("127.0.0.9", 1)
    stranger.proxy_mode = ProxyMode.parse(mode)
    addon.client_connected(stranger)
    assert stranger.error and "ip_not_whitelisted" in stranger.error  # mitmproxy closes it at once
    known = tflow.tclient_conn()
    known.peername = ("127.0.0.5", 1)
    known.proxy_mode = ProxyMode.parse(mode)
    addon.client_connected(known)
    assert known.error is None


@pytest.mark.parametrize("mode", ["regular", "reverse:http://127.0.0.1:9", "transparent"])
def test_http_capable_modes_are_not_decided_at_connect(tctx, mode: str) -> None:
    """There, each request is decided on its own (an open route may serve anyone)."""
    addon, _ = tctx
    client = tflow.tclient_conn()
    client.peername = ("127.0.0.9", 1)
    client.proxy_mode = ProxyMode.parse(mode)
    addon.client_connected(client)
    assert client.error is None


def test_dns_requests_from_uncovered_peers_are_refused(tctx) -> None:
    addon, _ = tctx
    denied = tflow.tdnsflow()
    denied.client_conn.peername = ("127.0.0.9", 1)
    addon.dns_request(denied)
    assert denied.response is not None
    assert denied.response.response_code == dns_response_codes.REFUSED
    assert denied.metadata["knoxcall"]["reason"] == "ip_not_whitelisted"
    allowed = tflow.tdnsflow()
    allowed.client_conn.peername = ("127.0.0.5", 1)
    addon.dns_request(allowed)
    assert allowed.response is None
    assert allowed.metadata["knoxcall"]["decision"] == "allowed"


@pytest.mark.parametrize(
    ("name", "values", "status"),
    [
        ("x-knoxcall-route", ["api", "open"], 404),
        ("x-knoxcall-environment", ["staging", "production"], 404),
        ("x-knoxcall-key", [LIVE_KEY, LIVE_KEY], 401),
    ],
)
def test_repeated_control_headers_are_refused(tctx, name: str, values: list[str], status: int) -> None:
    """A header sent twice is never resolved to one of its values: it is refused as a whole."""
    addon, _ = tctx
    flow = make_flow(headers=[(name, v) for v in values])
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == status


def test_client_ip_header_setting_is_the_header_read(tctx, tmp_path: Path) -> None:
    addon, context = tctx
    folder = tmp_path / "real-ip"
    folder.mkdir()
    (folder / "c.yaml").write_text(
        "settings: {trusted_proxies: [127.0.0.50], client_ip_header: X-Real-IP}\n"
        "environments: [{name: production}]\nclients: [{name: c, ip_address: 127.0.0.0/29}]\n"
        "routes: [{name: r}]\nassignments: {r: {production: [c]}}\n"
    )
    context.configure(addon, knoxcall_config=str(folder))
    via_real_ip = make_flow(
        peer=("127.0.0.50", 1),
        headers=[("x-knoxcall-route", "r"), ("X-Real-IP", "127.0.0.5"), ("X-Forwarded-For", "127.0.0.99")],
    )
    addon.requestheaders(via_real_ip)
    assert via_real_ip.response is None
    assert via_real_ip.metadata["knoxcall"]["client_ip"] == "127.0.0.5"
    # X-Forwarded-For is not read for the decision then (but still extended for upstream)
    via_xff = make_flow(peer=("127.0.0.50", 1), headers=[("x-knoxcall-route", "r"), ("X-Forwarded-For", "127.0.0.5")])
    addon.requestheaders(via_xff)
    assert via_xff.response is not None and via_xff.response.status_code == 403
    assert via_xff.metadata["knoxcall"]["client_ip"] == "127.0.0.50"
    assert via_real_ip.request.headers["X-Forwarded-For"] == "127.0.0.99, 127.0.0.50"


def test_denied_request_whose_body_mitmproxy_streams_is_killed(tctx) -> None:
    """mitmproxy cannot both stream a request body (stream_large_bodies) and answer it."""
    addon, context = tctx
    flow = make_flow(peer=("127.0.0.9", 1), method="POST")
    flow.request.stream = True  # what mitmproxy sets before requestheaders for a large body
    addon.requestheaders(flow)
    assert flow.response is None
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    assert flow.metadata["knoxcall"]["reason"] == "ip_not_whitelisted"
    # a chunked body of unknown size may grow past the limit later: same
    if "stream_large_bodies" not in context.options:  # registered by mitmproxy's proxyserver addon
        context.options.add_option("stream_large_bodies", str | None, None, "as in mitmproxy")
    context.configure(addon, stream_large_bodies="1k")
    assert addon.streaming_bodies
    chunked = make_flow(peer=("127.0.0.9", 1), method="POST", headers=[("Transfer-Encoding", "chunked")])
    addon.requestheaders(chunked)
    assert chunked.response is None and chunked.error is not None
    h2_post = make_flow(peer=("127.0.0.9", 1), method="POST")
    h2_post.request.http_version = "HTTP/2.0"
    addon.requestheaders(h2_post)
    assert h2_post.response is None and h2_post.error is not None
    h2_get = make_flow(peer=("127.0.0.9", 1))
    h2_get.request.http_version = "HTTP/2.0"
    addon.requestheaders(h2_get)
    assert h2_get.response is not None and h2_get.response.status_code == 403
    # allowed requests stream as usual, and small denied ones are answered
    allowed = make_flow(method="POST")
    allowed.request.stream = True
    addon.requestheaders(allowed)
    assert allowed.error is None and allowed.response is None
    small = make_flow(peer=("127.0.0.9", 1), method="POST", headers=[("Content-Length", "3")])
    addon.requestheaders(small)
    assert small.response is not None and small.response.status_code == 403


def test_chunked_denial_is_answered_when_nothing_streams(tctx) -> None:
    addon, _ = tctx
    chunked = make_flow(peer=("127.0.0.9", 1), method="POST", headers=[("Transfer-Encoding", "chunked")])
    addon.requestheaders(chunked)
    assert chunked.response is not None and chunked.response.status_code == 403


def test_head_denial_has_no_body(tctx) -> None:
    """A body on a HEAD response would be read as the next response on a keep-alive connection."""
    addon, _ = tctx
    flow = make_flow(peer=("127.0.0.9", 1), method="HEAD", host="same.example.com", path="/")
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.raw_content == b""
    assert flow.response.headers["content-type"] == "application/json"
    assert flow.response.headers["x-knoxcall-request-id"] == flow.metadata["knoxcall"]["request_id"]


def test_mitmweb_filters_from_the_readme_find_decisions(tctx) -> None:
    """The README tells operators to filter with ~meta and ~comment; they must match our flows."""
    addon, _ = tctx
    denied = make_flow(peer=("127.0.0.9", 1))
    allowed = make_flow()
    untouched = make_flow()
    addon.requestheaders(denied)
    addon.requestheaders(allowed)

    def matches(expression: str) -> list[bool]:
        match = flowfilter.parse(expression)
        return [bool(match(f)) for f in (denied, allowed, untouched)]

    assert matches("~meta knoxcall") == [True, True, False]
    assert matches("~comment ip_not_whitelisted") == [True, False, False]
    assert matches("~meta ip_not_whitelisted") == [True, False, False]
    assert matches("~marked") == [True, False, False]
