"""The HTTP request path's mitmproxy side: read a request once, prepare an allowed one
for upstream, answer a refused one. The decision itself is `decision.decide` (pure).
"""

from __future__ import annotations

import itertools
import json
import os
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
    request_facts_of,
)
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.policy import Policy
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
    return f"{_REQUEST_ID_PREFIX}{n & 0xFFFFFFFFFFFFFFFF:016x}"


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
    request = flow.request
    # One pass over the raw fields instead of a Headers lookup per name (each a full scan).
    # Same values as headers.get (repeated headers folded with ", ") and get_all.
    # (lists made only for the names present: fewer objects per request for the GC)
    forwarded_name = policy.settings.client_ip_header.lower().encode("utf-8", "surrogateescape")
    ours: dict[bytes, list[bytes]] | None = None
    forwarded: list[str] | None = None
    host_fields: list[bytes] | None = None
    agents: list[bytes] | None = None
    for name, value in request.headers.fields:
        lower = name.lower()
        if lower == forwarded_name:
            if forwarded is None:
                forwarded = []
            forwarded.append(value.decode("utf-8", "surrogateescape"))
        if lower.startswith(_PREFIX_BYTES):
            if ours is None:
                ours = {}
            if lower in ours:
                ours[lower].append(value)
            else:
                ours[lower] = [value]
        elif lower == b"host":
            if host_fields is None:
                host_fields = []
            host_fields.append(value)
        elif lower == b"user-agent":
            if agents is None:
                agents = []
            agents.append(value)
    if ours is None:
        ours = _NONE_OF_OURS
    http2 = request.is_http2 or request.is_http3
    # request.host_header, from the fields read above
    host_header = (request.authority or _folded(host_fields)) if http2 else _folded(host_fields)
    caller_host = _authority_host(host_header) if host_header else request.host
    # Exactly host[:port], or the request is refused (decide() reads bad_authority first).
    bad_authority = host_header if host_header and authority_host(host_header) is None else None
    mode = flow.client_conn.proxy_mode
    others: list[str] = []
    if http2 and request.authority and host_fields:
        others.append(_folded(host_fields) or "")  # :authority and Host: one host, or refused
    if isinstance(mode, mode_specs.ReverseMode):
        # In reverse mode the destination is fixed by the proxy or the route, so the
        # Host the client asked for is what selects the route.
        host = (authority_host(host_header) or "") if host_header else request.host
        if not http2 and request.authority:
            # HTTP/1 absolute-form: an upstream takes the URL's host over Host.
            others.append(request.authority)
    else:
        # Elsewhere the request goes where request.host says: match that, never a
        # Host header that could name another (open) route.
        host = request.host
        if isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode):
            # The client chose request.host (URL or CONNECT); the Host header and the TLS
            # SNI it sends on are what a virtual-hosting upstream serves: they must agree.
            if host_header:
                others.append(host_header)
            if flow.client_conn.tls and flow.client_conn.sni:
                others.append(flow.client_conn.sni)
    facts = request_facts_of(
        peer=peer_host(flow),
        method=request.method if method is None else method,
        host=host,
        path=request.path if path is None else path,
        route=_folded(ours.get(_ROUTE_BYTES)),
        environment=_folded(ours.get(_ENVIRONMENT_BYTES)),
        api_key=_folded(ours.get(_KEY_BYTES)),
        forwarded_for=tuple(forwarded) if forwarded else (),
        other_hosts=tuple(_other_host(name) for name in others if not _same_host(name, host)) if others else (),
        bad_authority=bad_authority,
    )
    return facts, caller_host, _folded(agents)


_ROUTE_BYTES = ROUTE_HEADER.encode()
_NONE_OF_OURS: dict[bytes, list[bytes]] = {}  # read only
REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_ENVIRONMENT_BYTES = ENVIRONMENT_HEADER.encode()
_KEY_BYTES = KEY_HEADER.encode()


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
    forwarded: list[bytes] = []
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
            if forwarded_at < 0:
                forwarded_at, forwarded_name = len(fields), name
                fields.append((name, b""))
            forwarded.append(field[1])
            continue
        fields.append(field)
    joined = b", ".join([*forwarded, peer.encode("utf-8", "surrogateescape")])
    if forwarded_at < 0:
        fields.append((forwarded_name, joined))
    else:
        fields[forwarded_at] = (forwarded_name, joined)
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
