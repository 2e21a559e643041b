"""Security lint of a loaded config: what `knoxcall check` reports after the loader accepted it.

Pure: takes a validated Config, returns Findings (rule, severity, location, message).
Every rule is linear or n·log n in the number of ranges, since configs can hold 100k of them.
`error_findings` is the error-level part alone, cheap enough for the proxy to compute at
every load (it logs each one and lists them in ``knoxcall.status``).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from knoxcall_addon.model import Client, Config, IPNetwork, Location, pack_network
from knoxcall_addon.rateconfig import unreachable_limits

Severity = Literal["error", "warning"]

WIDE_PREFIX = {4: 16, 6: 32}  # ranges wider than these (smaller prefix) are "very wide"
SHARED_ROUTES_LIMIT = 5  # a client on more routes than this is "shared across many routes"

RULES: dict[str, str] = {
    "config": "the loader refused the config (same code as the proxy)",
    "open-range": "a client allows every address (0.0.0.0/0, ::/0); an error when assigned in the default environment",
    "wide-range": f"a range wider than /{WIDE_PREFIX[4]} (IPv4) or /{WIDE_PREFIX[6]} (IPv6)",
    "unused-client": "a client assigned to no route",
    "disabled-assigned": "a disabled client is still assigned",
    "user-in-default": "a `user` client (changing IPs) assigned in the default environment",
    "shared-client": f"a client assigned to more than {SHARED_ROUTES_LIMIT} routes",
    "no-description": "a client without a description",
    "open-route": "a route with requires_clients: false",
    "unassigned-route": "a route that requires clients has no enabled client assigned in some environment",
    "open-forward": "an open route with neither target_base_url nor match: it forwards wherever the caller asks",
    "open-shadows-host": "an open route matching any host, without a target, has a longer path_prefix than a "
    "host's protected route: in forward mode it lets any caller reach that host under its prefix",
    "duplicate-range": "the same range twice, or a range inside another, in one client",
    "overlapping-range": "ranges of different clients overlap",
    "trusted-proxies": "trusted_proxies holding every address (error) or a very wide range (warning)",
    "report-mode": "a route in report mode in the default environment (refusals logged, not enforced)",
    "test-key": "an enabled test key (it skips the client check outside the default environment)",
    "unreachable-limit": "a rate limit that can never refuse: an enforced limit on the same requests is as strict",
    "unsigned-client": "a client assigned to a route that requires signed requests has no signing_secrets",
}


@dataclass(frozen=True, order=True)
class Finding:
    location: Location
    severity: Severity
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}[{self.rule}] {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.location.file,
            "line": self.location.line,
            "severity": self.severity,
            "rule": self.rule,
            "message": self.message,
        }


def lint(config: Config) -> list[Finding]:
    """Every finding for ``config``, sorted by file and line."""
    findings: list[Finding] = []
    findings += _open_range_rules(config)
    findings += _client_rules(config)
    findings += _route_rules(config)
    findings += _shadow_rules(config)
    findings += _unassigned_route_rules(config)
    findings += _range_rules(config)
    findings += _trusted_proxy_rules(config)
    findings += [
        Finding(
            key.location,
            "warning",
            "test-key",
            f'API key "{key.name}" is a test key: it skips the client check outside the default environment',
        )
        for key in config.api_keys.values()
        if key.type == "test" and key.enabled
    ]
    findings += [Finding(where, "warning", "unreachable-limit", text) for where, text in unreachable_limits(config)]
    findings += _report_mode_rules(config)
    findings += _signature_rules(config)
    return sorted(findings)


def report_mode_places(config: Config) -> list[tuple[str, str]]:
    """(route, environment) pairs whose client check only reports its refusals."""
    mode = config.settings.mode
    return [
        (route.name, environment)
        for route in config.routes.values()
        if route.enabled and route.requires_clients
        for environment in config.environments
        if route.mode_for(environment, mode) == "report"
    ]


def _report_mode_rules(config: Config) -> list[Finding]:
    """Report mode in the default environment: a warning, so that a config repository's CI
    notices a rollout left half done (elsewhere `knoxcall check` lists it as a note)."""
    default = config.settings.default_environment
    return [
        Finding(
            config.routes[route].location,
            "warning",
            "report-mode",
            f'route "{route}" is in report mode in {environment} (the default environment): callers the '
            "client check refuses are let through and logged with report_only; set mode: enforce when done",
        )
        for route, environment in report_mode_places(config)
        if environment == default
    ]


def error_findings(config: Config) -> list[Finding]:
    """The findings of `lint` whose severity is "error", and only those, sorted.

    Only the rules that can give an error run (the others only warn), and none of them
    builds an address object per range: a 100k-range config takes a few milliseconds,
    so the proxy runs this at every load, in the reload thread.
    """
    findings = _open_range_rules(config) + _route_rules(config) + _trusted_proxy_rules(config)
    return sorted(f for f in findings if f.severity == "error")


# The packed record of a /0 starts with a byte that no other prefix length has: a
# client whose records' first bytes include neither is skipped without making an address
# object per range (100k ranges: 70 ms that way, a few ms this way).
_OPEN_RECORDS = [pack_network(ipaddress.ip_network(n)) for n in ("0.0.0.0/0", "::/0")]
_RECORD_SIZE = len(_OPEN_RECORDS[0])
_OPEN_HEADS = [record[0] for record in _OPEN_RECORDS]


def _open_range_rules(config: Config) -> list[Finding]:
    """A client allowing every address: an error when it is (enabled and) assigned in the default environment."""
    default_env = config.settings.default_environment
    in_default: set[str] = {name for a in config.assignments if a.environment == default_env for name in a.clients}
    findings: list[Finding] = []
    for client in config.clients.values():
        heads = client.networks.packed[::_RECORD_SIZE]
        if not any(head in heads for head in _OPEN_HEADS):
            continue
        for network in client.networks:
            if network.prefixlen != 0:
                continue
            assigned_default = client.name in in_default and client.enabled
            severity: Severity = "error" if assigned_default else "warning"
            scope = f", and it is assigned in the default environment {default_env}" if assigned_default else ""
            message = f'client "{client.name}" allows {network}: every address{scope}'
            findings.append(Finding(client.location, severity, "open-range", message))
    return findings


def _client_rules(config: Config) -> list[Finding]:
    default_env = config.settings.default_environment
    routes_of: dict[str, set[str]] = defaultdict(set)
    for assignment in config.assignments:
        for name in assignment.clients:
            routes_of[name].add(assignment.route)
    findings: list[Finding] = []
    for a in config.assignments:
        for name in a.clients:
            client = config.clients[name]
            if not client.enabled:
                findings.append(
                    Finding(
                        a.location,
                        "warning",
                        "disabled-assigned",
                        f'client "{name}" is disabled but still assigned to {a.route} in {a.environment}; '
                        "remove the assignment (or the client)",
                    )
                )
            if client.type == "user" and a.environment == default_env:
                findings.append(
                    Finding(
                        a.location,
                        "warning",
                        "user-in-default",
                        f'user client "{name}" (changing IPs) is assigned to {a.route} in the default environment '
                        f"{default_env}; prefer server clients there",
                    )
                )
    for client in config.clients.values():
        where = client.location
        for network in client.networks:
            if 0 < network.prefixlen < WIDE_PREFIX[network.version]:  # (0: open-range)
                findings.append(
                    Finding(
                        where,
                        "warning",
                        "wide-range",
                        f'client "{client.name}" allows {network} ({network.num_addresses:,} addresses); '
                        f"narrow it to the addresses really used",
                    )
                )
        routes = routes_of.get(client.name, set())
        if not routes:
            state = "disabled and " if not client.enabled else ""
            findings.append(
                Finding(
                    where,
                    "warning",
                    "unused-client",
                    f'client "{client.name}" is {state}assigned to no route; remove it if it is no longer needed',
                )
            )
        elif len(routes) > SHARED_ROUTES_LIMIT:
            findings.append(
                Finding(
                    where,
                    "warning",
                    "shared-client",
                    f'client "{client.name}" is assigned to {len(routes)} routes (more than {SHARED_ROUTES_LIMIT}); '
                    "one client per caller and purpose limits what a leaked address can reach",
                )
            )
        if not client.description.strip():
            findings.append(
                Finding(
                    where,
                    "warning",
                    "no-description",
                    f'client "{client.name}" has no description; say whose addresses these are',
                )
            )
    return findings


def _route_rules(config: Config) -> list[Finding]:
    findings: list[Finding] = []
    for route in config.routes.values():
        if route.requires_clients:
            continue
        state = "" if route.enabled else " (disabled)"
        findings.append(
            Finding(
                route.location,
                "warning",
                "open-route",
                f'route "{route.name}"{state} has requires_clients: false: any address may call it',
            )
        )
        if route.enabled and route.match is None:
            untargeted = [env for env in config.environments if route.target_for(env) is None]
            if untargeted:
                findings.append(
                    Finding(
                        route.location,
                        "error",
                        "open-forward",
                        f'open route "{route.name}" has neither target_base_url nor match: in '
                        f"{', '.join(untargeted)} it forwards any caller to wherever the request names",
                    )
                )
    return findings


def _signature_rules(config: Config) -> list[Finding]:
    """A client with no signing secret, assigned to a route that requires signed requests: every
    request it makes there is refused. Fail closed, but never meant: an error."""
    findings: list[Finding] = []
    for assignment in config.assignments:
        route = config.routes[assignment.route]
        if not route.enabled or not route.requires_signature:
            continue
        for name in assignment.clients:
            if not config.clients[name].signing_secrets:
                findings.append(
                    Finding(
                        assignment.location,
                        "error",
                        "unsigned-client",
                        f'route "{route.name}" requires signed requests, but client "{name}" (assigned in '
                        f"{assignment.environment}) has no signing_secrets: its requests there are always refused",
                    )
                )
    return findings


def _unassigned_route_rules(config: Config) -> list[Finding]:
    """A route that requires clients, in an environment where none (enabled) is assigned:
    every caller is refused there. Fail closed, so only a warning, but rarely meant."""
    enabled = {c.name for c in config.clients.values() if c.enabled}
    served = {(a.route, a.environment) for a in config.assignments if any(n in enabled for n in a.clients)}
    default_env = config.settings.default_environment
    test_keys = any(k.type == "test" and k.enabled for k in config.api_keys.values())
    findings: list[Finding] = []
    for route in config.routes.values():
        if not route.enabled or not route.requires_clients:
            continue
        missing = [env for env in config.environments if (route.name, env) not in served]
        if not missing:
            continue
        but = " (except callers with a test key)" if test_keys and any(e != default_env for e in missing) else ""
        findings.append(
            Finding(
                route.location,
                "warning",
                "unassigned-route",
                f'route "{route.name}" requires clients but no enabled client is assigned to it in '
                f"{', '.join(missing)}: every caller is refused there{but}",
            )
        )
    return findings


def _trusted_proxy_rules(config: Config) -> list[Finding]:
    """A trusted proxy's X-Forwarded-For is believed: trusting every address lets any caller pick its IP.

    Settings carry no line in the model, so these findings name the config folder.
    """
    where = Location(config.folder, 0)
    header = config.settings.client_ip_header
    findings: list[Finding] = []
    for network in config.settings.trusted_proxies:
        if network.prefixlen == 0:
            findings.append(
                Finding(
                    where,
                    "error",
                    "trusted-proxies",
                    f"trusted_proxies holds {network}: any caller can choose its client IP with {header}",
                )
            )
        elif network.prefixlen < WIDE_PREFIX[network.version]:
            findings.append(
                Finding(
                    where,
                    "warning",
                    "trusted-proxies",
                    f"trusted_proxies holds {network} ({network.num_addresses:,} addresses): each of them can choose "
                    f"its client IP with {header}; list only your proxies",
                )
            )
    return findings


def _range_rules(config: Config) -> list[Finding]:
    """Duplicate and nested ranges, by one sort and a stack per address family.

    CIDR ranges never partly overlap: two are either disjoint or one contains the other.
    Sorted by start (widest first), each range overlaps exactly the ranges still open on
    the stack, and the innermost of those is on top. Findings are grouped per pair of
    clients, so that 100k nested ranges give one line per pair, not 100k.
    """
    entries: list[tuple[int, int, int, int, Client, IPNetwork]] = []
    for order, client in enumerate(config.clients.values()):
        for network in client.networks:
            start = int(network.network_address)
            end = int(network.broadcast_address)
            entries.append((network.version, start, -end, order, client, network))
    entries.sort(key=lambda e: e[:4])
    # (inner client, outer client) -> (count, inner network, outer network, same range?)
    pairs: dict[tuple[str, str], list] = {}
    stack: list[tuple[int, int, Client, IPNetwork]] = []
    version = 0
    for family, start, neg_end, _, client, network in entries:
        end = -neg_end
        if family != version:
            stack.clear()
            version = family
        while stack and stack[-1][1] < start:
            stack.pop()
        if stack:
            _, _, outer_client, outer_network = stack[-1]
            same = outer_network == network
            key = (client.name, outer_client.name)
            if key in pairs:
                pairs[key][0] += 1
            else:
                pairs[key] = [1, network, outer_network, same]
        stack.append((start, end, client, network))
    findings: list[Finding] = []
    for (inner_name, outer_name), (count, inner, outer, same) in pairs.items():
        more = f" (and {count - 1} more)" if count > 1 else ""
        inner_client = config.clients[inner_name]
        if inner_name == outer_name:
            what = f"lists {inner} twice" if same else f"lists {inner} inside its own {outer}"
            findings.append(
                Finding(inner_client.location, "warning", "duplicate-range", f'client "{inner_name}" {what}{more}')
            )
        else:
            relation = "the same range as" if same else "inside"
            outer_client = config.clients[outer_name]
            findings.append(
                Finding(
                    inner_client.location,
                    "warning",
                    "overlapping-range",
                    f'client "{inner_name}" range {inner} is {relation} client "{outer_name}" range {outer} '
                    f"({outer_client.location}){more}",
                )
            )
    return findings


def _under(prefix: str, parent: str) -> bool:
    """Is path prefix ``prefix`` strictly inside ``parent`` (whole segments)?"""
    return prefix != parent and (parent == "/" or prefix.startswith(parent + "/"))


def _shadow_rules(config: Config) -> list[Finding]:
    """Open any-host routes that win over a protected host's route (longest prefix first).

    In forward mode a request goes to the host it names. An open route with no hosts and no
    target, whose prefix is longer than a protected route's for some host, is chosen for
    that host's paths under its prefix: any caller reaches the protected host there.
    """
    routes = [r for r in config.routes.values() if r.enabled and r.match is not None]
    protected = [r for r in routes if r.requires_clients and r.match.hosts]  # type: ignore[union-attr]
    findings: list[Finding] = []
    for route in routes:
        match = route.match
        assert match is not None
        if route.requires_clients or match.hosts:
            continue
        untargeted = [env for env in config.environments if route.target_for(env) is None]
        if not untargeted:
            continue
        for other in protected:
            assert other.match is not None
            if _under(match.path_prefix, other.match.path_prefix):
                hosts = ", ".join(other.match.hosts)
                findings.append(
                    Finding(
                        route.location,
                        "error",
                        "open-shadows-host",
                        f'open route "{route.name}" (any host, path_prefix {match.path_prefix}, no target in '
                        f'{", ".join(untargeted)}) wins over route "{other.name}" ({hosts}, path_prefix '
                        f"{other.match.path_prefix}) by its longer prefix: in forward mode any caller reaches "
                        f"{hosts} under {match.path_prefix}; give it hosts or a target_base_url",
                    )
                )
    return findings
