"""Rate limits as the config writes them: reading and checking the YAML values, and the lint
rule for limits that can never be reached.

Pure (no mitmproxy, no I/O). The loader calls `read_rate_limit` and `read_rate_limit_settings`
so that every problem names file and line like any other; `knoxcall check` calls
`unreachable_limits`. A Redis URL may carry a password: no message here ever repeats it
(`redacted_url`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

from knoxcall_addon.model import Config, Location, Problem, RateLimit
from knoxcall_addon.yamlsource import LocatedDict

RATE_LIMIT_KEYS = ("requests", "window_sec", "burst", "mode")
RATE_LIMIT_SETTINGS = (
    "rate_limit_store",
    "rate_limit_headers",
    "rate_limit_on_store_error",
    "rate_limit_store_timeout_ms",
    "rate_limit_max_buckets",
)
# A bucket refills from empty to full in burst * window_sec / requests seconds. Bounded so that
# the Redis script's arithmetic (Lua numbers are doubles) stays exact: a year is 3.2e13 µs < 2**53.
MAX_REFILL_SECONDS = 366 * 86400
MAX_STORE_TIMEOUT_MS = 10_000
STORE_SCHEMES = ("redis", "rediss")


def read_rate_limit(
    mapping: LocatedDict, key: str, what: str, *, allow_false: bool = False
) -> tuple[RateLimit | Literal[False] | None, list[Problem]]:
    """``mapping[key]`` as a RateLimit (None when absent; False, where allowed, removes a limit)."""
    if key not in mapping:
        return None, []
    value = mapping[key]
    where = mapping.where(key)
    label = f"{what} {key}"
    if value is False and allow_false:
        return False, []
    if not isinstance(value, LocatedDict):
        hint = ", or false to remove the route's limit here" if allow_false else ""
        return None, [Problem(where, f"{label} must be a mapping like {{requests: 100, window_sec: 60}}{hint}")]
    problems: list[Problem] = []
    for name in value:
        if name not in RATE_LIMIT_KEYS:
            close = difflib.get_close_matches(str(name), RATE_LIMIT_KEYS, n=1)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(RATE_LIMIT_KEYS)
            message = f"unknown key {name!r} in {label}{suggestion}; allowed: {allowed}"
            problems.append(Problem(value.where(name), message))
    requests = _whole(value, "requests", label, problems)
    window = value.get("window_sec")
    if "window_sec" not in value:
        problems.append(Problem(value.location, f"{label} is missing required key 'window_sec'"))
    elif isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
        problems.append(Problem(value.where("window_sec"), f"{label}: window_sec must be a number of seconds above 0"))
        window = None
    elif round(window * 1_000_000) < 1:
        problems.append(Problem(value.where("window_sec"), f"{label}: window_sec must be at least 0.000001"))
        window = None
    burst = _whole(value, "burst", label, problems, default=requests)
    mode = value.get("mode", "enforce")
    if mode not in ("enforce", "report"):
        problems.append(Problem(value.where("mode"), f"{label}: mode must be 'enforce' or 'report'"))
    if problems or requests is None or window is None or burst is None:
        return None, problems
    if window > MAX_REFILL_SECONDS or burst * window / requests > MAX_REFILL_SECONDS:
        days = burst * window / requests / 86400
        most = MAX_REFILL_SECONDS // 86400
        message = f"{label}: an empty bucket would take {days:.0f} days to refill (burst * window_sec / requests)"
        return None, [Problem(where, f"{message}; at most {most} days")]
    return RateLimit(requests=requests, window_sec=window, burst=burst, mode=mode), []


def _whole(value: LocatedDict, key: str, label: str, problems: list[Problem], default: Any = ...) -> int | None:
    """A whole number of at least 1 (a bool is no number, 2.0 is)."""
    if key not in value:
        if default is ...:
            problems.append(Problem(value.location, f"{label} is missing required key {key!r}"))
            return None
        return default
    number = value[key]
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        problems.append(Problem(value.where(key), f"{label}: {key} must be a whole number of at least 1"))
        return None
    return number


def read_rate_limit_settings(
    values: dict[str, Any], where: dict[str, Location]
) -> tuple[dict[str, Any], list[Problem]]:
    """The rate limit keys of ``settings`` as Settings fields (only those given), and their problems."""
    result: dict[str, Any] = {}
    problems: list[Problem] = []
    for key in RATE_LIMIT_SETTINGS:
        if key not in values:
            continue
        value = values[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "rate_limit_store":
            # with {{secret:NAME}} in it, the loader checks the URL once the secrets are read
            problem = None if isinstance(value, str) and "{{secret:" in value else store_url_problem(value)
        elif key == "rate_limit_headers":
            problem = None if isinstance(value, bool) else "must be true or false"
        elif key == "rate_limit_on_store_error":
            problem = None if value in ("local", "allow", "deny") else "must be 'local', 'allow' or 'deny'"
        elif key == "rate_limit_store_timeout_ms":
            ok = number and 0 < value <= MAX_STORE_TIMEOUT_MS
            problem = None if ok else f"must be a number of milliseconds above 0, at most {MAX_STORE_TIMEOUT_MS}"
            value = float(value) if ok else value
        else:  # rate_limit_max_buckets
            ok = number and isinstance(value, int) and value >= 1
            problem = None if ok else "must be a whole number of at least 1"
        if problem:
            problems.append(Problem(where[key], f"settings.{key} {problem}"))
        else:
            result[key] = value
    return result, problems


def store_url_problem(store: Any) -> str | None:
    """Why ``store`` is no valid rate_limit_store (words that never repeat a password); None if it is."""
    if store == "memory":
        return None
    expected = "must be 'memory' or a URL redis://HOST:PORT/DB (rediss:// for TLS)"
    if not isinstance(store, str):
        return expected
    shown = redacted_url(store)
    try:
        parts = urlsplit(store)
        port = parts.port
    except ValueError:
        return f"{expected}, not {shown} (bad port?)"
    if parts.scheme not in STORE_SCHEMES or not parts.hostname or port == 0:
        return f"{expected}, not {shown}"
    if parts.query or parts.fragment:
        return f"takes no query or fragment ({shown}); write a password as redis://:PASSWORD@HOST:PORT/DB"
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        return f"must name the database by its number, as in redis://HOST:PORT/0, not {shown}"
    return None


def redacted_url(url: str) -> str:
    """The store URL as logs, status and errors may show it: any password (and query) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if url == "memory" else "***"
    userinfo, at, hostpart = rest.rpartition("@")
    for mark in "?#":
        if mark in hostpart:
            hostpart = hostpart.split(mark, 1)[0] + mark + "***"
    if not at:
        return f"{scheme}://{hostpart}"
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{scheme}://{user}:***@{hostpart}"
    return f"{scheme}://***@{hostpart}"  # a lone userinfo is taken as a password by redis-py


# -- knoxcall check -------------------------------------------------------------------------


def unreachable_limits(config: Config) -> Iterator[tuple[Location, str]]:
    """Limits that can never refuse anything, because an enforced limit that counts a superset
    of their requests is as strict or stricter in both rate and burst (lint ``unreachable-limit``).
    """
    for route in config.routes.values():
        for environment in config.environments:
            whole, each = route.rate_limit_for(environment), route.client_rate_limit_for(environment)
            if whole is not None and each is not None and _stricter(whole, each):
                yield (
                    route.location,
                    f'route "{route.name}" in {environment}: the per-caller limit ({describe(each)}) can never be '
                    f"reached: the limit of the whole route ({describe(whole)}) is as strict",
                )
    routes_of: dict[str, set[str]] = {}
    envs_of: dict[tuple[str, str], list[str]] = {}
    for assignment in config.assignments:
        for client in assignment.clients:
            routes_of.setdefault(client, set()).add(assignment.route)
            envs_of.setdefault((client, assignment.route), []).append(assignment.environment)
    for client in config.clients.values():
        routes = routes_of.get(client.name, set())
        if client.rate_limit is None or len(routes) != 1:
            continue
        (only,) = routes
        route = config.routes[only]
        limits = [route.rate_limit_for(env) for env in envs_of[(client.name, only)]]
        if limits and all(lim is not None and _stricter(lim, client.rate_limit) for lim in limits):
            yield (
                client.location,
                f'client "{client.name}": its limit ({describe(client.rate_limit)}) can never be reached: it is '
                f'assigned only to route "{only}", whose limit for all callers ({describe(limits[0])}) is as strict',
            )


def _stricter(strict: RateLimit, other: RateLimit) -> bool:
    """Does ``strict`` (enforced) refuse no later than ``other`` on the same requests?"""
    return (
        strict.mode == "enforce"
        and strict.burst <= other.burst
        and strict.requests * other.window_sec <= other.requests * strict.window_sec
    )


def describe(limit: RateLimit) -> str:
    """``100 per 60 s, burst 20`` (``, report only``)."""
    window = f"{limit.window_sec:g}"
    text = f"{limit.requests} per {window} s"
    if limit.burst != limit.requests:
        text += f", burst {limit.burst}"
    if limit.mode == "report":
        text += ", report only"
    return text
