"""The request path's fast paths of issue 15 give exactly what the plain code gives.

Each exists for instructions per request only (scripts/bench --sections instructions);
each is compared here, on many random inputs, with the code it stands in for.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from knoxcall_addon.decision import _decision
from knoxcall_addon.model import RateLimit
from knoxcall_addon.ratelimit import CompiledLimit, limited_decision, outcome
from knoxcall_addon.ratestore import RateLimiter

SECOND = 1_000_000
ALLOWED = _decision(True, "client", 0, {"client_ip": "10.0.0.1", "peer_ip": "10.0.0.1", "route": "r",
                                         "environment": "production", "client": "a"})  # fmt: skip


# -- rate limits: one bucket with room ------------------------------------------------------


class Clock:
    """A fake monotonic clock in µs, moved on by the test."""

    def __init__(self) -> None:
        self.now = 5_000 * SECOND

    def __call__(self) -> int:
        return self.now


def plain_local(limiter: RateLimiter, decision: Any, checks: list[Any]) -> tuple[Any, Any]:
    """RateLimiter._local before its fast path."""
    consumed, now = limiter.local.consume(checks)
    result = outcome(checks, consumed, now)
    return limited_decision(decision, result), result.info(time.time())


def random_limit(rng: random.Random, kind: str) -> CompiledLimit:
    requests = rng.choice([1, 2, 3, 10, 100, 7_000])
    window = rng.choice([0.5, 1, 7, 60, 3600])
    burst = rng.choice([None, 1, 2, 5, requests])
    spec = RateLimit(requests, window, burst if burst is not None else requests, rng.choice(["enforce", "report"]))
    return CompiledLimit.of(kind, "t", (kind, str(rng.random())), spec)


@pytest.mark.parametrize("seed", range(6))
def test_one_bucket_fast_path_gives_what_consume_and_outcome_give(seed, monkeypatch) -> None:
    rng = random.Random(seed)
    clocks = Clock(), Clock()
    fast, plain = RateLimiter(clock=clocks[0]), RateLimiter(clock=clocks[1])
    bound = rng.choice([3, 50])  # small: also the bound's drops and sweeps
    for limiter in (fast, plain):
        limiter.local.max_buckets = bound
    limits = [random_limit(rng, rng.choice(["client", "route", "client_route"])) for _ in range(4)]
    for limiter in (fast, plain):
        limiter.local.limits = {lim.prefix: lim for lim in limits}
    decision = ALLOWED
    wall = [1_700_000_000.25]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    for _ in range(600):
        step_us = rng.choice([0, 0, 1, 999, 50_000, 2 * SECOND, 3600 * SECOND])
        for clock in clocks:
            clock.now += step_us
        wall[0] += step_us / SECOND
        chosen = rng.sample(limits, rng.choice([1, 1, 1, 2]))
        checks = [(lim, lim.prefix + rng.choice(["", "#ip:10.0.0.1", "#client:a", "#x" + str(rng.randrange(8))]))
                  for lim in chosen]  # fmt: skip
        got = fast._local(decision, checks)
        want = plain_local(plain, decision, checks)
        assert got == want
        assert (got[0] is decision) == (want[0] is decision)
        assert list(fast.local.buckets.items()) == list(plain.local.buckets.items())  # values and LRU order
        assert fast.local.dropped_early == plain.local.dropped_early


# -- decide: remembered decisions -------------------------------------------------------------

PEERS = ["10.0.0.7", "10.0.1.5", "10.0.2.9", "10.0.3.3", "203.0.113.9", "127.0.0.50", "10.9.1.1", "2001:db8::5",
         "::ffff:10.0.0.7", "not-an-ip", ""]  # fmt: skip
METHODS = ["GET", "GET", "POST", "DELETE", "get", "G ET", "PATCH"]
HOSTS = ["api.example.com", "api.example.com", "API.example.com.", "x.eu.example.com", "off.example.com",
         "2130706433", "[::1]", "", "ex ample"]  # fmt: skip
ROUTES = [None, "api", "admin", "health", "keyed", "header-only", "header-only", "off", "nope", "wild", "anyhost"]
ENVIRONMENTS = [None, None, "staging", "development", "nope"]
KEYS = [None, None, None, None, "live-secret", "test-secret", "bad"]
FORWARDED = [(), (), ("10.0.0.7",), ("203.0.113.5, 10.0.0.7",), ("garbage",)]
OTHERS = [(), (), ("api.example.com",), ("evil.example.com",)]
AUTHORITIES = [None, None, None, "a@b"]
PATHS = ["/v1/users", "/v1/users/7", "/v1/admin/x", "/health", "/anything/1", "/v10", "/", "/a/../b", "/x%2fy",
         "/v1/users?q=1", "x", "/" + "a" * 9000, "/v1//users", "/v1/%7e"]  # fmt: skip


@pytest.fixture(scope="module")
def decision_policy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from knoxcall_addon.policy import load_policy
    from tests.test_decision import CONFIG

    folder = tmp_path_factory.mktemp("hotpath-decide")
    (folder / "config.yaml").write_text(CONFIG)
    return load_policy(folder)


@pytest.mark.parametrize("seed", range(4))
def test_remembered_decisions_are_the_plain_ones(decision_policy, seed) -> None:
    from knoxcall_addon.decision import RequestFacts, decide, decide_plain, summary_of
    from knoxcall_addon.gate import request_meta

    rng = random.Random(seed)
    decision_policy.decisions.clear()
    hits = 0
    # callers that come back (peer, method, host, route, ...), each time with some path
    callers = [
        dict(peer=rng.choice(PEERS), method=rng.choice(METHODS), host=rng.choice(HOSTS), route=rng.choice(ROUTES),
             environment=rng.choice(ENVIRONMENTS), api_key=rng.choice(KEYS), forwarded_for=rng.choice(FORWARDED),
             other_hosts=rng.choice(OTHERS), bad_authority=rng.choice(AUTHORITIES))
        for _ in range(60)
    ]  # fmt: skip
    for _ in range(3000):
        facts = RequestFacts(path=rng.choice(PATHS), **rng.choice(callers))
        remembered = {id(d) for d in decision_policy.decisions.values()}
        got = decide(decision_policy, facts)
        want = decide_plain(decision_policy, facts)
        assert got == want, facts
        assert list(vars(got).items()) == list(vars(want).items())
        hits += id(got) in remembered
        assert summary_of(got) == want.summary()
        meta = request_meta(got, "id", facts.method, "h", facts.path, "ua", {"kind": "client"})
        assert list(meta.items()) == list(plain_meta(want, "id", facts.method, "h", facts.path, "ua",
                                                     {"kind": "client"}).items())  # fmt: skip
    assert hits > 100  # the remembered ones were used, not only made
    # only requests whose decision the path did not make are remembered
    for decision in decision_policy.decisions.values():
        assert decision.reason not in ("uri_too_long", "path_not_canonical")


# -- canonical: the usual path and method without a regex --------------------------------------


def plain_path_problem(target: str) -> str | None:
    """canonical.path_problem before its set test."""
    from knoxcall_addon import canonical

    path = target.partition("?")[0]
    if not path.startswith("/"):
        return "the path does not start with '/'"
    if canonical._SUSPECT.search(path) is None:
        return None
    return canonical._full_path_check(path)


PATH_PIECES = ["/", "a", "Z", "0", "-", ".", "..", "_", "~", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=", ":",
               "@", "%", "%2e", "%2F", "%41", "%e2%80%a8", "%zz", "?", "#", " ", "\\", "\t", "é", "\u212a", "[", "|",
               "//", "/./", "/../", "/.", "/..", ".a"]  # fmt: skip


def test_path_problem_without_the_regex_is_the_plain_one() -> None:
    from knoxcall_addon.canonical import path_problem

    rng = random.Random(15)
    for _ in range(30_000):
        target = "".join(rng.choice(PATH_PIECES) for _ in range(rng.randrange(0, 9)))
        if rng.random() < 0.8:
            target = "/" + target
        assert path_problem(target) == plain_path_problem(target), target


def test_the_usual_methods_are_tokens() -> None:
    from knoxcall_addon import canonical

    for method in canonical._COMMON_METHODS:
        assert canonical._METHOD.fullmatch(method)
        assert canonical.method_problem(method) is None
    for method in ("get", "G ET", "", "GET\r\n", "PO\u0405T"):
        assert (canonical.method_problem(method) is None) == (canonical._METHOD.fullmatch(method) is not None)


# -- request ids ------------------------------------------------------------------------------


def test_request_ids_are_the_formatted_scrambled_counter(monkeypatch) -> None:
    import itertools

    from knoxcall_addon import gate

    rng = random.Random(3)
    for n in [0, 1, 2**63, 2**64 - 1, *(rng.getrandbits(64) for _ in range(2000))]:
        # counter k with k * factor + offset == n (mod 2**64): factor 1, offset n - 1, k == 1
        monkeypatch.setattr(gate, "_request_counter", itertools.count(1))
        monkeypatch.setattr(gate, "_REQUEST_ID_FACTOR", 1)
        monkeypatch.setattr(gate, "_REQUEST_ID_OFFSET", n - 1 + rng.choice([0, 2**64, 5 * 2**64]))
        assert gate.new_request_id() == f"{gate._REQUEST_ID_PREFIX}{n:016x}"


def plain_meta(decision: Any, request_id: str, method: str, host: str, path: str, agent: Any, limit: Any) -> dict:
    """KnoxCall._settle's metadata before gate.request_meta."""
    return {"request_id": request_id, "method": method, "host": host, "path": path, "user_agent": agent,
            **decision.fields(), "rate_limit": limit}  # fmt: skip


def test_summaries_and_metadata_follow_the_decision_object_not_its_id() -> None:
    """Decisions made and dropped one after the other often get the same id: the cache must not mix them up."""
    from knoxcall_addon.decision import _decision, summary_of
    from knoxcall_addon.gate import request_meta

    rng = random.Random(9)
    for i in range(3000):
        client = rng.choice(["a", "b", None])
        made = _decision(rng.random() < 0.5, rng.choice(["client", "open_route"]), 0,
                         {"client_ip": f"10.0.0.{i % 250}", "peer_ip": "10.0.0.1", "client": client})  # fmt: skip
        assert summary_of(made) == made.summary()
        meta = request_meta(made, str(i), "GET", "h", "/", None, None)
        assert list(meta.items()) == list(plain_meta(made, str(i), "GET", "h", "/", None, None).items())
        meta["status"] = 200  # the proxy fills in a copy: the next request's must not see it
        assert request_meta(made, "x", "GET", "h", "/", None, None)["status"] == made.status


# -- the response's headers ----------------------------------------------------------------------


def plain_response_headers(headers: Any, request_id: str, rate_limit: Any) -> None:
    """KnoxCall.responseheaders before gate.with_our_headers."""
    from knoxcall_addon.decision import REQUEST_ID_HEADER
    from knoxcall_addon.gate import REQUEST_ID_BYTES
    from knoxcall_addon.ratelimit import header_fields

    fields = headers.fields
    if rate_limit is not None:
        headers.fields = fields = fields + header_fields(rate_limit, fields)
    for name, _ in fields:
        if name.lower() == REQUEST_ID_BYTES:
            headers[REQUEST_ID_HEADER] = request_id
            return
    headers.fields = (*fields, (REQUEST_ID_BYTES, request_id.encode()))


UPSTREAM_FIELDS = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"2"), (b"X-Knoxcall-Request-Id", b"up"),
                   (b"x-knoxcall-request-id", b"up2"), (b"X-RateLimit-Remaining", b"7"), (b"x-ratelimit-limit", b"9"),
                   (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Other", b"\xff")]  # fmt: skip


def test_our_response_headers_in_one_pass_are_the_plain_ones() -> None:
    from mitmproxy.http import Headers

    from knoxcall_addon.gate import add_our_headers

    rng = random.Random(11)
    for _ in range(4000):
        upstream = rng.sample(UPSTREAM_FIELDS, rng.randint(0, 5))
        numbers = {"limit": rng.randint(1, 10**9), "remaining": rng.randint(0, 10**9), "reset": rng.randint(0, 2**40)}
        rate_limit = rng.choice([None, {"kind": "client", **numbers}])
        request_id = f"{rng.getrandbits(128):032x}"
        want, got = Headers(list(upstream)), Headers(list(upstream))
        plain_response_headers(want, request_id, rate_limit)
        add_our_headers(got, request_id, rate_limit)
        assert got.fields == want.fields, upstream


# -- the proxy's read-and-decide --------------------------------------------------------------


def test_decide_request_is_read_request_then_decide(decision_policy) -> None:
    """gate.decide_request (decide_values: no facts made for a remembered decision) gives
    what read_request and decide give, on random requests (tests/test_request_path.py's)."""
    from knoxcall_addon.decision import decide
    from knoxcall_addon.gate import decide_request, read_request
    from tests.test_request_path import random_flow

    rng = random.Random(21)
    flows = [random_flow(rng) for _ in range(300)]
    for _ in range(6):  # again and again: remembered decisions too
        for flow in flows:
            method, path = flow.request.method, flow.request.path
            facts, caller_host, user_agent = read_request(flow, decision_policy, method, path)
            got = decide_request(flow, decision_policy, method, path)
            assert got == (decide(decision_policy, facts), caller_host, user_agent)
            assert list(vars(got[0]).items()) == list(vars(decide(decision_policy, facts)).items())


# -- forward: the header rewrite -------------------------------------------------------------


def former_forward(flow: Any, decision: Any, policy: Any) -> None:
    """gate.forward's header rewrite before its lazily made XFF list (a7eea8b), as the reference."""
    from knoxcall_addon.gate import _PREFIX_BYTES, _XFF_BYTES, PROXY_HEADERS, _is_ours, peer_host
    from knoxcall_addon.ipmatch import parse_ip

    request = flow.request
    peer = decision.peer_ip or peer_host(flow)
    fields: list[tuple[bytes, bytes]] = []
    forwarded: list[bytes] = []
    forwarded_at = -1
    forwarded_name = b"X-Forwarded-For"
    trusted = None
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


FORWARD_POOL = [(b"Host", b"api.example.com"), (b"X-Forwarded-For", b"203.0.113.9"), (b"x-forwarded-for", b"10.0.0.1"),
                (b"X-FORWARDED-FOR", b""), (b"Forwarded", b"for=1.2.3.4"), (b"X-Real-IP", b"192.0.2.1"),
                (b"x-knoxcall-route", b"api"), (b"X-KnoxCall-Key", b"k"), (b"x-knoxcall-\xc3\xa9", b"z"),
                (b"X-Forwarded-Host", b"evil"), (b"accept", b"*/*"), (b"x-\xc3\xa9", b"v")]  # fmt: skip


def test_forward_rewrites_headers_as_before(decision_policy) -> None:
    from knoxcall_addon.decision import _decision
    from knoxcall_addon.gate import forward
    from tests.test_request_path import random_flow

    rng = random.Random(33)
    for _ in range(3000):
        flow = random_flow(rng)
        flow.request.headers.fields = tuple(rng.sample(FORWARD_POOL, rng.randint(0, 7)))
        peer = rng.choice(["127.0.0.50", "10.9.3.3", "10.0.0.7", "2001:db8:ffff::1", None])  # trusted, or not
        decision = _decision(True, "client", 0, {"client_ip": peer, "peer_ip": peer})
        want = flow.copy()
        forward(flow, decision, decision_policy)
        former_forward(want, decision, decision_policy)
        assert flow.request.headers.fields == want.request.headers.fields


# -- rate limits: the buckets of a decision ------------------------------------------------------


def test_checks_made_once_per_decision_are_the_plain_ones(make_config) -> None:
    from knoxcall_addon.decision import RequestFacts, decide, decide_plain
    from knoxcall_addon.policy import load_policy
    from tests.test_ratelimit_unit import LIMITED

    policy = load_policy(make_config(**LIMITED))
    limits = policy.rate_limits
    rng = random.Random(5)
    for _ in range(3000):
        facts = RequestFacts(peer=rng.choice(["10.0.0.5", "10.0.1.9", "192.0.2.1", "2001:db8::1"]),
                             route=rng.choice(["pay", "open", "free", "nope"]),
                             environment=rng.choice([None, "development"]))  # fmt: skip
        for made in (decide(policy, facts), decide_plain(policy, facts)):  # remembered, and made afresh (ids reused)
            assert limits.checks(made) == limits.checks_plain(made)
            assert limits.checks(made) == limits.checks_plain(made)
