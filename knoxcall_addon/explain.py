"""Explain the decision the proxy would make for a caller, route and environment.

Pure and shared by `knoxcall explain` and the mitmproxy command `knoxcall.explain`.
The decision itself comes from `decision.decide`, the same call the addon makes; this
module only adds the words around it: which range matched, or the closest near misses.
Not on the hot path, so it may scan a client's networks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from knoxcall_addon.decision import ENVIRONMENT_HEADER, KEY_HEADER, ROUTE_HEADER, Decision, RequestFacts, decide
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.model import Client, IPAddress, IPNetwork
from knoxcall_addon.policy import Policy
from knoxcall_addon.ratelimit import explain_lines
from knoxcall_addon.signing import before_body
from knoxcall_addon.signing import explain_lines as signature_lines

NEAR_MISS_LIMIT = 10  # near misses listed at most; a lookup can cover many clients


@dataclass(frozen=True)
class Explanation:
    facts: RequestFacts
    decision: Decision
    matched_range: IPNetwork | None
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


def request_for(
    policy: Policy,
    ip: str,
    route: str,
    environment: str | None = None,
    key_name: str | None = None,
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    method: str | None = None,
    host: str | None = None,
    path: str | None = None,
) -> RequestFacts:
    """The RequestFacts of a request that names ``route`` and fits its match.

    Host and path default to ones the route's match accepts, and the method to GET (or
    the first allowed method when GET is not), so that the answer is about the caller's
    address. Headers named like the client IP header or the x-knoxcall-* headers count
    as the proxy would count them.
    """
    forwarded: list[str] = []
    api_key: str | None = None
    for name, value in headers:
        lowered = name.strip().lower()
        if lowered == policy.settings.client_ip_header.lower():
            forwarded.append(value.strip())
        elif lowered == KEY_HEADER:
            api_key = value.strip()
        elif lowered == ENVIRONMENT_HEADER and environment is None:
            environment = value.strip()
        elif lowered == ROUTE_HEADER:
            route = value.strip()
    target = policy.routes.get(route)
    match = target.match if target is not None else None
    if host is None:
        host = ""
        if match is not None and match.hosts:
            first = match.hosts[0]
            host = "www" + first[1:] if first.startswith("*.") else first
    if path is None:
        path = match.path_prefix if match is not None else "/"
    if method is None:
        method = "GET"
        if target is not None:
            methods = target.methods_for(environment or policy.settings.default_environment)
            if methods and "GET" not in methods:
                method = sorted(methods)[0]
    return RequestFacts(
        peer=ip,
        method=method.upper(),
        host=host,
        path=path,
        route=route,
        environment=environment,
        api_key=api_key,
        forwarded_for=tuple(forwarded),
        api_key_name=key_name if api_key is None else None,
    )


def explain(policy: Policy, facts: RequestFacts) -> Explanation:
    """Decide ``facts`` like the proxy would, and say why in a few lines."""
    decision = decide(policy, facts)
    if decision.allowed and decision.route in policy.signatures:  # refused at once without a client, as the proxy
        decision = before_body(decision, streamed=False) or decision
    config = policy.config
    lines: list[str] = []
    verdict = "ALLOWED" if decision.allowed else f"DENIED ({decision.status})"
    if decision.report_only:
        verdict = "ALLOWED (report-only: refused when enforced)"
    lines.append(f"{verdict}: {decision.reason}")
    where = f"{facts.method} {facts.host or '<any host>'}{facts.path}"
    lines.append(
        f"  request: {where} route={decision.route or facts.route} "
        f"env={decision.environment or facts.environment or config.settings.default_environment}"
        + (f" key={decision.api_key}" if decision.api_key else "")
        + (
            f" (key {facts.api_key_name!r} is not an enabled key)"
            if facts.api_key_name and not decision.api_key
            else ""
        )
    )
    caller = f"  caller: {decision.client_ip or facts.peer}"
    if decision.peer_ip and decision.peer_ip != decision.client_ip:
        caller += f" (via trusted proxy {decision.peer_ip})"
    lines.append(caller)
    if decision.detail:
        lines.append(f"  detail: {decision.detail}")
    if not decision.allowed:
        lines.append(f"  answer: {decision.status} {json.dumps(decision.body)}")
    elif decision.target_url:
        lines.append(f"  forwarded to: {decision.target_url}")

    client_ip = parse_ip(decision.client_ip or "") if decision.client_ip else None
    matched: IPNetwork | None = None
    if decision.allowed and decision.reason == "client" and decision.client and client_ip is not None:
        matched = best_range(config.clients[decision.client], client_ip)
        lines.append(f"  matched: client {decision.client} range {matched}")
    elif decision.reason in _REFUSED_BY_THE_IP_CHECK:
        lines += _near_misses_of(policy, decision)
    elif decision.reason in _REFUSED_BEFORE_THE_IP_CHECK:
        lines += _ip_check_alone(policy, facts, decision)
    lines += explain_lines(policy.rate_limits, decision)
    if decision.route in policy.signatures and decision.environment is not None:
        lines += signature_lines(policy.signatures[decision.route], policy.signing_keys, decision.client,
                                 decision.environment)  # fmt: skip
    injected = policy.injections.get((decision.route or "", decision.environment or ""))
    if decision.allowed and injected is not None:  # as the flow shows them: placeholders, never a value
        shown = ", ".join(f"{name.decode()}: {value.decode('utf-8', 'replace')}" for name, value in injected.fields)
        lines.append(f"  injects: {shown}")
    return Explanation(facts, decision, matched, lines)


_REFUSED_BY_THE_IP_CHECK = ("ip_not_whitelisted", "client_not_assigned", "client_disabled")
# denials that come before the client check: what would the caller's address get?
# (the method is checked after the clients: a method_not_allowed caller's address passed)
_REFUSED_BEFORE_THE_IP_CHECK = ("invalid_api_key", "api_key_required", "test_key_not_allowed")


def _ip_check_alone(policy: Policy, facts: RequestFacts, decision: Decision) -> list[str]:
    """The same request with the method and key put right, decided again (by ``decide``):
    so that "is my address allowed?" has an answer even when something else failed first."""
    route = policy.routes.get(decision.route or "")
    environment = decision.environment
    if route is None or environment is None:
        return []
    methods = route.methods_for(environment)
    method = facts.method if not methods or facts.method in methods else sorted(methods)[0]
    key_name = None
    if route.requires_api_key:
        live = [k.name for k in policy.config.api_keys.values() if k.enabled and k.type == "live"]
        if not live:
            return ["  with the method and key put right: no enabled live key exists for this route"]
        key_name = live[0]
    again = decide(policy, replace(facts, method=method, api_key=None, api_key_name=key_name))
    fixed = "method and key" if method != facts.method else "key"
    if again.allowed:
        how = f"as client {again.client}" if again.client else f"({again.reason})"
        return [f"  with the {fixed} put right: allowed, {how}"]
    lines = [f"  with the {fixed} put right: still denied, {again.reason}"]
    if again.reason in _REFUSED_BY_THE_IP_CHECK:
        lines += _near_misses_of(policy, again)
    return lines


def _near_misses_of(policy: Policy, decision: Decision) -> list[str]:
    """_near_misses for a decision refused by the client check (none without a client IP)."""
    client_ip = parse_ip(decision.client_ip) if decision.client_ip else None
    return _near_misses(policy, client_ip, decision) if client_ip is not None else []


def explain_text(
    policy: Policy,
    ip: str,
    route: str,
    environment: str | None = None,
    key_name: str | None = None,
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
) -> str:
    """The explanation as text: what `knoxcall explain` prints and `knoxcall.explain` returns."""
    if parse_ip(ip) is None:
        return f"error: {ip!r} is not an IP address"
    facts = request_for(policy, ip, route, environment or None, key_name or None, headers)
    return explain(policy, facts).text()


def best_range(client: Client, address: IPAddress) -> IPNetwork | None:
    """The narrowest of the client's networks that contains ``address``."""
    containing = [n for n in client.networks if n.version == address.version and address in n]
    return max(containing, key=lambda n: n.prefixlen, default=None)


@dataclass(frozen=True)
class NearMiss:
    """A client that holds the address but does not let it in on this route and environment."""

    client: str
    network: IPNetwork | None  # its narrowest range that holds the address
    enabled: bool
    here: bool  # assigned to this route and environment (then it is disabled)
    elsewhere: tuple[str, ...]  # "route/environment" pairs it is assigned to instead
    other_environments: tuple[str, ...]  # environments of this route it is assigned in


def near_misses(policy: Policy, address: IPAddress, route: str, environment: str) -> list[NearMiss]:
    """Every client that holds ``address``, in declaration order, with where it is assigned."""
    config = policy.config
    misses: list[NearMiss] = []
    for name in policy.clients_by_ip.lookup(address):
        client = config.clients[name]
        here = False
        elsewhere: list[str] = []
        for a in config.assignments:
            if name in a.clients:
                if a.route == route and a.environment == environment:
                    here = True
                else:
                    elsewhere.append(f"{a.route}/{a.environment}")
        other_envs = tuple(e.split("/", 1)[1] for e in elsewhere if e.split("/", 1)[0] == route)
        misses.append(NearMiss(name, best_range(client, address), client.enabled, here, tuple(elsewhere), other_envs))
    return misses


def nearest_assigned(policy: Policy, address: IPAddress, route: str, environment: str) -> tuple[str, IPNetwork] | None:
    """The enabled client assigned here whose range is nearest ``address`` (longest common
    prefix; the first in name order on a tie): the one an address that fits none most
    likely belongs to."""
    config = policy.config
    best: tuple[int, str, IPNetwork] | None = None
    for name in sorted(policy.access_for(route, environment).allowed):
        for network in config.clients[name].networks:
            if network.version != address.version:
                continue
            differing = (int(address) ^ int(network.network_address)).bit_length()
            shared = min(network.prefixlen, network.max_prefixlen - differing)
            if best is None or shared > best[0]:
                best = (shared, name, network)
    return (best[1], best[2]) if best is not None else None


def advice(policy: Policy, decision: Decision) -> tuple[str, str] | None:
    """For a caller the client check refused: (the near miss, the config change that lets it in),
    one sentence each; None for any other decision. `knoxcall logs` prints them."""
    if decision.reason not in _REFUSED_BY_THE_IP_CHECK or not decision.client_ip:
        return None
    address = parse_ip(decision.client_ip)
    route, environment = decision.route or "", decision.environment or ""
    if address is None:
        return None
    misses = near_misses(policy, address, route, environment)
    if misses:
        miss = next((m for m in misses if m.client == decision.client), misses[0])
        steps = [] if miss.enabled else [f"enable client {miss.client} (enabled: true)"]
        if not miss.here:
            steps.append(f"add {miss.client} to assignments: {route}: {environment}")
        return _near_miss_line(miss, route, environment).strip(), " and ".join(steps)
    nearest = nearest_assigned(policy, address, route, environment)
    if nearest is None:
        return (
            f"no client holds {address} and no enabled client is assigned to {route} in {environment}",
            f"add a client with {address} and assign it to {route} in {environment}",
        )
    name, network = nearest
    return (
        f"no client holds {address}; client {name} (assigned here) has {network}",
        f"add {address} to client {name}'s ip_address, or assign the client that should hold it "
        f"to {route} in {environment}",
    )


def _near_misses(policy: Policy, address: IPAddress, decision: Decision) -> list[str]:
    """Clients that contain the address but do not let it in here, and why not."""
    config = policy.config
    route = decision.route or ""
    environment = decision.environment or ""
    misses = near_misses(policy, address, route, environment)
    lines: list[str] = []
    if not misses:
        lines.append(f"  no client contains {address}")
        assigned = policy.access_for(route, environment).assigned
        if assigned:
            names = sorted(assigned)[:NEAR_MISS_LIMIT]
            shown = ", ".join(_client_summary(config.clients[n]) for n in names)
            lines.append(f"  assigned here: {shown}" + (" ..." if len(assigned) > len(names) else ""))
        else:
            lines.append(f"  no client is assigned to {route} in {environment}")
        return lines
    lines.append("  near misses:")
    lines.extend(f"    {_near_miss_line(miss, route, environment)}" for miss in misses[:NEAR_MISS_LIMIT])
    if len(misses) > NEAR_MISS_LIMIT:
        lines.append(f"    ... and {len(misses) - NEAR_MISS_LIMIT} more")
    return lines


def _near_miss_line(miss: NearMiss, route: str, environment: str) -> str:
    """``client NAME (RANGE) <why it does not let the address in>``."""
    elsewhere = miss.elsewhere
    others = ", ".join(elsewhere[:NEAR_MISS_LIMIT]) + (" ..." if len(elsewhere) > NEAR_MISS_LIMIT else "")
    if not miss.enabled:
        # Disabled wins over everything else: it is why the client does not count,
        # even where it is assigned (check's disabled-assigned warns about that).
        why = "is disabled"
        if miss.here:
            why += f" (it is assigned to {route} in {environment})"
            where = f"; also assigned to {others}" if elsewhere else ""
        else:
            where = f"; assigned to {others}" if elsewhere else "; assigned nowhere"
    elif miss.other_environments:
        why = f"is assigned to {route} only in {', '.join(miss.other_environments)}, not in {environment}"
        where = ""
    else:
        why = f"is not assigned to {route} in {environment}"
        where = f"; assigned to {others}" if elsewhere else "; assigned nowhere"
    return f"client {miss.client} ({miss.network}) {why}{where}"


def _client_summary(client: Client) -> str:
    """``name (first ranges)``, marked when disabled: a disabled client assigned here lets no one in."""
    networks = client.networks
    shown = ", ".join(str(n) for n in networks[:3]) + (", ..." if len(networks) > 3 else "")
    return f"{client.name} ({shown}{'' if client.enabled else '; disabled'})"
