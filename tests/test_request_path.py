"""The per-request fast paths of the proxy give exactly what the plain code gives.

They exist for speed only (scripts/bench, end to end): reading a request in one pass
over its header fields, building RequestFacts without the dataclass __init__, the
peer address cache, and making no log record that no handler would take. Each is
compared with the plain way (the Headers API, the constructor, ``parse_ip``) or checked
for what a user sees (every decision line reaches every handler that takes its level).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.http import Headers, HTTPFlow
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils

from knoxcall_addon import decision, eventlog, gate
from knoxcall_addon.canonical import authority_host
from knoxcall_addon.decision import ENVIRONMENT_HEADER, KEY_HEADER, ROUTE_HEADER, RequestFacts, request_facts_of
from knoxcall_addon.gate import read_request, requested_host
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.proxy_addon import KnoxCall
from tests.test_addon_unit import config_dir, make_flow, tctx  # noqa: F401  (fixtures)


def line_of(flow: HTTPFlow) -> str:
    """The event log line of a decided flow: ``knoxcall: `` and ``denied `` before a
    denial's comment, ``knoxcall: `` before an allowed one's."""
    if flow.comment.startswith("allowed "):
        return f"knoxcall: {flow.comment}"
    return f"knoxcall: denied {flow.comment}"


# -- reading the request in one pass ----------------------------------------------------


def reference(flow: HTTPFlow, policy: Any) -> tuple[RequestFacts, str, str | None]:
    """The former code: a Headers lookup per name, host_header and the constructor."""
    request = flow.request
    mode = flow.client_conn.proxy_mode
    caller_host = requested_host(request)
    host_header = request.host_header
    others: list[str] = []
    http2 = request.is_http2 or request.is_http3
    if http2 and request.authority and "host" in request.headers:
        others.append(request.headers["host"])
    if isinstance(mode, mode_specs.ReverseMode):
        host = (authority_host(host_header) or "") if host_header else request.host
        if request.authority and not http2:
            others.append(request.authority)
    else:
        host = request.host
        if isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode):
            if host_header:
                others.append(host_header)
            if flow.client_conn.tls and flow.client_conn.sni:
                others.append(flow.client_conn.sni)
    headers = request.headers
    facts = RequestFacts(
        peer=gate.peer_host(flow),
        method=request.method,
        host=host,
        path=request.path,
        route=headers.get(ROUTE_HEADER),
        environment=headers.get(ENVIRONMENT_HEADER),
        api_key=headers.get(KEY_HEADER),
        forwarded_for=tuple(headers.get_all(policy.settings.client_ip_header)),
        other_hosts=tuple(
            authority_host(name) or name for name in others if not gate._same_host(name, host)
        ),
        bad_authority=host_header if host_header and authority_host(host_header) is None else None,
    )
    return facts, caller_host, headers.get("user-agent")


HEADER_POOL: list[tuple[bytes, bytes]] = [
    (b"Host", b"api.example.com"),
    (b"host", b"API.Example.com:8080"),
    (b"HOST", b"[::1]:9000"),
    (b"x-knoxcall-route", b"api"),
    (b"X-KnoxCall-Route", b"second"),
    (b"x-knoxcall-environment", b"staging"),
    (b"X-KNOXCALL-KEY", b"kc_test_x"),
    (b"x-knoxcall-other", b"z"),
    (b"X-Forwarded-For", b"203.0.113.9, 127.0.0.50"),
    (b"x-forwarded-for", b"198.51.100.1"),
    (b"X-Real-IP", b"192.0.2.1"),
    (b"user-agent", b"ua/1"),
    (b"User-Agent", b"ua/2 \xc3\xa9"),
    (b"accept", b"*/*"),
    (b"x-\xc3\xa9", b"non-ascii name"),
    (b"x-knoxcall-\xc3\xa9", b"\xff"),
]
MODES = ["regular", "reverse:http://127.0.0.1:9", "upstream:http://127.0.0.1:9", "transparent"]


def random_flow(rng: random.Random) -> HTTPFlow:
    request = tutils.treq(
        host=rng.choice(["api.example.com", "other.example", "127.0.0.1"]),
        port=rng.choice([80, 443, 8080]),
        path=rng.choice([b"/", b"/v1/users?x=1", b"/a/../b"]),
        method=rng.choice([b"GET", b"POST", b"HEAD"]),
        headers=Headers(rng.sample(HEADER_POOL, rng.randint(0, 7))),
        content=b"",
    )
    request.http_version = rng.choice(["HTTP/1.1", "HTTP/2.0", "HTTP/3"])
    request.authority = rng.choice(["", "", "api.example.com", "other.example:8443", "[::1]:443"])
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = rng.choice([("127.0.0.5", 1), ("::ffff:127.0.0.9", 2, 0, 0), ("::1", 3, 0, 0)])
    flow.client_conn.proxy_mode = ProxyMode.parse(rng.choice(MODES))
    if rng.random() < 0.3:
        flow.client_conn.tls = True
        flow.client_conn.sni = rng.choice(["api.example.com", "evil.example"])
    return flow


@pytest.mark.parametrize("client_ip_header", ["X-Forwarded-For", "x-real-ip", "User-Agent", "host"])
def test_read_request_agrees_with_the_headers_api(client_ip_header: str) -> None:
    policy = SimpleNamespace(settings=SimpleNamespace(client_ip_header=client_ip_header))
    rng = random.Random(client_ip_header)
    for _ in range(600):
        flow = random_flow(rng)
        expected = reference(flow, policy)
        got = read_request(flow, policy)  # type: ignore[arg-type]
        assert got == expected, (flow.request.headers.fields, flow.request.http_version)
        facts = got[0]
        assert repr(facts) == repr(expected[0])
        assert read_request(flow, policy, flow.request.method, flow.request.path) == expected  # type: ignore[arg-type]
        assert gate.request_facts(flow, policy) == expected[0]  # type: ignore[arg-type]


def test_request_facts_of_builds_the_same_object_as_the_constructor() -> None:
    values = {
        "peer": "::1",
        "method": "POST",
        "host": "api.example.com",
        "path": "/v1",
        "route": "api",
        "environment": None,
        "api_key": "secret",
        "forwarded_for": ("203.0.113.9",),
        "other_hosts": ("other.example",),
    }
    built = request_facts_of(**values)
    expected = RequestFacts(**values)
    assert built == expected
    assert repr(built) == repr(expected)
    assert list(vars(built).items()) == list(vars(expected).items())
    assert hash(built) == hash(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.peer = "127.0.0.1"  # type: ignore[misc]


def test_peer_cache_gives_what_parse_ip_gives(monkeypatch) -> None:
    monkeypatch.setattr(decision, "_peers", {})
    monkeypatch.setattr(decision, "_PEERS_KEPT", 5)
    peers = [
        "127.0.0.1",
        "::ffff:10.0.0.1",
        "fe80::1%eth0",
        "[::1]:80",
        "1.2.3.4:5",
        "",
        "not an ip",
        "::1",
        "10.0.0.1",
    ]
    for _ in range(3):  # the second and third rounds are answered (partly) from the cache
        for peer in peers:
            address = parse_ip(peer)
            assert decision._parsed_peer(peer) == (address, str(address) if address is not None else peer or None)
            assert len(decision._peers) <= 5


def former_summary(d: decision.Decision) -> str:
    parts = [
        f"knoxcall: {d.decision} {d.reason} {d.client_ip or '-'}",
        f"route={d.route or '-'}",
        f"env={d.environment or '-'}",
    ]
    if d.client:
        parts.append(f"client={d.client}")
    if d.api_key:
        parts.append(f"key={d.api_key}")
    if d.peer_ip != d.client_ip:
        parts.append(f"peer={d.peer_ip or '-'}")
    if d.detail:
        parts.append(f"({d.detail})")
    return " ".join(parts)


def test_summary_line_unchanged() -> None:
    options = [None, "", "x"]
    for allowed in (True, False):
        for client_ip, peer_ip in [
            ("127.0.0.1", "127.0.0.1"),
            ("203.0.113.9", "127.0.0.50"),
            (None, None),
            (None, "::1"),
        ]:
            for route in options:
                for client in options:
                    for api_key in options:
                        for detail in ["", "why"]:
                            d = decision.Decision(
                                allowed, "client" if allowed else "ip_not_whitelisted", 0 if allowed else 403,
                                client_ip, peer_ip, route=route, environment=route, client=client, api_key=api_key,
                                detail=detail,
                            )  # fmt: skip
                            assert d.summary() == former_summary(d)


# -- decision lines: made only when a handler takes them ----------------------------------


@pytest.fixture
def own_handlers(tctx) -> Iterator[tuple[KnoxCall, list[logging.LogRecord]]]:  # noqa: F811
    """The "knoxcall" logger cut off from the root (pytest's handlers); records made for it counted."""
    addon, _ = tctx
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.name == "knoxcall":
            made.append(record)
        return record

    knoxcall_logger = logging.getLogger("knoxcall")
    level, propagate = knoxcall_logger.level, knoxcall_logger.propagate
    knoxcall_logger.setLevel(logging.DEBUG)
    knoxcall_logger.propagate = False
    logging.setLogRecordFactory(counting)
    try:
        yield addon, made
    finally:
        logging.setLogRecordFactory(factory)
        knoxcall_logger.setLevel(level)
        knoxcall_logger.propagate = propagate
        for handler in list(knoxcall_logger.handlers):
            knoxcall_logger.removeHandler(handler)
        for log_filter in list(knoxcall_logger.filters):
            knoxcall_logger.removeFilter(log_filter)


class Keep(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def cut_off() -> logging.Logger:
    """pytest hangs its capture handlers on non-propagating loggers when a test starts: off with them."""
    knoxcall_logger = logging.getLogger("knoxcall")
    for handler in list(knoxcall_logger.handlers):
        knoxcall_logger.removeHandler(handler)
    return knoxcall_logger


def test_allowed_line_made_only_for_a_handler_that_takes_info(own_handlers) -> None:
    addon, made = own_handlers
    knoxcall_logger = cut_off()
    terminal = Keep(logging.WARNING)  # as mitmdump's terminal with termlog_verbosity=warn
    legacy = Keep(logging.NOTSET)  # as mitmproxy's add_log events, which drop decision lines
    legacy.addFilter(eventlog.SKIP_LEGACY)
    knoxcall_logger.addHandler(terminal)
    knoxcall_logger.addHandler(legacy)

    allowed = make_flow()
    addon.requestheaders(allowed)
    assert allowed.response is None and allowed.metadata["knoxcall"]["decision"] == "allowed"
    assert allowed.comment.startswith("allowed client 127.0.0.5")  # the line is still made for the comment
    assert made == [] and terminal.records == [] and legacy.records == []

    denied = make_flow(peer=("127.0.0.99", 1))
    addon.requestheaders(denied)
    assert [line_of(denied) for r in terminal.records] == [r.getMessage() for r in terminal.records]
    assert len(terminal.records) == 1
    assert terminal.records[0].levelno == logging.WARNING
    assert legacy.records == []

    terminal.setLevel(logging.INFO)  # e.g. :set termlog_verbosity=info, while running
    again = make_flow()
    addon.requestheaders(again)
    assert terminal.records[-1].getMessage() == line_of(again)
    assert terminal.records[-1].levelno == logging.INFO
    assert legacy.records == []


def test_allowed_line_reaches_a_handler_up_the_tree(own_handlers) -> None:
    addon, _ = own_handlers
    knoxcall_logger = cut_off()
    knoxcall_logger.addHandler(Keep(logging.WARNING))  # takes no INFO line, but the root's handler does
    knoxcall_logger.propagate = True
    root_handler = Keep(logging.INFO)
    root = logging.getLogger()
    root.addHandler(root_handler)
    try:
        flow = make_flow()
        addon.requestheaders(flow)
    finally:
        root.removeHandler(root_handler)
    assert [r.getMessage() for r in root_handler.records] == [line_of(flow)]


def test_allowed_line_made_for_a_logger_filter_or_logging_last_resort(own_handlers) -> None:
    addon, made = own_handlers
    cut_off()
    addon.requestheaders(make_flow())  # no handler anywhere: made, as logging decides what then happens
    assert len(made) == 1
    seen: list[str] = []
    logging.getLogger("knoxcall").addFilter(lambda record: seen.append(record.getMessage()) or False)
    logging.getLogger("knoxcall").addHandler(Keep(logging.ERROR))
    flow = make_flow()
    addon.requestheaders(flow)
    assert seen == [line_of(flow)]


# -- the request id header ----------------------------------------------------------------


def test_request_id_header_appended_after_the_upstream_headers(tctx) -> None:  # noqa: F811
    addon, _ = tctx
    flow = make_flow()
    addon.requestheaders(flow)
    flow.response = tutils.tresp()
    before = flow.response.headers.fields
    addon.responseheaders(flow)
    request_id = flow.metadata["knoxcall"]["request_id"]
    assert flow.response.headers.fields == (*before, (b"x-knoxcall-request-id", request_id.encode()))
    assert flow.response.headers["X-KnoxCall-Request-Id"] == request_id
