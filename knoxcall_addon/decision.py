"""Decide one request against a compiled Policy: the single decision path of the project.

Pure: takes the facts of a request (what mitmproxy, the CLI or a test saw), returns a
Decision that says allow or deny, why, and what to answer. No I/O, no mitmproxy.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field, fields
from typing import Any

from knoxcall_addon.canonical import (
    MAX_TARGET_LENGTH,
    PLAIN_PATH_CHARS,
    canonical_host,
    method_problem,
    path_problem,
    printable,
)
from knoxcall_addon.ipmatch import parse_forwarded_entry, parse_ip
from knoxcall_addon.model import ApiKey, IPAddress
from knoxcall_addon.policy import Policy, normalize_path

ROUTE_HEADER = "x-knoxcall-route"
ENVIRONMENT_HEADER = "x-knoxcall-environment"
KEY_HEADER = "x-knoxcall-key"
REQUEST_ID_HEADER = "x-knoxcall-request-id"
HEADER_PREFIX = "x-knoxcall-"

ALLOWED_REASONS = ("client", "test_key", "open_route", "unmatched_allowed")
DENIED_REASONS = (
    "path_not_canonical",
    "uri_too_long",
    "host_invalid",
    "method_invalid",
    "ip_not_whitelisted",
    "client_not_assigned",
    "client_disabled",
    "route_not_found",
    "environment_not_found",
    "method_not_allowed",
    "invalid_api_key",
    "api_key_required",
    "test_key_not_allowed",
    "not_http",
    "internal_error",
)


@dataclass(frozen=True)
class RequestFacts:
    """What the decision needs to know about a request, and nothing else."""

    peer: str  # the TCP peer's host, as the socket reports it
    method: str = "GET"
    host: str = ""  # the host used for route matching
    path: str = "/"
    route: str | None = None  # x-knoxcall-route
    environment: str | None = None  # x-knoxcall-environment
    api_key: str | None = None  # x-knoxcall-key, the secret itself
    forwarded_for: tuple[str, ...] = ()  # values of settings.client_ip_header
    api_key_name: str | None = None  # a key named in the config, for `knoxcall explain` (the secret is unknown)
    # Other names of the destination that the request carries (Host header, TLS SNI, an
    # absolute-form authority), ports removed: each must name ``host``, or an upstream could
    # serve another host than the one the route was chosen for.
    other_hosts: tuple[str, ...] = ()
    # A Host header or :authority that is not exactly host[:port] (refused, see canonical.py)
    bad_authority: str | None = None


def request_facts_of(
    peer: str,
    method: str,
    host: str,
    path: str,
    route: str | None,
    environment: str | None,
    api_key: str | None,
    forwarded_for: tuple[str, ...],
    other_hosts: tuple[str, ...],
    bad_authority: str | None = None,
) -> RequestFacts:
    """``RequestFacts(...)`` (no api_key_name) without the frozen dataclass __init__.

    Made once per request by the proxy; the ten ``object.__setattr__`` calls of __init__
    were most of its cost. The same object: the same fields, in the same order.
    """
    facts = object.__new__(RequestFacts)
    attributes = facts.__dict__
    attributes["peer"] = peer
    attributes["method"] = method
    attributes["host"] = host
    attributes["path"] = path
    attributes["route"] = route
    attributes["environment"] = environment
    attributes["api_key"] = api_key
    attributes["forwarded_for"] = forwarded_for
    attributes["api_key_name"] = None
    attributes["other_hosts"] = other_hosts
    attributes["bad_authority"] = bad_authority
    return facts


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    status: int  # what the proxy answers on a denial; 0 when the request goes upstream
    client_ip: str | None
    peer_ip: str | None
    route: str | None = None
    environment: str | None = None
    client: str | None = None
    api_key: str | None = None
    config_version: str = ""
    target_url: str | None = None  # where an allowed request goes, when the route rewrites it
    body: dict[str, Any] = field(default_factory=dict)  # the JSON body of a denial
    allow_methods: tuple[str, ...] = ()  # for the Allow header of a 405
    detail: str = ""  # extra words for the log, never for the client
    # let through although refused by a check in report mode (the reason says which, see README)
    report_only: bool = False

    @property
    def decision(self) -> str:
        return "allowed" if self.allowed else "denied"

    def summary(self) -> str:
        """One line for the event log and the flow comment."""
        line = (
            f"knoxcall: {'allowed' if self.allowed else 'denied'} {self.reason} {self.client_ip or '-'} "
            f"route={printable(self.route or '-')} env={printable(self.environment or '-')}"
        )
        if self.client:
            line += f" client={self.client}"
        if self.api_key:
            line += f" key={self.api_key}"
        if self.peer_ip != self.client_ip:
            line += f" peer={self.peer_ip or '-'}"
        if self.detail:
            line += f" ({printable(self.detail)})"
        return line

    def fields(self) -> dict[str, Any]:
        """The decision as a flat mapping, for flow metadata and the access log."""
        return {
            "decision": self.decision,
            "reason": self.reason,
            "status": self.status,
            "route": self.route,
            "environment": self.environment,
            "client": self.client,
            "client_ip": self.client_ip,
            "peer_ip": self.peer_ip,
            "api_key": self.api_key,
            "config_version": self.config_version,
            "report_only": self.report_only,
        }


# id(decision) -> (decision, its summary line); see summary_of
_summaries: dict[int, tuple[Decision, str]] = {}
_SUMMARIES_KEPT = 1024


def summary_of(decision: Decision) -> str:
    """``decision.summary()``, made once per decision object.

    decide() hands out its remembered decisions again and again, and each request's log
    line and flow comment start with the summary. A decision never changes, so its summary
    does not either; the decision is kept with it, so that its id is not reused meanwhile.
    """
    known = _summaries.get(id(decision))
    if known is not None and known[0] is decision:
        return known[1]
    line = decision.summary()
    if len(_summaries) >= _SUMMARIES_KEPT:
        _summaries.clear()
    _summaries[id(decision)] = (decision, line)
    return line


def resolve_client_ip(
    policy: Policy, peer: str, forwarded_for: tuple[str, ...]
) -> tuple[IPAddress | None, IPAddress | None]:
    """(client IP, peer IP). The header is believed only from trusted proxies.

    Its field lines, in order, are one list (as if joined with commas), cut at each
    comma; each element is trimmed of spaces and tabs (HTTP's optional whitespace, no
    other), and empty elements are skipped. Walked from the right, skipping trusted
    proxies, the first other address is the client. An entry that is not strictly an
    address (`parse_forwarded_entry`) stops the walk at the last trusted hop, so that
    garbage never lets a caller choose an address further left.
    """
    peer_ip = _parsed_peer(peer)[0]
    if peer_ip is None or not forwarded_for or peer_ip not in policy.trusted_proxies:
        return peer_ip, peer_ip
    client_ip = peer_ip
    entries = [e for value in forwarded_for for e in value.split(",")]
    for entry in reversed(entries):
        entry = entry.strip(" \t")
        if not entry:
            continue
        address = parse_forwarded_entry(entry)
        if address is None:
            break
        client_ip = address
        if address not in policy.trusted_proxies:
            break
    return client_ip, peer_ip


# peer as the socket gives it -> (parse_ip(peer), its text for logs); see _parsed_peer
_peers: dict[str, tuple[IPAddress | None, str | None]] = {}
_PEERS_KEPT = 4096


def _parsed_peer(peer: str) -> tuple[IPAddress | None, str | None]:
    """``parse_ip(peer)`` and its text (the peer itself when it is no address), remembered.

    A peer sends many requests (keep-alive, clients that come back): parsing its address
    and writing it out again were a third of a decision's time. Both are pure functions of
    the string, so the cache is never stale; it is emptied when it holds _PEERS_KEPT peers.
    """
    parsed = _peers.get(peer)
    if parsed is None:
        address = parse_ip(peer)
        parsed = (address, str(address) if address is not None else peer or None)
        if len(_peers) >= _PEERS_KEPT:
            _peers.clear()
        _peers[peer] = parsed
    return parsed


def decide(policy: Policy, facts: RequestFacts) -> Decision:
    """The decision for one HTTP request, in the documented order of checks (`decide_plain`).

    Remembered per policy when it does not depend on the path beyond its spelling: a
    request that names its route (x-knoxcall-route), carries no API key, and whose route
    has no ``match`` (or is unknown or disabled). Callers send many such requests with the
    same peer, method, host, route and environment; each still has its path checked
    (step 2, the only step before the route that reads it), then gets the decision made
    for the first. A decision is immutable, so it is shared. Requests with a key are never
    remembered: a lookup by the secret would not take constant time (see find_key).
    """
    if facts.route is None or facts.api_key is not None or facts.api_key_name is not None:
        return decide_plain(policy, facts)
    key = (facts.peer, facts.method, facts.host, facts.route, facts.environment, facts.forwarded_for,
           facts.other_hosts, facts.bad_authority)  # fmt: skip
    known = policy.decisions.get(key)
    path = facts.path
    if known is not None and len(path) <= MAX_TARGET_LENGTH and path_problem(path) is None:
        return known
    return _remembered(policy, key, facts)


def decide_values(
    policy: Policy,
    peer: str,
    method: str,
    host: str,
    path: str,
    route: str | None,
    environment: str | None,
    api_key: str | None,
    forwarded_for: tuple[str, ...],
    other_hosts: tuple[str, ...],
    bad_authority: str | None,
) -> Decision:
    """``decide(policy, request_facts_of(...))``, without making the facts for a remembered
    decision (the proxy's way: a third of what reading a request cost was making them)."""
    if route is not None and api_key is None:
        key: tuple[object, ...] | None = (peer, method, host, route, environment, forwarded_for, other_hosts,
                                           bad_authority)  # fmt: skip
        known = policy.decisions.get(key)
        if known is not None and len(path) <= MAX_TARGET_LENGTH:
            # path_problem(path) is None: its usual case inline (no query: "?" is no plain character)
            if path.startswith("/") and PLAIN_PATH_CHARS.issuperset(path) and "//" not in path and "/." not in path:
                return known
            if path_problem(path) is None:
                return known
    else:
        key = None  # not to be remembered (see decide)
    facts = request_facts_of(peer, method, host, path, route, environment, api_key, forwarded_for, other_hosts,
                             bad_authority)  # fmt: skip
    return decide_plain(policy, facts) if key is None else _remembered(policy, key, facts)


def _remembered(policy: Policy, key: tuple[object, ...], facts: RequestFacts) -> Decision:
    """decide_plain's decision, kept under ``key`` when the path played no part in it (see decide)."""
    decision = decide_plain(policy, facts)
    if decision.reason not in _PATH_REASONS:
        route = policy.routes.get(facts.route)  # type: ignore[arg-type]
        if route is None or not route.enabled or route.match is None:  # else the path chose it (_fits)
            remembered = policy.decisions
            if len(remembered) >= _DECISIONS_KEPT:
                remembered.clear()
            remembered[key] = decision
    return decision


_PATH_REASONS = frozenset({"uri_too_long", "path_not_canonical"})
_DECISIONS_KEPT = 4096  # per policy; emptied when full (a flood of distinct callers)


def decide_plain(policy: Policy, facts: RequestFacts) -> Decision:
    """The decision for one HTTP request, in the documented order of checks, made afresh."""
    settings = policy.settings
    peer_ip, peer_ip_text = _parsed_peer(facts.peer)
    if facts.forwarded_for:  # only then can a trusted proxy name another client
        client_ip = resolve_client_ip(policy, facts.peer, facts.forwarded_for)[0]
    else:
        client_ip = peer_ip
    if client_ip is peer_ip:  # the usual case: no trusted proxy in between; str() once
        client_ip_text = peer_ip_text
    else:
        client_ip_text = str(client_ip) if client_ip is not None else facts.peer or None
    base: dict[str, Any] = {
        "client_ip": client_ip_text,
        "peer_ip": peer_ip_text,
        "config_version": policy.version,
    }

    # 2. the request's own spelling: one canonical path and host, or refused (canonical.py)
    if len(facts.path) > MAX_TARGET_LENGTH:
        return _deny(base, "uri_too_long", detail=f"request target of {len(facts.path)} characters")
    problem = path_problem(facts.path)
    if problem is not None:
        return _deny(base, "path_not_canonical", detail=problem)
    if method_problem(facts.method) is not None:
        return _deny(base, "method_invalid", detail=f"method {_capped(facts.method)!r} is not an HTTP token")
    if facts.bad_authority is not None:
        return _deny(base, "host_invalid", detail=f"Host {_capped(facts.bad_authority)!r} is not host[:port]")
    host = canonical_host(facts.host) if facts.host else ""
    if host is None:
        return _deny(base, "host_invalid", detail=f"host {_capped(facts.host)!r} is not in standard notation")

    # 3. route (for one host: a request that names two is refused, whatever it asks for)
    for other in facts.other_hosts:
        if canonical_host(other) != host:
            detail = f"the request names host {_capped(other)!r} but goes to {host!r}"
            return _deny(base, "route_not_found", route=facts.route, detail=detail)
    if facts.route is not None:
        route = policy.routes.get(facts.route)
        if route is None or not route.enabled:
            why = "unknown route" if route is None else "route is disabled"
            return _deny(base, "route_not_found", route=facts.route, detail=why)
        if route.match is not None and not _fits(route, host, facts.path):
            return _deny(base, "route_not_found", route=facts.route, detail="request does not fit the route's match")
    else:
        route = policy.route_table.find(host, facts.path)
        if route is None:
            if settings.unmatched_requests == "allow":
                return _decision(True, "unmatched_allowed", 0, base)
            return _deny(base, "route_not_found", route=None, detail=f"no route matches {host}{_capped(facts.path)}")

    # 4. environment
    environment = facts.environment if facts.environment is not None else settings.default_environment
    if environment not in policy.config.environments:
        return _deny(base, "environment_not_found", route=route.name, environment=environment)
    base["route"] = route.name
    base["environment"] = environment

    # 5. API key
    key: ApiKey | None = None
    if facts.api_key is not None or facts.api_key_name is not None:
        if facts.api_key is not None:
            key = find_key(policy, facts.api_key)
        else:
            key = find_key_by_name(policy, facts.api_key_name)
        if key is None:
            return _deny(base, "invalid_api_key")
        base["api_key"] = key.name
    elif route.requires_api_key:
        return _deny(base, "api_key_required")

    # 6. clients, then 7. method: a caller the client check refuses learns nothing of the
    # route beyond "IP not authorized" (not even its methods)
    if key is not None and key.type == "test":
        if environment == settings.default_environment:
            return _deny(base, "test_key_not_allowed")
        return _allowed_method(base, "test_key", route, environment, facts.method)
    if not route.requires_clients:
        return _allowed_method(base, "open_route", route, environment, facts.method)
    access = policy.access_for(route.name, environment)
    covering = policy.clients_by_ip.lookup(client_ip) if client_ip is not None else ()
    for name in covering:
        if name in access.allowed:
            return _allowed_method(base, "client", route, environment, facts.method, client=name)
    refused = _client_refusal(policy, covering, access)
    if (route.name, environment) in policy.report_only:
        reason, client, detail = refused
        base["report_only"] = True
        base["detail"] = f"report-only: would be refused 403{f' ({detail})' if detail else ''}"
        return _allowed_method(base, reason, route, environment, facts.method, client=client)
    return _deny(base, refused[0], client=refused[1], detail=refused[2])


def _client_refusal(
    policy: Policy, covering: tuple[str, ...] | list[str], access: Any
) -> tuple[str, str | None, str]:
    """(reason, client named, detail) of a caller that no client assigned here lets in."""
    disabled_here = [n for n in covering if n in access.assigned]
    if disabled_here:
        return "client_disabled", disabled_here[0], f"client {disabled_here[0]} is disabled"
    enabled_elsewhere = [n for n in covering if n in policy.enabled_clients]
    if enabled_elsewhere:
        name = enabled_elsewhere[0]
        return "client_not_assigned", name, f"client {name} is not assigned to this route and environment"
    if covering:
        return "client_disabled", covering[0], f"client {covering[0]} is disabled"
    return "ip_not_whitelisted", None, ""


def _allowed_method(
    base: dict[str, Any], reason: str, route: Any, environment: str, method: str, client: str | None = None
) -> Decision:
    """7. method: allowed by every other check; refused only for its method."""
    methods = route.methods_for(environment)
    if methods is not None and method not in methods:  # case-sensitive, as upstreams compare them
        # a real refusal, report mode or not (its detail keeps what the client check would say)
        return _deny(
            base, "method_not_allowed", client=client, allow_methods=tuple(sorted(methods)), report_only=False
        )
    return _allow(base, reason, route, environment, client)


def decide_raw_flow(policy: Policy, peer: str) -> Decision:
    """Raw TCP/UDP outside the raw reverse modes: refused, whoever sends it.

    mitmproxy relays as raw TCP what it cannot read as HTTP, such as a request inside a
    CONNECT tunnel that starts with a blank line or arrives in small pieces. Allowing it
    by the caller's address would let any client send any method to any route,
    environment or key-protected route behind the tunnel.
    """
    client_ip, peer_ip = resolve_client_ip(policy, peer, ())
    base: dict[str, Any] = {
        "client_ip": str(client_ip) if client_ip is not None else peer or None,
        "peer_ip": str(peer_ip) if peer_ip is not None else peer or None,
        "config_version": policy.version,
    }
    return _deny(base, "not_http", detail="raw TCP/UDP: not an HTTP request KnoxCall can decide")


def decide_connection(policy: Policy, peer: str, *, tunnel: bool) -> Decision:
    """A connection that carries no request we can read: CONNECT, raw TCP, UDP.

    Allowed when an enabled client covers the peer, or unmatched requests are allowed.
    A CONNECT (``tunnel``) is also let through when open routes or test keys exist,
    since the requests inside it are then decided one by one.
    """
    client_ip, peer_ip = resolve_client_ip(policy, peer, ())
    base: dict[str, Any] = {
        "client_ip": str(client_ip) if client_ip is not None else peer or None,
        "peer_ip": str(peer_ip) if peer_ip is not None else peer or None,
        "config_version": policy.version,
    }
    covering = policy.clients_by_ip.lookup(client_ip) if client_ip is not None else ()
    for name in covering:
        if name in policy.enabled_clients:
            return Decision(True, "client", 0, client=name, **base)
    if policy.settings.unmatched_requests == "allow":
        return Decision(True, "unmatched_allowed", 0, **base)
    if tunnel and (policy.any_open_route or policy.any_test_key):
        return Decision(True, "open_route", 0, detail="requests inside the tunnel are checked one by one", **base)
    if covering:
        return _deny(base, "client_disabled", client=covering[0])
    return _deny(base, "ip_not_whitelisted")


def find_key(policy: Policy, secret: str) -> ApiKey | None:
    """The enabled key with this secret; every digest is compared, in constant time."""
    digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
    found = None
    for key in policy.enabled_keys:
        if hmac.compare_digest(digest, key.key_sha256):
            found = key
    return found


def find_key_by_name(policy: Policy, name: str | None) -> ApiKey | None:
    """The enabled key with this name: what the key would resolve to, for explaining a decision."""
    return next((key for key in policy.enabled_keys if key.name == name), None)


def internal_error(client_ip: str | None, peer_ip: str | None, detail: str, version: str = "") -> Decision:
    """The decision when deciding itself failed: deny, and say so."""
    return _deny(
        {"client_ip": client_ip, "peer_ip": peer_ip, "config_version": version},
        "internal_error",
        detail=detail,
    )


_MESSAGE_VALUE_CHARS = 200


def _capped(text: str) -> str:
    """A caller's value as it may go into a log line: at most _MESSAGE_VALUE_CHARS characters."""
    if len(text) <= _MESSAGE_VALUE_CHARS:
        return text
    return f"{text[:_MESSAGE_VALUE_CHARS]}... ({len(text)} characters)"


def _fits(route: Any, host: str, path: str) -> bool:
    """Does the request fit this route's own match (hosts and path prefix)?"""
    match = route.match
    if match.hosts and not any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in match.hosts):
        return False
    prefix = match.path_prefix
    path = normalize_path(path)
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _allow(base: dict[str, Any], reason: str, route: Any, environment: str, client: str | None = None) -> Decision:
    # base is decide()'s own, made for this call and not read after: filled in, not copied
    base["client"] = client
    base["target_url"] = route.target_for(environment)
    return _decision(True, reason, 0, base)


# Every field with its default, in field order (body's, a new dict, is made per decision).
_DECISION_DEFAULTS = {f.name: None if f.name == "body" else f.default for f in fields(Decision)}


def _decision(allowed: bool, reason: str, status: int, values: dict[str, Any]) -> Decision:
    """``Decision(allowed, reason, status, **values)``, for decide()'s own calls only.

    The same object, built without the frozen dataclass __init__, whose fourteen
    ``object.__setattr__`` calls were a fifth of a decision's time. ``values`` always
    holds client_ip and peer_ip, and only field names.
    """
    decision = object.__new__(Decision)
    attributes = decision.__dict__
    attributes.update(_DECISION_DEFAULTS)  # in field order, as __init__ would set them
    attributes["allowed"], attributes["reason"], attributes["status"] = allowed, reason, status
    attributes["body"] = {}
    attributes.update(values)
    return decision


_DENIAL_MESSAGES = {
    "path_not_canonical": (400, "Bad request"),
    "host_invalid": (400, "Bad request"),
    "method_invalid": (400, "Bad request"),
    "uri_too_long": (414, "URI too long"),
    "route_not_found": (404, "Route not found"),
    "environment_not_found": (404, "Environment not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "invalid_api_key": (401, "Invalid API key"),
    "api_key_required": (401, "Invalid API key"),
    "test_key_not_allowed": (403, "Test keys are not allowed in the default environment"),
    "ip_not_whitelisted": (403, "IP not authorized"),
    "client_not_assigned": (403, "IP not authorized"),
    "client_disabled": (403, "IP not authorized"),
    "not_http": (0, "Not an HTTP request"),  # raw traffic: the connection is cut, nothing is answered
    "internal_error": (500, "Internal error"),
}


def _deny(base: dict[str, Any], reason: str, **extra: Any) -> Decision:
    status, message = _DENIAL_MESSAGES[reason]
    values = {**base, **extra}
    body: dict[str, Any] = {"error": message, "status": status}
    if status in (400, 414):
        body["reason"] = reason
    elif reason == "route_not_found":
        body["route"] = values.get("route")
    elif reason == "environment_not_found":
        body["environment"] = values.get("environment")
    elif status == 403:
        body.update(ip=values.get("client_ip"), route=values.get("route"), environment=values.get("environment"))
    values["body"] = body
    return _decision(False, reason, status, values)
