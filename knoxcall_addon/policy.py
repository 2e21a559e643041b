"""Compile a validated Config into the lookup tables a request decision reads.

Everything that costs more than a dict or bisect lookup happens here, once per load.
"""

from __future__ import annotations

import gc
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from knoxcall_addon import yamlsource
from knoxcall_addon.ipmatch import RangeIndex
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ApiKey, Config, ConfigError, NetworkSet, Problem, Route
from knoxcall_addon.ratelimit import RateLimits
from knoxcall_addon.secretsource import compile_injections, store_secrets, store_url
from knoxcall_addon.signing import required_signatures, signing_keys

if TYPE_CHECKING:  # decision imports policy
    from knoxcall_addon.decision import Decision


@dataclass(frozen=True)
class RouteAccess:
    """Who may call one route in one environment."""

    allowed: frozenset[str]  # enabled clients assigned here
    assigned: frozenset[str]  # every client assigned here, enabled or not


class RouteTable:
    """Finds the route for a host and path: longest path prefix, then the most specific host."""

    def __init__(self, routes: list[Route]) -> None:
        self.exact: dict[str, dict[str, Route]] = {}
        self.wildcard: dict[str, dict[str, Route]] = {}
        self.any_host: dict[str, Route] = {}
        self.problems: list[Problem] = []
        for route in routes:
            if route.match is None or not route.enabled:
                continue
            prefix = route.match.path_prefix
            targets: list[dict[str, Route]] = []
            if not route.match.hosts:
                targets.append(self.any_host)
            for host in route.match.hosts:
                if host.startswith("*."):
                    targets.append(self.wildcard.setdefault(host[2:], {}))
                else:
                    targets.append(self.exact.setdefault(host, {}))
            for bucket in targets:
                other = bucket.get(prefix)
                if other is not None and other.name != route.name:
                    self.problems.append(
                        Problem(
                            route.location,
                            f"route {route.name!r} has the same match as route {other.name!r} "
                            f"({other.location}): hosts and path_prefix {prefix!r}",
                        )
                    )
                bucket.setdefault(prefix, route)
        # The deepest prefix and the longest wildcard domain bound what find() looks at:
        # a candidate with more segments (labels) than any key cannot be a key.
        buckets = [*self.exact.values(), *self.wildcard.values(), self.any_host]
        self.depth = max((_segments(prefix) for bucket in buckets for prefix in bucket), default=0)
        self.wildcard_labels = max((domain.count(".") + 1 for domain in self.wildcard), default=0)

    def find(self, host: str, path: str) -> Route | None:
        """The route for this host and path, or None. Linear in their lengths.

        Only the host suffixes and path prefixes that some route could name are made
        (at most ``wildcard_labels`` and ``depth + 1`` of them), so a caller's long host
        or deep path costs a few slices of it, not one string per label or segment.
        """
        buckets: list[dict[str, Route]] = []
        if (exact := self.exact.get(host)) is not None:
            buckets.append(exact)
        if self.wildcard:
            # Its last labels (at most as many as the longest wildcard domain has: the rest,
            # however long, stays in one piece); the host itself is never a suffix:
            # "*.example.com" is not "example.com".
            labels = host.rsplit(".", self.wildcard_labels)
            for i in range(1, len(labels)):
                if (bucket := self.wildcard.get(".".join(labels[i:]))) is not None:
                    buckets.append(bucket)
        if self.any_host:
            buckets.append(self.any_host)
        if not buckets:
            return None
        # The path's prefixes, longest first, each made only when the longer ones found
        # nothing; none deeper than the deepest path_prefix, as none of those is a key.
        prefix = _within(normalize_path(path), self.depth)
        while True:
            for bucket in buckets:
                if (route := bucket.get(prefix)) is not None:
                    return route
            if prefix == "/":
                return None
            prefix = prefix[: prefix.rfind("/")] or "/"


def _segments(prefix: str) -> int:
    """How many segments a normalised prefix has: ``/`` 0, ``/a`` 1, ``/a/b`` 2."""
    return 0 if prefix == "/" else prefix.count("/")


def _within(normalized: str, depth: int) -> str:
    """The first ``depth`` segments of a normalised path (all of a shallower one).

    One pass over the path, whatever its length and depth: what bounds route matching
    to linear time.
    """
    if normalized.count("/") <= depth:
        return normalized
    return "/".join(normalized.split("/", depth + 1)[:-1]) or "/"


# what makes normalize_path change a path that starts with "/" (besides a trailing "/")
_SPECIAL_IN_PATH = re.compile(r"[?#%\\]|//|/\.")


def normalize_path(path: str) -> str:
    """The path used for matching: no query, percent-decoded, dot segments and // resolved.

    Matching the path an upstream will most likely serve (not the raw one) keeps
    ``/open/../admin`` from being taken for a request under ``/open``.
    """
    if path.startswith("/") and not _SPECIAL_IN_PATH.search(path) and (path == "/" or not path.endswith("/")):
        return path  # nothing to decode or resolve: what the steps below would return
    path = path.split("?", 1)[0].split("#", 1)[0]
    path = unquote(path).replace("\\", "/")
    if not path.startswith("/"):
        path = "/" + path
    normalized = posixpath.normpath(path)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return normalized


def path_prefixes(path: str, depth: int | None = None) -> list[str]:
    """``/a/b/c`` -> ``/a/b/c``, ``/a/b``, ``/a``, ``/``: the prefixes a route may name.

    With ``depth``, only those of at most ``depth`` segments (``depth + 1`` prefixes at
    most): no route names a deeper one, and making one string per segment of a long
    path cost quadratic time and memory (a 40 KB path: 0.5 s and 360 MB).
    """
    normalized = normalize_path(path)
    if depth is not None:
        normalized = _within(normalized, depth)
    result = []
    while normalized not in ("/", ""):
        result.append(normalized)
        normalized = normalized[: normalized.rfind("/")]
    result.append("/")
    return result


class Policy:
    """A compiled, immutable config. Swapped whole on reload, never changed in place."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = config.version
        self.settings = config.settings
        self.clients_by_ip: RangeIndex[str] = _client_index(config)
        self.trusted_proxies: RangeIndex[bool] = RangeIndex((n, True) for n in config.settings.trusted_proxies)
        self.enabled_clients = frozenset(c.name for c in config.clients.values() if c.enabled)
        self.access: dict[tuple[str, str], RouteAccess] = {}
        for assignment in config.assignments:
            names = frozenset(assignment.clients)
            allowed = names & self.enabled_clients
            self.access[(assignment.route, assignment.environment)] = RouteAccess(
                allowed=names if len(allowed) == len(names) else allowed, assigned=names
            )
        self.routes = config.routes
        self.route_table = RouteTable(list(config.routes.values()))
        self.enabled_keys: tuple[ApiKey, ...] = tuple(k for k in config.api_keys.values() if k.enabled)
        # (route, environment) where the client check only reports its refusals (report-only rollout)
        self.report_only: frozenset[tuple[str, str]] = frozenset(
            (route.name, environment)
            for route in config.routes.values()
            for environment in config.environments
            if route.mode_for(environment, config.settings.mode) == "report"
        )
        self.any_open_route = any(r.enabled and not r.requires_clients for r in config.routes.values())
        self.any_test_key = any(k.type == "test" for k in self.enabled_keys)
        self.rate_limits = RateLimits(config)
        # decisions remembered by decision.decide: per policy, so a reload starts afresh
        self.decisions: dict[tuple[object, ...], Decision] = {}
        self.injections = compile_injections(config)  # (route, environment) -> headers to inject
        self.signatures = required_signatures(config)  # route -> its signature spec
        self.signing_keys = signing_keys(config)  # (client, environment) -> HMAC keys
        self.store_url = store_url(config)  # rate_limit_store with its secrets filled in: never shown
        self.store_secrets = store_secrets(config)  # ... and those secrets, to scrub from error texts
        if self.route_table.problems:
            raise ConfigError(self.route_table.problems)

    def access_for(self, route: str, environment: str) -> RouteAccess:
        return self.access.get((route, environment), _NO_ACCESS)


_NO_ACCESS = RouteAccess(frozenset(), frozenset())

# The last client index built, and what it was built from: an index depends only on
# the clients' names, order and networks, and is never changed, so a reload that
# leaves those alone (most edits) takes it as it is.
_last_client_index: tuple[tuple[tuple[str, NetworkSet], ...], RangeIndex[str]] | None = None


def forget_previous_load() -> None:
    """Make the next load start from scratch (what a fresh process does); for measurements and tests."""
    global _last_client_index
    _last_client_index = None
    yamlsource._last_parse = {}


def _client_index(config: Config) -> RangeIndex[str]:
    global _last_client_index
    key = tuple((client.name, client.networks) for client in config.clients.values())
    last = _last_client_index
    if last is not None and last[0] == key:
        return last[1]
    order = {name: i for i, name in enumerate(config.clients)}
    index: RangeIndex[str] = RangeIndex.from_intervals(
        (
            (version, start, end, client.name)
            for client in config.clients.values()
            for version, start, end in client.networks.intervals()
        ),
        order=order,
    )
    _last_client_index = (key, index)  # one assignment: safe with loads in other threads
    return index


def load_policy(folder: str | Path) -> Policy:
    """Load, validate and compile a config folder. Raises ConfigError.

    The cyclic garbage collector is paused meanwhile: loading allocates millions of
    objects that all stay alive until the end, and the full collections that this
    triggers over and over took half the load time of a 100k-range config. Nothing
    is lost: garbage cycles made meanwhile are collected after.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return Policy(load_config(folder))
    finally:
        if paused:
            gc.enable()
