"""Rate limits: which buckets a request uses, the token bucket arithmetic, and what a full
bucket answers. Pure (no mitmproxy, no I/O, no clock of its own: the caller passes "now").

The bucket is GCRA, which is a token bucket written with one number per bucket: its
theoretical arrival time (TAT), the time at which the bucket is full again. Capacity
``burst``, refilled at ``requests / window_sec`` per second: each request moves the TAT on
by the emission interval I = window_sec / requests, and is let through when the TAT after
it is at most ``burst * I`` ahead of now. Over any interval of T seconds that lets at most
``burst + T * requests / window_sec`` requests through.

Exact integers, no floating point: times are in microseconds, and a TAT is kept in units of
1/requests µs, so that I is the whole number ``window_us``. The Redis store runs the same
steps in Lua (ratestore.py); `step` is the reference for both.

Compiled once per policy (`RateLimits`); per request only dict lookups and a few integer
operations.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from knoxcall_addon.model import Config, RateLimit
from knoxcall_addon.rateconfig import describe

if TYPE_CHECKING:  # decision imports policy, which compiles RateLimits
    from knoxcall_addon.decision import Decision

KINDS = ("client", "route", "client_route")
CALLER_SEPARATOR = "#"  # between a per-caller limit's prefix and the caller (never in a name)
RATE_LIMITED = "rate_limited"
STORE_UNAVAILABLE = "rate_limit_unavailable"


@dataclass(frozen=True, slots=True)
class CompiledLimit:
    """One configured limit, ready for arithmetic.

    ``prefix`` names its buckets: the kind, the names it belongs to and the numbers (not the
    mode). A reload that leaves a limit's numbers alone keeps its prefix, and so its buckets'
    state; a changed limit gets a new prefix, i.e. fresh (full) buckets.
    """

    kind: str  # client | route | client_route
    scope: str  # "partner-acme", "payments in production": for people
    spec: RateLimit
    prefix: str
    requests: int
    window_us: int  # the emission interval, in 1/requests µs
    cap: int  # burst * window_us: how far ahead of now the TAT may be
    enforce: bool

    @classmethod
    def of(cls, kind: str, scope: str, names: tuple[str, ...], spec: RateLimit) -> CompiledLimit:
        window_us = max(1, round(spec.window_sec * 1_000_000))
        prefix = "|".join((kind, *names, f"{spec.requests}/{window_us}/{spec.burst}"))
        return cls(kind, scope, spec, prefix, spec.requests, window_us, spec.burst * window_us, spec.mode == "enforce")


Check = tuple[CompiledLimit, str]  # a limit and the key of the bucket this request uses


class RateLimits:
    """The limits of one policy, compiled at load: per request only lookups (see `checks`)."""

    def __init__(self, config: Config) -> None:
        self.clients: dict[str, CompiledLimit] = {}
        # (route, environment) -> (the whole route's limit, the per-caller limit)
        self.routes: dict[tuple[str, str], tuple[CompiledLimit | None, CompiledLimit | None]] = {}
        for client in config.clients.values():
            if client.rate_limit is not None and client.enabled:
                self.clients[client.name] = CompiledLimit.of("client", client.name, (client.name,), client.rate_limit)
        for route in config.routes.values():
            for environment in config.environments:
                whole, each = route.rate_limit_for(environment), route.client_rate_limit_for(environment)
                if whole is None and each is None:
                    continue
                names = (route.name, environment)
                scope = f"{route.name} in {environment}"
                self.routes[names] = (
                    CompiledLimit.of("route", scope, names, whole) if whole else None,
                    CompiledLimit.of("client_route", scope, names, each) if each else None,
                )
        self.any = bool(self.clients or self.routes)
        self._checks: dict[int, tuple[Decision, list[Check]]] = {}  # see checks
        every = [*self.clients.values(), *(limit for pair in self.routes.values() for limit in pair if limit)]
        self.by_prefix: dict[str, CompiledLimit] = {limit.prefix: limit for limit in every}

    def checks(self, decision: Decision) -> list[Check]:
        """The buckets an allowed request uses, in the order client, route, per caller; [] for none.

        Made once per decision object (decide() hands out remembered decisions again and
        again; a decision never changes): the list is shared, so it is read only.
        """
        if not self.any or not decision.allowed or decision.route is None:
            return []
        known = self._checks.get(id(decision))
        if known is not None and known[0] is decision:
            return known[1]
        result = self.checks_plain(decision)
        if len(self._checks) >= _CHECKS_KEPT:
            self._checks.clear()
        self._checks[id(decision)] = (decision, result)  # the decision kept: its id is not reused meanwhile
        return result

    def checks_plain(self, decision: Decision) -> list[Check]:
        """`checks`, made afresh."""
        if not self.any or not decision.allowed or decision.route is None:
            return []
        result: list[Check] = []
        if decision.client is not None:
            limit = self.clients.get(decision.client)
            if limit is not None:
                result.append((limit, limit.prefix))
        pair = self.routes.get((decision.route, decision.environment or ""))
        if pair is not None:
            whole, each = pair
            if whole is not None:
                result.append((whole, whole.prefix))
            if each is not None:
                result.append((each, each.prefix + CALLER_SEPARATOR + caller_of(decision)))
        return result


_CHECKS_KEPT = 1024

# -- the caller ------------------------------------------------------------------------------

_callers: dict[str, str] = {}
_CALLERS_KEPT = 4096


def caller_of(decision: Decision) -> str:
    """Who a per-caller limit counts: the matched client's name, else the client IP, with an
    IPv6 address counted by its /64 (a host gets a /64 and could step through it)."""
    if decision.client is not None:
        return "client:" + decision.client
    ip = decision.client_ip or "-"
    caller = _callers.get(ip)
    if caller is None:
        caller = "ip:" + _network_of(ip)
        if len(_callers) >= _CALLERS_KEPT:
            _callers.clear()
        _callers[ip] = caller
    return caller


def _network_of(ip: str) -> str:
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    return str(ipaddress.IPv6Network((address.packed[:8] + bytes(8), 64)))


# -- the arithmetic --------------------------------------------------------------------------


def step(limit: CompiledLimit, tat: int | None, now_us: int) -> tuple[bool, int]:
    """(is there room for one more request, the bucket's TAT after it). ``tat`` None: full."""
    now = now_us * limit.requests
    after = (tat if tat is not None and tat > now else now) + limit.window_us
    return after - now <= limit.cap, after


class Consumed(NamedTuple):
    """What one request did to its buckets: all or nothing for the enforced limits.

    (NamedTuples, here and below: made once per limited request, a dataclass's __init__
    cost more than the arithmetic.)
    """

    refused: bool  # an enforced limit had no room: nothing was taken from any bucket
    room: tuple[bool, ...]  # per check: did this bucket have room
    tats: tuple[int | None, ...]  # per check: the bucket's TAT now (taken from, or untouched)


def consume(limits: Sequence[CompiledLimit], tats: Sequence[int | None], now_us: int) -> Consumed:
    """Check every bucket, then take one token from each that has room, unless an enforced
    limit has none: then take nothing. Report-only limits without room are let through."""
    if len(limits) == 1:  # the usual case, without the lists
        ok, after = step(limits[0], tats[0], now_us)
        if ok:
            return Consumed(False, (True,), (after,))
        return Consumed(limits[0].enforce, (False,), (tats[0],))
    room: list[bool] = []
    afters: list[int] = []
    refused = False
    for limit, tat in zip(limits, tats, strict=True):
        ok, after = step(limit, tat, now_us)
        room.append(ok)
        afters.append(after)
        if not ok and limit.enforce:
            refused = True
    if refused:
        return Consumed(True, tuple(room), tuple(tats))
    new = tuple(after if ok else tat for ok, after, tat in zip(room, afters, tats, strict=True))
    return Consumed(False, tuple(room), new)


def level_of(limit: CompiledLimit, tat: int | None, now_us: int) -> int:
    """How far the TAT is ahead of now (0: the bucket is full), in 1/requests µs."""
    now = now_us * limit.requests
    return tat - now if tat is not None and tat > now else 0


def remaining(limit: CompiledLimit, tat: int | None, now_us: int) -> int:
    """Whole tokens in the bucket now."""
    return max(0, (limit.cap - level_of(limit, tat, now_us)) // limit.window_us)


def until_full_us(limit: CompiledLimit, tat: int | None, now_us: int) -> int:
    """Microseconds until the bucket is full again (0: full)."""
    return -(-level_of(limit, tat, now_us) // limit.requests)


def retry_after(limit: CompiledLimit, tat: int | None, now_us: int) -> int:
    """Whole seconds, at least 1, until this bucket has room for a request again."""
    wait = level_of(limit, tat, now_us) + limit.window_us - limit.cap
    wait_us = -(-max(0, wait) // limit.requests)
    return max(1, -(-wait_us // 1_000_000))


class Outcome(NamedTuple):
    """A request's result against its limits: what the proxy answers, logs and sends as headers."""

    refused: bool  # an enforced limit refused: 429
    exceeded: CompiledLimit | None  # the limit without room (enforced, or report-only); None: all had room
    retry_after: int  # whole seconds until the exceeded limit would let the request through; 0 if none
    shown: CompiledLimit  # the exceeded limit, else the most constrained one: the X-RateLimit-* headers
    remaining: int
    reset_in_us: int  # until `shown` is full again

    def info(self, wall_now: float) -> dict[str, Any]:
        """``rate_limit`` of the flow metadata and the access log; ``reset`` is Unix time."""
        result: dict[str, Any] = {
            "kind": self.shown.kind,
            "limit": self.shown.spec.burst,
            "remaining": self.remaining,
            "reset": math.ceil(wall_now + self.reset_in_us / 1_000_000),
        }
        if self.exceeded is not None and not self.refused:
            result["report_only"] = True
        return result


def outcome(checks: Sequence[Check], consumed: Consumed, now_us: int) -> Outcome:
    """Sum up `consume`'s result: which limit to name, and the numbers of the headers.

    Named: the limit without room that the caller must wait longest for (among the enforced
    ones when refused); when all had room, the one with the fewest tokens left (then the one
    longest to refill).
    """
    exceeded: CompiledLimit | None = None
    wait = 0
    shown: CompiledLimit | None = None
    best: tuple[int, int] = (0, 0)
    for (limit, _), ok, tat in zip(checks, consumed.room, consumed.tats, strict=True):
        level = level_of(limit, tat, now_us)
        if not ok:
            if limit.enforce or not consumed.refused:
                seconds = retry_after(limit, tat, now_us)
                if seconds > wait:
                    exceeded, wait, shown, best = limit, seconds, limit, (0, level)
        elif exceeded is None:
            tokens = (limit.cap - level) // limit.window_us
            reset_in = -(-level // limit.requests)
            if shown is None or (tokens, -reset_in) < (best[0], -best[1]):
                shown, best = limit, (tokens, reset_in)
    assert shown is not None
    if exceeded is not None:
        best = (0, -(-best[1] // exceeded.requests))
    return Outcome(consumed.refused, exceeded, wait, shown, max(0, best[0]), best[1])


# -- what the proxy does with it -------------------------------------------------------------


def limited_decision(decision: Decision, result: Outcome) -> Decision:
    """The decision after the limits: unchanged when every limit had room; ``rate_limited``
    allowed (report-only) or refused (429) otherwise."""
    limit = result.exceeded
    if limit is None:
        return decision
    detail = f"{limit.kind} limit of {limit.scope} ({describe(limit.spec)}) exceeded"
    detail += f", retry after {result.retry_after} s"
    if not result.refused:
        return dataclasses.replace(decision, reason=RATE_LIMITED, detail=f"report-only: {detail}", report_only=True)
    body = {"error": "Rate limit exceeded", "status": 429, "limit": limit.kind, "retry_after": result.retry_after}
    return dataclasses.replace(
        decision, allowed=False, reason=RATE_LIMITED, status=429, target_url=None, body=body, detail=detail
    )


def unavailable_decision(decision: Decision, detail: str) -> Decision:
    """The decision when the shared store cannot be asked and the settings say deny (503)."""
    body = {"error": "Rate limit store unavailable", "status": 503}
    return dataclasses.replace(
        decision, allowed=False, reason=STORE_UNAVAILABLE, status=503, target_url=None, body=body, detail=detail
    )


HEADER_NAMES = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
_HEADER_NAMES_LOWER = tuple(name.lower().encode() for name in HEADER_NAMES)


def header_fields(info: dict[str, Any], present: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The X-RateLimit-* fields to append to a response's ``present`` fields: none when the
    response (i.e. the upstream) has any of them already, so that its own are left alone."""
    for name, _ in present:
        if name.lower() in _HEADER_NAMES_LOWER:
            return ()
    return (
        (b"X-RateLimit-Limit", str(info["limit"]).encode()),
        (b"X-RateLimit-Remaining", str(info["remaining"]).encode()),
        (b"X-RateLimit-Reset", str(info["reset"]).encode()),
    )


def explain_lines(limits: RateLimits, decision: Decision) -> list[str]:
    """For `knoxcall explain`: the limits an allowed request would be counted against."""
    checks = limits.checks(decision)
    if not decision.allowed:
        return []
    if not checks:
        return ["  rate limits: none apply"]
    lines = ["  rate limits (checked last, all at once; explain takes no token):"]
    for limit, key in checks:
        if limit.kind == "client":
            who = f"client {limit.scope}, over all its routes"
        elif limit.kind == "route":
            who = f"route {limit.scope}, all callers together"
        else:
            who = f"each caller on {limit.scope}; this one is {key.split(CALLER_SEPARATOR, 1)[1]}"
        lines.append(f"    {limit.kind}: {describe(limit.spec)} ({who})")
    return lines
