"""The HTTP request path's mitmproxy side: read a request once, prepare an allowed one
for upstream, answer a refused one. The decision itself is `decision.decide` (pure).
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs

from knoxcall_addon.canonical import authority_host
from knoxcall_addon.decision import (
    ENVIRONMENT_HEADER,
    HEADER_PREFIX,
    KEY_HEADER,
    REQUEST_ID_HEADER,
    ROUTE_HEADER,
    Decision,
    RequestFacts,
    decide_values,
    request_facts_of,
)
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.policy import Policy
from knoxcall_addon.ratelimit import HEADER_NAMES as RATE_LIMIT_HEADER_NAMES
from knoxcall_addon.replay import remember
from knoxcall_addon.signing import SIGNED_HEADERS

_PREFIX_BYTES = HEADER_PREFIX.encode()
_XFF_BYTES = b"x-forwarded-for"


def internal_error_response(flow: http.HTTPFlow) -> http.Response:
    """The simplest possible denial, for when building the normal one failed."""
    body = b"" if flow.request.method.upper() == "HEAD" else b'{"error": "Internal error", "status": 500}'
    return http.Response.make(500, body, {"Content-Type": "application/json"})



def body_size_unknown(request: http.Request) -> bool:
    """May this request carry a body whose size mitmproxy learns only while reading it?"""
    if "transfer-encoding" in request.headers:
        return True
    # HTTP/2 and 3 bodies need no content-length; methods without a body usually end the
    # stream with the headers (which this hook cannot see).
    return (
        (request.is_http2 or request.is_http3)
        and "content-length" not in request.headers
        and request.method not in ("GET", "HEAD", "OPTIONS", "DELETE", "TRACE")
    )


_REQUEST_ID_PREFIX = os.urandom(8).hex()
# n -> n * odd + offset (mod 2**64) is a bijection: ids stay unique, but do not show a
# caller how many requests the proxy has served.
_REQUEST_ID_FACTOR = int.from_bytes(os.urandom(8)) | 1
_REQUEST_ID_OFFSET = int.from_bytes(os.urandom(8))
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """32 hex digits, unique per request: a random per-process half and a scrambled counter.

    Cheaper than uuid4 (no system call per request); ids from different proxies or
    restarts differ by their random half.
    """
    n = next(_request_counter) * _REQUEST_ID_FACTOR + _REQUEST_ID_OFFSET
    return _REQUEST_ID_PREFIX + (n & 0xFFFFFFFFFFFFFFFF).to_bytes(8).hex()  # f"{...:016x}", cheaper


def peer_host(flow: Any) -> str:
    """The TCP peer's host as mitmproxy reports it (peername may be a 4-tuple)."""
    peername = flow.client_conn.peername
    return str(peername[0]) if peername else ""


def requested_host(request: http.Request) -> str:
    """``request.pretty_host`` without its cost: the Host header's (or authority's) host."""
    authority = request.host_header
    return _authority_host(authority) if authority else request.host


def request_facts(flow: http.HTTPFlow, policy: Policy) -> RequestFacts:
    """Read what the decision needs from the flow; the header names come from the policy."""
    return read_request(flow, policy)[0]


def read_request(
    flow: http.HTTPFlow, policy: Policy, method: str | None = None, path: str | None = None
) -> tuple[RequestFacts, str, str | None]:
    """(the decision's facts, the host the caller asked for, its User-Agent), in one pass over the headers.

    The caller host is `requested_host`'s; ``method`` and ``path`` are the request's, when
    the caller has read them already.
    """
    return _read(flow, policy, method, path, False)  # type: ignore[return-value]


def decide_request(
    flow: http.HTTPFlow, policy: Policy, method: str, path: str
) -> tuple[Decision, str, str | None]:
    """``decide(policy, facts)`` and the rest of `read_request`'s answer: what the proxy does
    per request, without making the facts when the decision is remembered (decide_values)."""
    return _read(flow, policy, method, path, True)  # type: ignore[return-value]


def _read(
    flow: http.HTTPFlow, policy: Policy, method: str | None, path: str | None, decided: bool
) -> tuple[RequestFacts | Decision, str, str | None]:
    """(the facts, or with ``decided`` the decision on them, the caller host, the User-Agent)."""
    request = flow.request
    # One pass over the raw fields instead of a Headers lookup per name (each a full scan).
    # Same values as headers.get (repeated headers folded with ", ") and get_all.
    # (lists made only for the names present: fewer objects per request for the GC)
    header = policy.settings.client_ip_header
    forwarded_name = _FORWARDED_NAMES.get(header)
    if forwarded_name is None:
        forwarded_name = header.lower().encode("utf-8", "surrogateescape")
        if len(_FORWARDED_NAMES) < 64:
            _FORWARDED_NAMES[header] = forwarded_name
    forwarded: list[str] | None = None
    found: dict[bytes, list[bytes]] | None = None  # the values of the _WANTED names present
    for name, value in request.headers.fields:
        lower = name.lower()
        if lower == forwarded_name:
            if forwarded is None:
                forwarded = []
            forwarded.append(value.decode("utf-8", "surrogateescape"))
        if lower in _WANTED:
            if found is None:
                found = {lower: [value]}
            elif lower in found:
                found[lower].append(value)
            else:
                found[lower] = [value]
    if found is None:
        host_fields = agents = route = environment = api_key = None
    else:
        host_fields = found.get(b"host")
        agents = found.get(b"user-agent")
        route_values = found.get(_ROUTE_BYTES)
        if route_values is not None and len(route_values) == 1:  # _folded inline: the rule
            route = route_values[0].decode("utf-8", "surrogateescape")
        else:
            route = _folded(route_values)
        environment = _folded(found[_ENVIRONMENT_BYTES]) if _ENVIRONMENT_BYTES in found else None
        api_key = _folded(found[_KEY_BYTES]) if _KEY_BYTES in found else None
    version = request.data.http_version
    http2 = version == b"HTTP/2.0" or version == b"HTTP/3"  # request.is_http2 or request.is_http3
    # request.host_header, from the fields read above (_folded inline: one Host field is the rule)
    if host_fields is not None and len(host_fields) == 1:
        host_text: str | None = host_fields[0].decode("utf-8", "surrogateescape")
    else:
        host_text = _folded(host_fields)
    host_header = (request.authority or host_text) if http2 else host_text
    if host_header:
        known = _host_headers.get(host_header)
        if known is None:
            known = _host_header_hosts(host_header)
        canonical, caller_host = known
        # Exactly host[:port], or the request is refused (decide() reads bad_authority first).
        bad_authority = None if canonical is not None else host_header
    else:
        canonical = bad_authority = None
        caller_host = request.host
    client = flow.client_conn
    mode = client.proxy_mode
    others: list[str] | None = None
    if http2 and host_fields and request.authority:
        others = [host_text or ""]  # :authority and Host: one host, or refused
    if type(mode) is _ReverseMode or isinstance(mode, _ReverseMode):
        # In reverse mode the destination is fixed by the proxy or the route, so the
        # Host the client asked for is what selects the route.
        host = (canonical or "") if host_header else request.host
        if not http2 and request.authority:
            # HTTP/1 absolute-form: an upstream takes the URL's host over Host.
            others = [*(others or ()), request.authority]
    else:
        # Elsewhere the request goes where request.host says: match that, never a
        # Host header that could name another (open) route.
        host = request.host
        if isinstance(mode, _REGULAR_OR_UPSTREAM):
            # The client chose request.host (URL or CONNECT); the Host header and the TLS
            # SNI it sends on are what a virtual-hosting upstream serves: they must agree.
            others = others or []
            if host_header:
                others.append(host_header)
            if client.tls and client.sni:
                others.append(client.sni)
    peername = client.peername
    peer = peername[0] if peername else ""
    if type(peer) is not str:  # peer_host(flow): str() of what the socket gives
        peer = str(peer)
    if agents is None:
        user_agent = None
    elif len(agents) == 1:
        user_agent = agents[0].decode("utf-8", "surrogateescape")
    else:
        user_agent = _folded(agents)
    make = partial(decide_values, policy) if decided else request_facts_of
    facts_or_decision = make(
        peer,
        request.method if method is None else method,
        host,
        request.path if path is None else path,
        route,
        environment,
        api_key,
        tuple(forwarded) if forwarded else (),
        tuple(_other_host(name) for name in others if not _same_host(name, host)) if others else (),
        bad_authority,
    )
    return facts_or_decision, caller_host, user_agent


def _host_header_hosts(host_header: str) -> tuple[str | None, str]:
    """(authority_host, _authority_host) of a Host header or authority: the canonical host
    (None: not exactly host[:port]) and the caller host. Remembered: both are pure, and a
    proxy sees the same few Host headers again and again."""
    if "[" not in host_header and host_header.count(":") <= 1:  # _authority_host's common case
        caller_host = host_header.partition(":")[0]
    else:
        caller_host = _authority_host(host_header)
    hosts = (authority_host(host_header), caller_host)
    if len(_host_headers) >= _HOST_HEADERS_KEPT:
        _host_headers.clear()
    _host_headers[host_header] = hosts
    return hosts


_host_headers: dict[str, tuple[str | None, str]] = {}
_HOST_HEADERS_KEPT = 4096
_FORWARDED_NAMES: dict[str, bytes] = {}  # client_ip_header -> its lower-case bytes
_WANTED = frozenset({b"host", b"user-agent", ROUTE_HEADER.encode(), ENVIRONMENT_HEADER.encode(), KEY_HEADER.encode()})
_LIMIT_NAMES = frozenset(name.lower().encode() for name in RATE_LIMIT_HEADER_NAMES)
_ReverseMode = mode_specs.ReverseMode
_REGULAR_OR_UPSTREAM = (mode_specs.RegularMode, mode_specs.UpstreamMode)
_ROUTE_BYTES = ROUTE_HEADER.encode()
REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_ENVIRONMENT_BYTES = ENVIRONMENT_HEADER.encode()
_KEY_BYTES = KEY_HEADER.encode()


# id(decision) -> (decision, the metadata of a request it decided, the request's own values None)
_meta_templates: dict[int, tuple[Decision, dict[str, Any]]] = {}
_TEMPLATES_KEPT = 1024


def request_meta(
    decision: Decision,
    request_id: str,
    method: str,
    host: str,
    path: str,
    user_agent: str | None,
    rate_limit: dict[str, Any] | None,
) -> dict[str, Any]:
    """The flow metadata (and access log record) of a decided HTTP request::

        {"request_id": ..., "method": ..., "host": ..., "path": ..., "user_agent": ...,
         **decision.fields(), "rate_limit": ...}

    copied from a template made once per decision object (decide() hands out remembered
    decisions again and again): a dict copy and six values instead of two new dicts.
    """
    known = _meta_templates.get(id(decision))
    if known is not None and known[0] is decision:
        template = known[1]
    else:
        template = {"request_id": None, "method": None, "host": None, "path": None, "user_agent": None,
                    **decision.fields(), "rate_limit": None}  # fmt: skip
        if len(_meta_templates) >= _TEMPLATES_KEPT:
            _meta_templates.clear()
        _meta_templates[id(decision)] = (decision, template)
    meta = template.copy()
    meta["request_id"] = request_id
    meta["method"] = method
    meta["host"] = host
    meta["path"] = path
    meta["user_agent"] = user_agent
    meta["rate_limit"] = rate_limit
    return meta


def add_our_headers(headers: http.Headers, request_id: str, rate_limit: dict[str, Any] | None) -> None:
    """Append our headers to a response's, in one pass over the upstream's: the X-RateLimit-*
    ones of ``rate_limit`` (none when the upstream sent any of them: ratelimit.header_fields)
    and x-knoxcall-request-id, which replaces one the upstream sent where it is."""
    fields = headers.fields
    if type(fields) is not tuple:  # another addon may have set a list
        fields = tuple(fields)
    # tuple + tuple: one copy; (*fields, ...) makes a list first (twice the instructions)
    if rate_limit is None:
        for name, _ in fields:
            if name.lower() == REQUEST_ID_BYTES:
                headers[REQUEST_ID_HEADER] = request_id
                return
        headers.fields = fields + ((REQUEST_ID_BYTES, request_id.encode()),)  # noqa: RUF005
        return
    has_id = has_limits = False
    for name, _ in fields:
        lower = name.lower()
        if lower == REQUEST_ID_BYTES:
            has_id = True
        elif lower in _LIMIT_NAMES:
            has_limits = True
    if not has_limits:
        digits = _DIGITS
        limit, remaining, reset = rate_limit["limit"], rate_limit["remaining"], rate_limit["reset"]
        fields = fields + ((b"X-RateLimit-Limit", digits.get(limit) or _digits(limit)),  # noqa: RUF005
                           (b"X-RateLimit-Remaining", digits.get(remaining) or _digits(remaining)),
                           (b"X-RateLimit-Reset", digits.get(reset) or _digits(reset)))  # fmt: skip
    if has_id:
        headers.fields = fields
        headers[REQUEST_ID_HEADER] = request_id  # where the upstream's is
    else:
        headers.fields = fields + ((REQUEST_ID_BYTES, request_id.encode()),)  # noqa: RUF005


def _digits(number: int) -> bytes:
    """``str(number).encode()``, remembered: a limit's size, a reset time (for a second) and
    the tokens left repeat from one response to the next."""
    text = str(number).encode()
    if len(_DIGITS) >= _DIGITS_KEPT:
        _DIGITS.clear()
    _DIGITS[number] = text
    return text


_DIGITS: dict[int, bytes] = {}
_DIGITS_KEPT = 4096


def _folded(values: list[bytes] | None) -> str | None:
    """What ``Headers.get`` returns for these raw values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0].decode("utf-8", "surrogateescape")
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def _same_host(authority: str, host: str) -> bool:
    """The common case, cheaply: ``authority`` is ``host`` or ``host:port``."""
    authority = authority.lower()
    host = host.lower()
    return authority == host or (authority.startswith(host) and authority[len(host) : len(host) + 1] == ":")


def _other_host(authority: str) -> str:
    """Another name of the destination, canonical; as sent when it is no host[:port] (so it differs)."""
    return authority_host(authority) or authority


def _authority_host(authority: str) -> str:
    """The host of a Host header or authority (port removed); as it is when unparsable."""
    if "[" not in authority and authority.count(":") <= 1:
        return authority.partition(":")[0]  # the common case: host or host:port
    try:
        return url.parse_authority(authority, check=False)[0]
    except ValueError:
        return authority


# Headers that say what a proxy saw (the client's host, scheme, port, address): believed
# from trusted proxies only; from anyone else they are removed, so that an upstream never
# takes a caller's words for KnoxCall's. X-Forwarded-For is extended instead (see forward).
PROXY_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-real-ip",
    }
)


def forward(flow: http.HTTPFlow, decision: Decision, policy: Policy | None = None) -> None:
    """Prepare an allowed request for upstream: strip our headers and, from untrusted peers,
    the proxy headers; extend XFF; re-target."""
    request = flow.request
    # One pass over the raw fields, with the result of the former (slower) steps:
    #   del headers[x-knoxcall-*]; headers["X-Forwarded-For"] = ", ".join([*get_all(XFF), peer])
    # i.e. our headers dropped; the first X-Forwarded-For (its name's case kept) extended
    # in place and the others folded into it; else one appended at the end.
    peer = decision.peer_ip or peer_host(flow)
    fields: list[tuple[bytes, bytes]] = []
    forwarded: list[bytes] | None = None
    forwarded_at = -1
    forwarded_name = b"X-Forwarded-For"
    trusted: bool | None = None  # is the peer a trusted proxy? looked up only when it matters
    for field in request.headers.fields:
        name = field[0]
        lower = name.lower()
        if lower.startswith(_PREFIX_BYTES) if name.isascii() else _is_ours(name):
            continue
        if lower in PROXY_HEADERS:
            if trusted is None:
                address = parse_ip(peer)
                trusted = policy is not None and address is not None and address in policy.trusted_proxies
            if not trusted:
                continue
        if lower == _XFF_BYTES:
            if forwarded is None:
                forwarded_at, forwarded_name = len(fields), name
                fields.append((name, b""))
                forwarded = []
            forwarded.append(field[1])
            continue
        fields.append(field)
    if forwarded is None:
        fields.append((forwarded_name, peer.encode("utf-8", "surrogateescape")))
    else:
        fields[forwarded_at] = (forwarded_name, b", ".join([*forwarded, peer.encode("utf-8", "surrogateescape")]))
    request.headers.fields = tuple(fields)
    remember(flow, decision.route, decision.environment, decision.target_url is not None)
    if decision.target_url:
        target = urlsplit(decision.target_url)
        request.scheme = target.scheme
        request.host = target.hostname or ""
        request.port = target.port or (443 if target.scheme == "https" else 80)
        base = target.path.rstrip("/")
        if base:
            request.path = base + (request.path if request.path.startswith("/") else "/" + request.path)
        request.host_header = _authority(target.scheme, request.host, request.port)


def strip_signature_headers(flow: http.HTTPFlow) -> None:
    """X-Signature, X-Timestamp and X-Nonce go no further than the proxy that checked them."""
    request = flow.request
    request.headers.fields = tuple(f for f in request.headers.fields if f[0].lower() not in SIGNED_HEADERS)


def _is_ours(name: bytes) -> bool:
    """An x-knoxcall-* header name (compared as the str lower() the old code used)."""
    if name.isascii():
        return name[: len(_PREFIX_BYTES)].lower() == _PREFIX_BYTES
    return name.decode("utf-8", "surrogateescape").lower().startswith(HEADER_PREFIX)


def _authority(scheme: str, host: str, port: int) -> str:
    default = 443 if scheme == "https" else 80
    host_text = f"[{host}]" if ":" in host else host
    return host_text if port == default else f"{host_text}:{port}"


def denial_response(decision: Decision, request_id: str, method: str = "GET") -> http.Response:
    body = {**decision.body, "request_id": request_id}
    headers = {
        "Content-Type": "application/json",
        REQUEST_ID_HEADER: request_id,
        "Cache-Control": "no-store",
    }
    if decision.allow_methods:
        headers["Allow"] = ", ".join(decision.allow_methods)
    if decision.status == 429:  # rate limited
        headers["Retry-After"] = str(decision.body.get("retry_after", 1))
    # A response to HEAD has no body, and mitmproxy sends whatever content a response made
    # by an addon has: the body's bytes would be read as the start of the next response
    # on a keep-alive connection.
    content = b"" if method.upper() == "HEAD" else json.dumps(body).encode()
    return http.Response.make(decision.status, content, headers)
