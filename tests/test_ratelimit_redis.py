"""Rate limits shared through a real Redis: a redis-server each test starts on a free loopback
port and stops (the tests skip, saying ``apt-get install redis-server``, where it is missing).

The store on its own (asyncio, no proxy), then two mitmdump processes sharing one Redis, and
a Redis killed while requests flow.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.ratestore import RateLimiter
from tests.harness import ROOT, MitmDump, client_from, free_port
from tests.redisserver import RedisServer

PASSWORD = "s3cret-pa55"
OFFICE = "127.0.0.9"
STATUS_PROBE = ROOT / "tests" / "status_probe.py"

CONFIG = """\
settings:
  default_environment: production
  rate_limit_store: "{store}"
{extra}
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
    rate_limit: {{requests: 1000, window_sec: 3600}}
routes:
  - name: api
    rate_limit: {{requests: {requests}, window_sec: 3600}}
  - name: roomy
    client_rate_limit: {{requests: 1000, window_sec: 3600}}
assignments:
  api: {{production: [office]}}
  roomy: {{production: [office]}}
"""


def write_config(folder: Path, store: str, requests: int = 10, extra: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "knoxcall.yaml").write_text(CONFIG.format(store=store, requests=requests, extra=extra))
    return folder


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path, password=PASSWORD) as server:
        yield server


def limiter_for(policy: Policy) -> RateLimiter:
    limiter = RateLimiter()
    limiter.install(policy.rate_limits, policy.settings)
    return limiter


async def check(limiter: RateLimiter, policy: Policy, route: str = "api", peer: str = OFFICE):
    result = limiter.check(policy.rate_limits, decide(policy, RequestFacts(peer=peer, route=route)))
    return await result if not isinstance(result, tuple) else result


# -- the store on its own ----------------------------------------------------------------------


def test_the_shared_bucket_lets_exactly_the_burst_through_and_refusals_take_nothing(tmp_path, redis_server):
    policy = load_policy(write_config(tmp_path / "c", redis_server.url, requests=3))

    async def run() -> list[tuple[bool, str]]:
        limiter = limiter_for(policy)
        try:
            results = [await check(limiter, policy) for _ in range(6)]
        finally:
            await limiter.close()
        return [(d.allowed, d.reason) for d, _ in results]

    assert asyncio.run(run()) == [(True, "client")] * 3 + [(False, "rate_limited")] * 3
    keys = sorted(redis_server.stored_keys())
    assert keys == ["knoxcall:rl:client|office|1000/3600000000/1000", "knoxcall:rl:route|api|production|3/3600000000/3"]
    # the client's bucket (1000 per hour: 3.6 s a token) counted the three that went through, not the refused
    value = redis_server.command("GET", keys[0]).decode().split("\r\n")[1]  # after $LENGTH
    assert value.endswith(":0")
    ttl = int(redis_server.command("PTTL", keys[0]).decode().strip(":\r\n"))
    assert 10_000 < ttl <= 3 * 3600 + 1  # ms: it expires when the bucket is full again


def test_concurrent_checks_against_redis_never_overshoot(tmp_path, redis_server):
    policy = load_policy(write_config(tmp_path / "c", redis_server.url, requests=7))

    async def run() -> int:
        limiter = limiter_for(policy)
        try:
            results = await asyncio.gather(*(check(limiter, policy) for _ in range(60)))
        finally:
            await limiter.close()
        return sum(d.allowed for d, _ in results)

    assert asyncio.run(run()) == 7


def test_unreachable_redis_falls_back_to_local_buckets_and_comes_back(tmp_path, redis_server, caplog):
    policy = load_policy(write_config(tmp_path / "c", redis_server.url, requests=3))
    caplog.set_level(logging.INFO, logger="knoxcall")

    async def run() -> None:
        limiter = limiter_for(policy)
        try:
            assert (await check(limiter, policy))[0].allowed  # shared: one token taken in Redis
            redis_server.kill()
            # requests keep flowing, counted in this process: a full local bucket of 3
            local = [(await check(limiter, policy))[0].allowed for _ in range(4)]
            assert local == [True, True, True, False]
            assert limiter.unreachable_since is not None
            status = "\n".join(limiter.status_lines())
            assert "UNREACHABLE since" in status and "rate_limit_on_store_error: local" in status
            redis_server.start()
            for _ in range(100):  # the probe asks every 0.5 s
                if limiter.unreachable_since is None:
                    break
                await asyncio.sleep(0.1)
            assert limiter.unreachable_since is None
            # shared again: the new Redis (empty: no persistence) has a full bucket of 3
            shared = [(await check(limiter, policy))[0].allowed for _ in range(4)]
            assert shared == [True, True, True, False]
            assert "reachable" in "\n".join(limiter.status_lines())
        finally:
            await limiter.close()

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "counting in this process alone" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(infos) == 1 and caplog.records[-1].levelno == logging.INFO
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in everything
    assert "redis://:***@127.0.0.1:" in everything


@pytest.mark.parametrize(("policy_name", "allowed", "reason"), [("allow", True, "client"),
                                                                ("deny", False, "rate_limit_unavailable")])  # fmt: skip
def test_allow_and_deny_on_store_error(tmp_path, policy_name, allowed, reason):
    port = free_port()  # nothing listens there
    store = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    policy = load_policy(write_config(tmp_path / "c", store, extra=f"  rate_limit_on_store_error: {policy_name}"))

    async def run():
        limiter = limiter_for(policy)
        try:
            return [await check(limiter, policy) for _ in range(3)]
        finally:
            await limiter.close()

    results = asyncio.run(run())
    assert [(d.allowed, d.reason) for d, _ in results] == [(allowed, reason)] * 3
    decision, info = results[0]
    assert info is None
    if not allowed:
        assert (decision.status, decision.body) == (503, {"error": "Rate limit store unavailable", "status": 503})
        assert PASSWORD not in decision.detail


def test_a_redis_that_does_not_answer_is_given_up_after_the_timeout(tmp_path):
    """A server that accepts and never replies (a hung Redis): the request is decided locally."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    store = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    policy = load_policy(write_config(tmp_path / "c", store, extra="  rate_limit_store_timeout_ms: 30"))

    async def run():
        limiter = limiter_for(policy)
        try:
            return [await check(limiter, policy) for _ in range(2)], limiter.last_error
        finally:
            await limiter.close()

    try:
        results, error = asyncio.run(run())
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert [d.allowed for d, _ in results] == [True, True]
    assert error == "no answer within 30 ms"


def test_a_wrong_password_is_a_store_error_that_never_shows_a_password(tmp_path, redis_server, caplog):
    wrong = "not-the-" + PASSWORD
    store = f"redis://:{wrong}@127.0.0.1:{redis_server.port}/0"
    policy = load_policy(write_config(tmp_path / "c", store))

    async def run():
        limiter = limiter_for(policy)
        try:
            decision, _ = await check(limiter, policy)
            return decision, limiter.status_lines()
        finally:
            await limiter.close()

    decision, status = asyncio.run(run())
    assert decision.allowed  # local buckets
    text = "\n".join([*status, *(r.getMessage() for r in caplog.records)])
    assert "UNREACHABLE" in text and wrong not in text and PASSWORD not in text


# -- end to end --------------------------------------------------------------------------------


def test_two_proxies_sharing_one_redis_enforce_one_limit_together(tmp_path, upstream, redis_server):
    # 40 connections opened at once keep a proxy's event loop busy for longer than the default
    # 50 ms, which would (rightly) send some requests to the local fallback: not what this tests
    extra = "  rate_limit_store_timeout_ms: 2000"
    folder = write_config(tmp_path / "config", redis_server.url, requests=10, extra=extra)
    with (
        MitmDump(folder, mode=f"reverse:{upstream.url}", log_path=tmp_path / "a.log") as first,
        MitmDump(folder, mode=f"reverse:{upstream.url}", log_path=tmp_path / "b.log") as second,
    ):
        proxies = [first, second]
        barrier = threading.Barrier(40)

        def one(i: int) -> int:
            with client_from(OFFICE) as client:
                barrier.wait(10)
                url = proxies[i % 2].url + "/x"
                return client.get(url, headers={"x-knoxcall-route": "api"}).status_code

        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(one, range(40)))
        for proxy in proxies:
            assert "reachable: limits are shared" in proxy.log_text()
            assert "unreachable" not in proxy.log_text()
            assert PASSWORD not in proxy.log_text()
    assert sorted(statuses) == [200] * 10 + [429] * 30
    assert len(upstream.seen) == 10


def test_redis_killed_mid_run_requests_keep_flowing_then_shared_again(tmp_path, upstream, redis_server):
    folder = write_config(tmp_path / "config", redis_server.url)
    status_file = tmp_path / "status.txt"
    extra = ["-s", str(STATUS_PROBE), "--set", f"status_probe_file={status_file}"]
    with MitmDump(folder, mode=f"reverse:{upstream.url}", extra=extra) as proxy, client_from(OFFICE) as client:

        def call() -> int:
            return client.get(proxy.url + "/y", headers={"x-knoxcall-route": "roomy"}).status_code

        def status_says(text: str) -> str:
            deadline = time.monotonic() + 10
            seen = ""
            while time.monotonic() < deadline and text not in seen:
                time.sleep(0.1)
                seen = status_file.read_text() if status_file.exists() else ""
            assert text in seen, seen
            return seen

        assert [call() for _ in range(5)] == [200] * 5
        status_says(f"store: redis://:***@127.0.0.1:{redis_server.port}/0 (shared), reachable")
        redis_server.kill()
        assert [call() for _ in range(20)] == [200] * 20  # local buckets: requests keep flowing
        log = proxy.wait_for_log("unreachable")
        warning = next(line for line in log.splitlines() if "rate limit store" in line and "unreachable" in line)
        assert "counting in this process alone" in warning
        status_says("UNREACHABLE since")
        redis_server.start()
        proxy.wait_for_log("is reachable again: limits are shared again")
        assert [call() for _ in range(3)] == [200] * 3
        assert any(key.startswith("knoxcall:rl:") for key in redis_server.stored_keys())  # counted in Redis again
        status_says(f"store: redis://:***@127.0.0.1:{redis_server.port}/0 (shared), reachable")
        text = proxy.log_text() + status_file.read_text()
        assert PASSWORD not in text
        assert text.count("unreachable (") == 1  # one WARNING for the whole outage


def test_a_store_change_by_reload_moves_the_buckets(tmp_path, upstream, redis_server):
    folder = write_config(tmp_path / "config", "memory", requests=2)
    with MitmDump(folder, mode=f"reverse:{upstream.url}") as proxy, client_from(OFFICE) as client:

        def call() -> int:
            return client.get(proxy.url + "/", headers={"x-knoxcall-route": "api"}).status_code

        assert [call() for _ in range(3)] == [200, 200, 429]
        mark = len(proxy.log_text())
        write_config(folder, redis_server.url, requests=2)
        proxy.wait_for_log("settings ~rate_limit_store", after=mark)
        assert [call() for _ in range(3)] == [200, 200, 429]  # Redis's buckets are its own
        assert "knoxcall:rl:route|api|production|2/3600000000/2" in redis_server.stored_keys()
        assert PASSWORD not in proxy.log_text()


def test_replace_keeps_the_password_out_of_settings_repr(tmp_path, redis_server):
    policy = load_policy(write_config(tmp_path / "c", redis_server.url))
    assert PASSWORD not in repr(policy.settings) and PASSWORD not in repr(replace(policy.settings))
