"""Rate limits without a proxy: the bucket on a fake clock (with a property test of its bound),
all-or-nothing over several limits, report mode, the memory store's bound and reloads, the
config's errors with file and line, `knoxcall check` and `knoxcall explain`."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knoxcall_addon.cli import main
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.model import ConfigError, RateLimit
from knoxcall_addon.policy import load_policy
from knoxcall_addon.rateconfig import redacted_url
from knoxcall_addon.ratelimit import (
    CompiledLimit,
    caller_of,
    header_fields,
    outcome,
    step,
)
from knoxcall_addon.ratestore import MemoryStore, RateLimiter

SECOND = 1_000_000  # µs


def limit(requests: int, window_sec: float, burst: int | None = None, mode: str = "enforce", kind: str = "route"):
    spec = RateLimit(requests, window_sec, burst if burst is not None else requests, mode)  # type: ignore[arg-type]
    return CompiledLimit.of(kind, "test", ("t",), spec)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * SECOND

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * SECOND)


def take(store: MemoryStore, lim: CompiledLimit, key: str = "k") -> bool:
    consumed, _ = store.consume([(lim, lim.prefix + key)])
    return not consumed.refused


# -- the bucket ------------------------------------------------------------------------------


def test_a_full_bucket_lets_burst_through_then_one_per_interval():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    lim = limit(requests=10, window_sec=60, burst=3)  # one token every 6 s
    assert [take(store, lim) for _ in range(4)] == [True, True, True, False]
    clock.advance(5.999)
    assert not take(store, lim)
    clock.advance(0.001)
    assert take(store, lim)
    assert not take(store, lim)
    clock.advance(18)  # three intervals: full again, not more
    assert [take(store, lim) for _ in range(4)] == [True, True, True, False]


def test_burst_defaults_to_requests_and_fractional_intervals_stay_exact():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    lim = limit(requests=3, window_sec=1)  # 333333.33 µs per token: kept exactly, in 1/3 µs
    assert sum(take(store, lim) for _ in range(10)) == 3
    total = 0
    for _ in range(300):  # 100 s in steps of a third of a second
        clock.now += 333_333 if _ % 3 else 333_334
        total += take(store, lim)
    assert total == 300


@settings(max_examples=300, deadline=None)
@given(
    requests=st.integers(1, 50),
    window_us=st.integers(1, 20 * SECOND),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 3 * SECOND), min_size=1, max_size=120),
)
def test_no_interval_lets_more_than_burst_plus_rate_times_its_length(requests, window_us, burst, gaps):
    """Over any interval [a, b]: allowed <= burst + (b - a) * requests / window_sec (exactly, in integers)."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    lim = limit(requests, window_us / SECOND, burst)
    assert lim.window_us == window_us
    allowed: list[int] = []
    for gap in gaps:
        clock.now += gap
        if take(store, lim):
            allowed.append(clock.now)
    for i in range(len(allowed)):
        for j in range(i, len(allowed)):
            count = j - i + 1
            assert count * window_us <= burst * window_us + (allowed[j] - allowed[i]) * requests
    # and it is a bound that is reached: a full bucket lets burst through at once
    fresh = MemoryStore(clock=clock)
    assert sum(take(fresh, lim) for _ in range(burst + 1)) == burst


@settings(max_examples=100, deadline=None)
@given(requests=st.integers(1, 50), window_us=st.integers(1, 20 * SECOND), burst=st.integers(1, 20),
       count=st.integers(1, 60))  # fmt: skip
def test_requests_at_the_refill_rate_are_never_refused(requests, window_us, burst, count):
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    lim = limit(requests, window_us / SECOND, burst)
    for _ in range(count):
        assert take(store, lim)
        clock.now += -(-window_us // requests)  # one interval, rounded up to whole µs


def test_step_is_what_the_redis_script_computes():
    lim = limit(requests=7, window_sec=2, burst=2)
    ok, after = step(lim, None, 10 * SECOND)
    assert ok and after == 10 * SECOND * 7 + 2 * SECOND
    ok, after = step(lim, after, 10 * SECOND)
    assert ok
    assert not step(lim, after, 10 * SECOND)[0]


# -- several limits at once ------------------------------------------------------------------


def test_a_request_refused_by_one_limit_takes_nothing_from_the_others():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    roomy, tight = limit(100, 60, kind="client"), limit(1, 3600, kind="route")
    checks = [(roomy, roomy.prefix), (tight, tight.prefix)]
    first, now = store.consume(checks)
    assert not first.refused
    before = dict(store.buckets)
    for _ in range(5):
        again, now = store.consume(checks)
        assert again.refused and again.room == (True, False)
    assert store.buckets == before  # the roomy bucket was not touched
    result = outcome(checks, again, now)
    assert result.refused and result.exceeded is tight and result.retry_after == 3600 - 0
    assert (result.shown, result.remaining) == (tight, 0)


def test_report_only_limits_let_requests_through_and_say_which_would_have_refused():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    enforced, report = limit(100, 60, kind="client"), limit(2, 60, mode="report", kind="client_route")
    checks = [(enforced, enforced.prefix), (report, report.prefix + "#ip:10.0.0.1")]
    results = []
    for _ in range(5):
        consumed, now = store.consume(checks)
        results.append(outcome(checks, consumed, now))
    assert [r.refused for r in results] == [False] * 5
    assert [r.exceeded is report for r in results] == [False, False, True, True, True]
    # the enforced limit counted every request that went through; the report-only one only those it had room for
    assert store.buckets[enforced.prefix] == clock.now * 100 + 5 * enforced.window_us
    info = results[-1].info(1_700_000_000.0)
    assert info == {"kind": "client_route", "limit": 2, "remaining": 0, "reset": 1_700_000_060, "report_only": True}


def test_headers_name_the_most_constrained_limit():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    wide, narrow = limit(100, 60, kind="route"), limit(10, 60, burst=4, kind="client_route")
    checks = [(wide, wide.prefix), (narrow, narrow.prefix + "#client:a")]
    consumed, now = store.consume(checks)
    info = outcome(checks, consumed, now).info(1_700_000_000.5)
    assert info == {"kind": "client_route", "limit": 4, "remaining": 3, "reset": 1_700_000_007}  # 6 s to refill
    assert header_fields(info, ()) == (
        (b"X-RateLimit-Limit", b"4"),
        (b"X-RateLimit-Remaining", b"3"),
        (b"X-RateLimit-Reset", b"1700000007"),
    )
    assert header_fields(info, ((b"x-ratelimit-remaining", b"77"),)) == ()  # the upstream's own: left alone


# -- from a decision -------------------------------------------------------------------------

LIMITED = {
    "k.yaml": {
        "environments": [{"name": "production"}, {"name": "development"}],
        "clients": [
            {"name": "acme", "ip_address": "10.0.0.0/24", "rate_limit": {"requests": 3, "window_sec": 60}},
            {"name": "other", "ip_address": "10.0.1.0/24"},
        ],
        "routes": [
            {
                "name": "pay",
                "rate_limit": {"requests": 5, "window_sec": 60},
                "client_rate_limit": {"requests": 100, "window_sec": 60, "burst": 2},
                "environments": {
                    "development": {
                        "rate_limit": False,
                        "client_rate_limit": {"requests": 10, "window_sec": 1, "mode": "report"},
                    }
                },
            },
            {"name": "open", "requires_clients": False, "client_rate_limit": {"requests": 1, "window_sec": 60}},
            {"name": "free"},
        ],
        "assignments": {
            "pay": {"production": ["acme", "other"], "development": ["acme"]},
            "free": {"production": ["acme"]},
        },
    }
}


@pytest.fixture
def limited(make_config):
    return load_policy(make_config(**LIMITED))


def test_which_limits_apply_follows_client_route_and_environment(limited):
    limits = limited.rate_limits

    def kinds(**kw):
        decision = decide(limited, RequestFacts(**kw))
        return [(lim.kind, key) for lim, key in limits.checks(decision)]

    assert kinds(peer="10.0.0.5", route="pay") == [
        ("client", "client|acme|3/60000000/3"),
        ("route", "route|pay|production|5/60000000/5"),
        ("client_route", "client_route|pay|production|100/60000000/2#client:acme"),
    ]
    # the override removes the route's limit and replaces the per-caller one
    assert [k for k, _ in kinds(peer="10.0.0.5", route="pay", environment="development")] == ["client", "client_route"]
    assert [k for k, _ in kinds(peer="10.0.1.5", route="pay")] == ["route", "client_route"]
    assert kinds(peer="10.0.0.5", route="free") == [("client", "client|acme|3/60000000/3")]
    assert kinds(peer="10.9.9.9", route="pay") == []  # refused for its IP: no limit is consulted
    # no client matched: the IP is the caller, IPv6 by its /64
    assert kinds(peer="2001:db8:1:2::7", route="open")[0][1].endswith("#ip:2001:db8:1:2::/64")
    assert kinds(peer="192.0.2.7", route="open")[0][1].endswith("#ip:192.0.2.7")


def test_ipv6_callers_are_counted_by_their_64():
    def caller(ip):
        return caller_of(decide_stub(ip))

    assert caller("2001:db8:1:2:aaaa::1") == caller("2001:db8:1:2:ffff:ffff:ffff:ffff") == "ip:2001:db8:1:2::/64"
    assert caller("2001:db8:1:3::1") != caller("2001:db8:1:2::1")
    assert caller("10.0.0.1") != caller("10.0.0.2")


def decide_stub(ip: str):
    from knoxcall_addon.decision import Decision

    return Decision(True, "open_route", 0, client_ip=ip, peer_ip=ip, route="r", environment="e")


def test_the_limiter_refuses_with_429_and_a_body_that_says_which_limit(limited):
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limiter.install(limited.rate_limits, limited.settings)
    facts = RequestFacts(peer="10.0.0.5", route="pay")
    results = [limiter.check(limited.rate_limits, decide(limited, facts)) for _ in range(3)]
    decisions = [d for d, _ in results]  # type: ignore[misc]
    assert [d.allowed for d in decisions] == [True, True, False]
    refused, info = results[-1]  # type: ignore[misc]
    assert (refused.reason, refused.status) == ("rate_limited", 429)
    assert refused.body == {"error": "Rate limit exceeded", "status": 429, "limit": "client_route", "retry_after": 1}
    assert refused.client == "acme" and refused.target_url is None
    assert info["kind"] == "client_route" and info["remaining"] == 0
    assert "rate_limited" in refused.summary() and "burst 2" in refused.summary()
    # in development only acme's own limit (3 per 60 s, full again after 2 minutes) refuses
    dev = RequestFacts(peer="10.0.0.5", route="pay", environment="development")
    clock.advance(120)
    results = [limiter.check(limited.rate_limits, decide(limited, dev)) for _ in range(4)]
    assert [d.allowed for d, _ in results] == [True, True, True, False]  # type: ignore[misc]
    assert results[-1][0].body["limit"] == "client"  # type: ignore[index]


def test_report_only_decision_is_allowed_and_marked(make_config):
    config = make_config(**{"k.yaml": {
        "environments": [{"name": "production"}],
        "routes": [{"name": "open", "requires_clients": False,
                    "client_rate_limit": {"requests": 1, "window_sec": 60, "mode": "report"}}],
    }})  # fmt: skip
    policy = load_policy(config)
    limiter = RateLimiter(clock=FakeClock())
    limiter.install(policy.rate_limits, policy.settings)
    facts = RequestFacts(peer="192.0.2.1", route="open")
    first, second = (limiter.check(policy.rate_limits, decide(policy, facts)) for _ in range(2))
    assert first[0].reason == "open_route" and first[1] == {  # type: ignore[index]
        "kind": "client_route", "limit": 1, "remaining": 0, "reset": first[1]["reset"]}  # type: ignore[index]  # fmt: skip
    decision, info = second  # type: ignore[misc]
    assert (decision.allowed, decision.reason, decision.status) == (True, "rate_limited", 0)
    assert info["report_only"] is True
    assert decision.summary().startswith("knoxcall: allowed rate_limited 192.0.2.1 route=open")
    assert "(report-only: client_route limit of open in production (1 per 60 s, report only) exceeded" in (
        decision.summary()
    )


def test_no_limits_cost_nothing_but_a_flag(make_config):
    policy = load_policy(make_config(**{"k.yaml": {"environments": [{"name": "production"}], "routes": [
        {"name": "open", "requires_clients": False}]}}))  # fmt: skip
    assert not policy.rate_limits.any
    decision = decide(policy, RequestFacts(peer="192.0.2.1", route="open"))
    assert RateLimiter().check(policy.rate_limits, decision) == (decision, None)


# -- the memory store: bounded, and across reloads ----------------------------------------------


def test_the_memory_store_holds_at_most_max_buckets():
    clock = FakeClock()
    store = MemoryStore(max_buckets=100, clock=clock)
    lim = limit(1, 3600)
    for i in range(1000):  # a flood of distinct callers, none idle
        assert take(store, lim, f"#ip:{i}")
    assert len(store.buckets) == 100
    assert store.dropped_early == 900
    assert next(iter(store.buckets)) == lim.prefix + "#ip:900"  # the least recently used went first


def test_idle_buckets_are_dropped_before_any_other():
    clock = FakeClock()
    store = MemoryStore(max_buckets=100, clock=clock)
    lim = limit(1, 10)
    store.limits = {lim.prefix: lim}
    for i in range(50):
        take(store, lim, f"#ip:a{i}")
    clock.advance(11)  # all full again
    for i in range(200):
        take(store, lim, f"#ip:b{i}")
    assert len(store.buckets) == 100
    assert store.dropped_early == 100  # the 50 idle ones went without counting; then the b-flood itself
    assert not any("#ip:a" in key for key in store.buckets)


def test_a_reload_keeps_buckets_of_unchanged_limits_and_drops_the_others(make_config):
    files = {k: v for k, v in LIMITED.items()}
    first = load_policy(make_config(**files))
    limiter = RateLimiter(clock=FakeClock())
    limiter.install(first.rate_limits, first.settings)
    for ip, route in [("10.0.0.5", "pay"), ("10.0.1.5", "pay")]:
        limiter.check(first.rate_limits, decide(first, RequestFacts(peer=ip, route=route)))
    assert len(limiter.local.buckets) == 4  # acme, route, per caller acme, per caller other
    edited = {"k.yaml": {**LIMITED["k.yaml"]}}
    edited["k.yaml"]["clients"] = [
        {"name": "acme", "ip_address": "10.0.0.0/24", "rate_limit": {"requests": 4, "window_sec": 60}},  # changed
    ]
    edited["k.yaml"]["assignments"] = {"pay": {"production": ["acme"]}}
    second = load_policy(make_config(folder="second", **edited))
    limiter.install(second.rate_limits, second.settings)
    assert sorted(limiter.local.buckets) == [
        "client_route|pay|production|100/60000000/2#client:acme",
        "client_route|pay|production|100/60000000/2#client:other",
        "route|pay|production|5/60000000/5",
    ]  # acme's changed limit starts full; a per-caller bucket of a removed client ages out


# -- config ----------------------------------------------------------------------------------


def load_errors(make_config, text: str) -> list[str]:
    folder = make_config(**{"k.yaml": "environments: [{name: production}, {name: dev}]\n" + text})
    with pytest.raises(ConfigError) as e:
        load_policy(folder)
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes: [{name: r, rate_limit: {requests: 0, window_sec: 60}}]",
         "k.yaml:2: route 'r' rate_limit: requests must be a whole number of at least 1"),
        ("routes: [{name: r, rate_limit: {requests: 10, window_sec: -1}}]",
         "k.yaml:2: route 'r' rate_limit: window_sec must be a number of seconds above 0"),
        ("routes: [{name: r, rate_limit: {requests: 10, window_sec: 1, burst: 0}}]",
         "k.yaml:2: route 'r' rate_limit: burst must be a whole number of at least 1"),
        ("routes: [{name: r, rate_limit: {requests: 1.5, window_sec: 1}}]",
         "k.yaml:2: route 'r' rate_limit: requests must be a whole number of at least 1"),
        ("routes: [{name: r, rate_limit: {requests: 10, window_sec: 60, brust: 5}}]",
         "k.yaml:2: unknown key 'brust' in route 'r' rate_limit (did you mean 'burst'?); allowed: "
         "requests, window_sec, burst, mode"),
        ("routes: [{name: r, rate_limit: {requests: 10}}]", "k.yaml:2: route 'r' rate_limit is missing required "
         "key 'window_sec'"),
        ("routes: [{name: r, rate_limit: {requests: 10, window_sec: 1, mode: warn}}]",
         "k.yaml:2: route 'r' rate_limit: mode must be 'enforce' or 'report'"),
        ("routes: [{name: r, rate_limit: false}]", "k.yaml:2: route 'r' rate_limit must be a mapping like "
         "{requests: 100, window_sec: 60}"),
        ("routes: [{name: r, client_rate_limit: {requests: 1, window_sec: 31536000, burst: 2}}]",
         "k.yaml:2: route 'r' client_rate_limit: an empty bucket would take 730 days to refill"),
        ("routes: [{name: r, environments: {dev: {rate_limit: true}}}]",
         "k.yaml:2: route 'r' (dev) rate_limit must be a mapping like {requests: 100, window_sec: 60}, or false"),
        ("clients: [{name: c, ip_address: 10.0.0.1, rate_limit: {requests: 1, window_sec: 0}}]",
         "k.yaml:2: client 'c' rate_limit: window_sec must be a number of seconds above 0"),
        ("settings: {rate_limit_store: 'mysql://h/0'}",
         "k.yaml:2: settings.rate_limit_store must be 'memory' or a URL redis://HOST:PORT/DB"),
        ("settings: {rate_limit_on_store_error: fail}",
         "k.yaml:2: settings.rate_limit_on_store_error must be 'local', 'allow' or 'deny'"),
        ("settings: {rate_limit_headers: 'no'}", "k.yaml:2: settings.rate_limit_headers must be true or false"),
        ("settings: {rate_limit_store_timeout_ms: 0}", "k.yaml:2: settings.rate_limit_store_timeout_ms must be"),
        ("settings: {rate_limit_max_buckets: 0}", "k.yaml:2: settings.rate_limit_max_buckets must be a whole"),
        ("settings: {rate_limt_store: memory}", "k.yaml:2: unknown key 'rate_limt_store' in settings (did you mean "
         "'rate_limit_store'?)"),
    ],
)  # fmt: skip
def test_bad_limits_are_config_errors_with_file_and_line(make_config, text, expected):
    errors = load_errors(make_config, text)
    assert any(e.endswith(expected) or expected in e for e in errors), errors


def test_a_redis_password_never_appears_in_a_config_error(make_config):
    errors = load_errors(make_config, "settings: {rate_limit_store: 'redis://:hunter2@db.example:6379/zero'}")
    assert errors and not any("hunter2" in e for e in errors)
    assert "redis://:***@db.example:6379/zero" in errors[0]
    assert redacted_url("redis://user:hunter2@h:1/0?x=hunter2") == "redis://user:***@h:1/0?***"


def test_good_limits_load_with_their_defaults(limited):
    route = limited.config.routes["pay"]
    assert route.client_rate_limit == RateLimit(100, 60, 2, "enforce")
    assert route.rate_limit_for("development") is None
    assert route.client_rate_limit_for("development") == RateLimit(10, 1, 10, "report")
    assert limited.config.clients["acme"].rate_limit == RateLimit(3, 60, 3)
    assert limited.settings.rate_limit_store == "memory" and limited.settings.rate_limit_headers is True
    assert "hunter2" not in repr(replace(limited.settings, rate_limit_store="redis://:hunter2@h:1/0"))


# -- knoxcall check and explain --------------------------------------------------------------


def test_check_warns_about_limits_that_can_never_be_reached(make_config):
    folder = make_config(**{"k.yaml": {
        "environments": [{"name": "production"}],
        "clients": [
            {"name": "big", "ip_address": "10.0.0.1", "description": "d",
             "rate_limit": {"requests": 1000, "window_sec": 60}},
            {"name": "small", "ip_address": "10.0.0.2", "description": "d",
             "rate_limit": {"requests": 10, "window_sec": 60}},
        ],
        "routes": [{"name": "api", "rate_limit": {"requests": 100, "window_sec": 60},
                    "client_rate_limit": {"requests": 200, "window_sec": 60}}],
        "assignments": {"api": {"production": ["big", "small"]}},
    }})  # fmt: skip
    out = io.StringIO()
    assert main(["check", str(folder), "--strict"], out=out) == 1
    text = out.getvalue()
    assert 'warning[unreachable-limit] route "api" in production: the per-caller limit (200 per 60 s)' in text
    assert 'warning[unreachable-limit] client "big": its limit (1000 per 60 s) can never be reached' in text
    assert 'client "small"' not in text
    assert "0 error(s), 2 warning(s)" in text


def test_explain_shows_the_limits_that_apply(limited, tmp_path, make_config):
    folder = make_config(**LIMITED)
    out = io.StringIO()
    assert main(["explain", "--config", str(folder), "--ip", "10.0.0.5", "--route", "pay"], out=out) == 0
    text = out.getvalue()
    assert "rate limits (checked last, all at once; explain takes no token):" in text
    assert "client: 3 per 60 s (client acme, over all its routes)" in text
    assert "route: 5 per 60 s (route pay in production, all callers together)" in text
    assert "client_route: 100 per 60 s, burst 2 (each caller on pay in production; this one is client:acme)" in text
    out = io.StringIO()
    main(["explain", "--config", str(folder), "--ip", "10.0.1.5", "--route", "free"], out=out)
    assert "rate limits" not in out.getvalue()  # refused (not assigned): no limit is consulted


# -- the schema for editors agrees with the loader ------------------------------------------

ENVS = "environments: [{name: production}, {name: dev}]\n"
GOOD_SCHEMA = [
    ENVS + "routes: [{name: r, rate_limit: {requests: 10, window_sec: 1.5, burst: 3, mode: report},"
    " client_rate_limit: {requests: 1, window_sec: 60},"
    " environments: {dev: {rate_limit: false, client_rate_limit: {requests: 5, window_sec: 1}}}}]",
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, rate_limit: {requests: 100, window_sec: 60}}]",
    ENVS + "settings: {rate_limit_store: 'redis://:pw@127.0.0.1:6379/2', rate_limit_headers: false,"
    " rate_limit_on_store_error: deny, rate_limit_store_timeout_ms: 20, rate_limit_max_buckets: 5000}",
]
BAD_SCHEMA = [
    ENVS + "routes: [{name: r, rate_limit: {requests: 0, window_sec: 1}}]",
    ENVS + "routes: [{name: r, rate_limit: {requests: 1}}]",
    ENVS + "routes: [{name: r, rate_limit: {requests: 1, window_sec: 1, per: minute}}]",
    ENVS + "routes: [{name: r, rate_limit: false}]",
    ENVS + "routes: [{name: r, environments: {dev: {client_rate_limit: true}}}]",
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, rate_limit: {requests: 1, window_sec: 1, mode: log}}]",
    ENVS + "settings: {rate_limit_store: 'memcached://h:1'}",
    ENVS + "settings: {rate_limit_on_store_error: crash}",
]


@pytest.fixture(scope="module")
def validator():
    import json

    import jsonschema

    from tests.test_newkey_schema_demo import SCHEMA_PATH

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


@pytest.mark.parametrize("text", GOOD_SCHEMA)
def test_schema_and_loader_accept_the_same_limits(validator, make_config, text):
    from tests.test_newkey_schema_demo import loader_errors, schema_errors

    folder = make_config(**{"k.yaml": text})
    assert schema_errors(validator, folder) == []
    assert loader_errors(folder) == []


@pytest.mark.parametrize("text", BAD_SCHEMA)
def test_schema_and_loader_refuse_the_same_limits(validator, make_config, text):
    from tests.test_newkey_schema_demo import loader_errors, schema_errors

    folder = make_config(**{"k.yaml": text})
    assert schema_errors(validator, folder), "the schema accepted it"
    assert loader_errors(folder), "the loader accepted it"
