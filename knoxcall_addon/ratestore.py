"""Where the buckets live: this process's memory, or a Redis that several proxies share.

- `MemoryStore`: key -> TAT in an LRU dict, bounded (idle buckets are dropped first).
- `RedisStore`: one Lua script checks and takes from every bucket of a request atomically,
  on the Redis server's clock (proxies with skewed clocks agree); redis.asyncio, never
  blocking the event loop, each call bounded by a timeout.
- `RateLimiter`: the store the settings in force name, and what happens when Redis cannot
  be asked (``rate_limit_on_store_error``): local buckets (default), allow, or deny.

No mitmproxy import. The arithmetic is ratelimit.py's; the script is its Lua twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from knoxcall_addon.decision import Decision
from knoxcall_addon.metrics import count_rate_limit_store_error
from knoxcall_addon.model import Settings
from knoxcall_addon.rateconfig import redacted_url
from knoxcall_addon.ratelimit import (
    CALLER_SEPARATOR,
    KINDS,
    Check,
    CompiledLimit,
    Consumed,
    RateLimits,
    consume,
    limited_decision,
    outcome,
    unavailable_decision,
)
from knoxcall_addon.signing import NonceAnswer, NonceMemory

logger = logging.getLogger("knoxcall")

REDIS_KEY_PREFIX = "knoxcall:rl:"
NONCE_KEY_PREFIX = "knoxcall:nonce:"
PROBE_SECONDS = 0.5  # how often an unreachable Redis is asked whether it is back
MAX_CONNECTIONS = 8  # to one Redis, per proxy process: requests are sent in batches (see RedisStore)
PROBE_TIMEOUT_SECONDS = 1.0  # a probe may wait longer than a request (a first connection, a busy start)
SWEEP_PER_INSERT = 2  # idle buckets looked at (and dropped) per new bucket

Checked = tuple[Decision, dict[str, Any] | None]  # the decision after the limits, and the flow's rate_limit


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryStore:
    """The buckets of this process: key -> TAT (see ratelimit.py), at most ``max_buckets``.

    Kept in least-recently-used order. Each new bucket first drops up to SWEEP_PER_INSERT of
    the least recently used ones that are full again (a full bucket is the same as none);
    beyond ``max_buckets`` the least recently used goes even when it is not full, which can
    only give that caller a full bucket early (counted in ``dropped_early``).
    """

    def __init__(self, max_buckets: int = Settings.rate_limit_max_buckets, clock: Callable[[], int] = monotonic_us):
        self.buckets: OrderedDict[str, int] = OrderedDict()
        self.max_buckets = max_buckets
        self.clock = clock
        self.limits: dict[str, CompiledLimit] = {}  # by prefix: to tell whether a bucket is full
        self.dropped_early = 0

    def consume(self, checks: Sequence[Check], now: int | None = None) -> tuple[Consumed, int]:
        """Check and take, all or nothing (see ratelimit.consume); (result, now in µs)."""
        if now is None:
            now = self.clock()
        buckets = self.buckets
        consumed = consume([limit for limit, _ in checks], [buckets.get(key) for _, key in checks], now)
        if not consumed.refused:
            for (_, key), room, tat in zip(checks, consumed.room, consumed.tats, strict=True):
                if room:
                    if key in buckets:
                        buckets.move_to_end(key)
                    else:
                        self._make_room(now)
                    buckets[key] = tat  # type: ignore[assignment]  # taken from: never None
        return consumed, now

    def take_one(self, limit: CompiledLimit, key: str, now: int) -> int | None:
        """`consume` of a single check that has room, without its tuples: the bucket's level
        after taking one token (see ratelimit.level_of); None when there is no room, and
        then nothing was taken.

        Most limited requests use one bucket and have room: this is their whole store
        work (`RateLimiter._local`; `tests/test_ratelimit_unit.py` compares the two).
        """
        buckets = self.buckets
        tat = buckets.get(key)
        base = now * limit.requests
        after = (tat if tat is not None and tat > base else base) + limit.window_us  # ratelimit.step
        if after - base > limit.cap:
            return None
        if tat is not None:  # buckets hold no None
            buckets.move_to_end(key)
        else:
            self._make_room(now)
        buckets[key] = after
        return after - base

    def _make_room(self, now_us: int) -> None:
        buckets = self.buckets
        for _ in range(SWEEP_PER_INSERT):
            if not buckets:
                return
            key, tat = next(iter(buckets.items()))
            limit = self.limits.get(key.partition(CALLER_SEPARATOR)[0])
            if limit is None or tat > now_us * limit.requests:
                break  # the least recently used is not idle: nor are the others, mostly
            del buckets[key]
        while len(buckets) >= self.max_buckets:
            buckets.popitem(last=False)
            self.dropped_early += 1

    def use_limits(self, limits: RateLimits) -> None:
        """After a reload: buckets of limits that are gone (removed, or changed) go too."""
        gone = self.limits.keys() - limits.by_prefix.keys()
        self.limits = dict(limits.by_prefix)
        if gone:
            for key in [k for k in self.buckets if k.partition(CALLER_SEPARATOR)[0] in gone]:
                del self.buckets[key]


# KEYS: the buckets. ARGV: per bucket requests, interval (µs, remainder), capacity (µs, remainder),
# enforce (1/0). A TAT is kept as "µs:remainder" (remainder in 1/requests µs), so every number
# stays an exact integer in Lua's doubles. Returns now (µs), then per bucket µs, remainder, room.
STEP_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local us, rem, nus, nrem, room = {}, {}, {}, {}, {}
local refused = false
for i = 1, n do
  local a = (i - 1) * 6
  local req, iq, ir = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local cq, cr = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  us[i], rem[i] = now, 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local su, sr = string.match(v, '^(%d+):(%d+)$')
    su, sr = tonumber(su), tonumber(sr)
    if su and sr and (su > now or (su == now and sr > 0)) then us[i], rem[i] = su, sr end
  end
  nus[i], nrem[i] = us[i] + iq, rem[i] + ir
  if nrem[i] >= req then nus[i], nrem[i] = nus[i] + 1, nrem[i] - req end
  local ahead = nus[i] - now
  room[i] = ahead < cq or (ahead == cq and nrem[i] <= cr)
  if not room[i] and ARGV[a + 6] == '1' then refused = true end
end
local out = {now}
for i = 1, n do
  if room[i] and not refused then
    us[i], rem[i] = nus[i], nrem[i]
    redis.call('SET', KEYS[i], string.format('%d:%d', us[i], rem[i]), 'PX', math.floor((us[i] - now) / 1000) + 1)
  end
  out[#out + 1] = us[i]
  out[#out + 1] = rem[i]
  out[#out + 1] = room[i] and 1 or 0
end
return out
"""


def script_args(limit: CompiledLimit) -> tuple[int, int, int, int, int, int]:
    """The script's six numbers of one limit (see STEP_SCRIPT)."""
    iq, ir = divmod(limit.window_us, limit.requests)
    cq, cr = divmod(limit.cap, limit.requests)
    return limit.requests, iq, ir, cq, cr, int(limit.enforce)


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


_packed_args: dict[str, bytes] = {}


def packed_call(sha: bytes, checks: Sequence[Check]) -> bytes:
    """``EVALSHA sha n KEY... ARG...`` in RESP, as redis-py would send it.

    Packed here because redis-py's general encoder cost more per request than everything
    else of a check; a limit's six numbers are packed once (per prefix).
    """
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + 7 * len(checks)), _bulk(sha), _bulk(b"%d" % len(checks))]
    for _, key in checks:
        parts.append(_bulk((REDIS_KEY_PREFIX + key).encode()))
    for limit, _ in checks:
        args = _packed_args.get(limit.prefix)
        if args is None:
            if len(_packed_args) > 10_000:  # limits of configs long gone
                _packed_args.clear()
            args = _packed_args[limit.prefix] = b"".join(_bulk(b"%d" % n) for n in script_args(limit))
        parts.append(args)
    return b"".join(parts)


class RedisStore:
    """Buckets in Redis, shared by every proxy that names it; see STEP_SCRIPT.

    The requests that arrive in one turn of the event loop go to Redis together, as one
    pipeline of script calls (each call atomic on its own): one round trip, one connection,
    however many requests are in flight. Each request waits at most ``timeout`` seconds.
    """

    def __init__(self, url: str, timeout: float, shown: str | None = None, hide: Sequence[str] = ()) -> None:
        import redis.asyncio  # only when Redis is configured
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.shown = shown or redacted_url(url)
        self.timeout = timeout
        self._password = _password_of(url)
        self._hide = tuple(sorted({v for v in (*hide, self._password) if v}, key=len, reverse=True))
        # Requests go through _pipeline (which replaces a dead connection itself); the client's
        # own commands (PING, SCRIPT LOAD) retry once at once, on a new connection.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=None,  # waiting for a free connection is bounded by our own timeout
            socket_timeout=max(timeout, PROBE_TIMEOUT_SECONDS),
            socket_connect_timeout=max(timeout, PROBE_TIMEOUT_SECONDS),
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self.sha = hashlib.sha1(STEP_SCRIPT.encode()).hexdigest().encode()
        self._queue: list[tuple[bytes, asyncio.Future[list[Any]]]] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def consume(self, checks: Sequence[Check]) -> tuple[Consumed, int]:
        future = self._enqueue(packed_call(self.sha, checks))
        async with asyncio.timeout(self.timeout):
            reply = await future
        numbers = [int(n) for n in reply]
        room = tuple(bool(numbers[3 + 3 * i]) for i in range(len(checks)))
        tats = tuple(numbers[1 + 3 * i] * limit.requests + numbers[2 + 3 * i] for i, (limit, _) in enumerate(checks))
        refused = any(not ok and limit.enforce for ok, (limit, _) in zip(room, checks, strict=True))
        return Consumed(refused, room, tats), numbers[0]

    async def remember(self, key: str, ttl_ms: int) -> bool:
        """``SET key 1 NX PX ttl``, in the next batch: True when the key was new (a first nonce)."""
        call = b"*6\r\n$3\r\nSET\r\n" + b"".join(
            _bulk(part) for part in ((NONCE_KEY_PREFIX + key).encode(), b"1", b"NX", b"PX", b"%d" % max(1, ttl_ms))
        )
        future = self._enqueue(call)
        async with asyncio.timeout(self.timeout):
            reply = await future
        return reply is not None

    def _enqueue(self, call: bytes) -> asyncio.Future[Any]:
        """Queue one packed call for the next batch (sent at the next turn of the loop); its reply's future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._send_batch)
        self._queue.append((call, future))
        return future

    def _send_batch(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[tuple[bytes, asyncio.Future[list[Any]]]]) -> None:
        from redis.exceptions import NoScriptError

        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._pipeline([call for call, _ in batch])
                again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if again:  # a new or restarted Redis: load the script, send those calls once more
                    await self.client.script_load(STEP_SCRIPT)
                    for i, reply in zip(again, await self._pipeline([batch[i][0] for i in again]), strict=True):
                        replies[i] = reply
        except BaseException as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e if isinstance(e, Exception) else ConnectionError("cancelled"))
            if not isinstance(e, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its request gave up (timeout)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, calls: list[bytes]) -> list[Any]:
        """Send the packed calls on one pooled connection and read one reply each (an error
        reply as its exception). A connection that fails before any reply was read (a dead one
        after a Redis restart) is replaced once."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError

        pool = self.client.connection_pool
        for attempt in range(2):
            connection = await pool.get_connection()
            replies: list[Any] = []
            try:
                await connection.send_packed_command(b"".join(calls), check_health=False)
                for _ in calls:
                    try:
                        replies.append(await connection.read_response(disable_decoding=True, timeout=math.inf))
                    except ResponseError as e:
                        replies.append(e)
                return replies
            except (RedisConnectionError, OSError):
                await connection.disconnect()
                if replies or attempt:
                    raise
            except BaseException:
                await connection.disconnect()  # cancelled mid-reply: the connection is out of step
                raise
            finally:
                await pool.release(connection)
        raise RuntimeError("no attempt left")  # never: the second attempt returns or raises

    async def ping(self) -> None:
        async with asyncio.timeout(max(self.timeout, PROBE_TIMEOUT_SECONDS)):
            await self.client.ping()

    async def drop_connections(self) -> None:
        """After an error: no pooled connection to a Redis that went away is used again."""
        with contextlib.suppress(Exception):
            await self.client.connection_pool.disconnect()

    def describe_error(self, error: BaseException) -> str:
        """An error in words, never with the password."""
        if isinstance(error, TimeoutError):
            return f"no answer within {self.timeout * 1000:g} ms"
        text = f"{type(error).__name__}: {error}"
        for value in self._hide:
            text = text.replace(value, "***")
        return text

    async def close(self) -> None:
        for task in list(self._batches):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client.aclose(close_connection_pool=True)


def _password_of(url: str) -> str:
    userinfo = url.partition("://")[2].rpartition("@")[0]
    return userinfo.partition(":")[2] or userinfo


class RateLimiter:
    """Counts requests against the limits of the policy in force, in the store its settings name.

    `check` answers at once from memory; with Redis it returns a coroutine (mitmproxy awaits a
    hook's awaitable). When Redis cannot be asked, `rate_limit_on_store_error` says what
    happens: ``local`` buckets of this process (each proxy then allows the whole limit),
    ``allow`` without limits, or ``deny`` (503). A WARNING says so once, an INFO line when
    Redis answers again; meanwhile no request waits for it.
    """

    def __init__(self, clock: Callable[[], int] = monotonic_us) -> None:
        self.local = MemoryStore(clock=clock)
        self.nonces = NonceMemory()  # signed requests' nonces, when they are not shared through Redis
        self.redis: RedisStore | None = None
        self.settings = Settings()
        self.store_url = "memory"  # settings.rate_limit_store with its secrets filled in: never shown
        self.limits: RateLimits | None = None
        self.unreachable_since: float | None = None
        self.reachable: bool | None = None  # None: not asked yet
        self.last_error = ""
        self._probe: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # -- configuration (event loop) -------------------------------------------------------

    def install(
        self, limits: RateLimits, settings: Settings, store_url: str | None = None, hide: Sequence[str] = ()
    ) -> None:
        """Use the limits and settings of a policy just put in force; buckets of unchanged limits stay.

        ``store_url`` is the store with its secrets filled in (settings show the placeholders);
        ``hide``: those secrets, never repeated in an error text."""
        self.limits = limits
        self.local.max_buckets = settings.rate_limit_max_buckets
        self.local.use_limits(limits)
        store_url = store_url or settings.rate_limit_store
        store = (store_url, settings.rate_limit_store_timeout_ms)
        before = (self.store_url, self.settings.rate_limit_store_timeout_ms)
        self.settings = settings
        self.store_url = store_url
        if self.redis is not None and store == before:
            return
        self._drop_redis()
        self.unreachable_since = None
        self.reachable = None
        self.last_error = ""
        if settings.rate_limit_store != "memory":
            try:
                shown = redacted_url(settings.rate_limit_store)
                self.redis = RedisStore(store_url, settings.rate_limit_store_timeout_ms / 1000, shown, hide)
            except Exception as e:  # the URL passed the loader but not redis-py: a store that is never there
                self.unreachable_since = time.time()
                self.last_error = f"cannot use it: {type(e).__name__}"
                logger.warning(f"knoxcall: rate limit store {redacted_url(settings.rate_limit_store)}: "
                               f"{self.last_error}; rate_limit_on_store_error: {settings.rate_limit_on_store_error}")
                return
            self._start_probe(first=True)

    def _drop_redis(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self.redis is not None:
            old, self.redis = self.redis, None
            with contextlib.suppress(RuntimeError):  # no loop (tests, shutdown): nothing to close on
                task = asyncio.get_running_loop().create_task(old.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def stop(self) -> None:
        """At shutdown: stop probing, close the Redis connections in the background."""
        self._drop_redis()

    async def close(self) -> None:
        """Stop probing and close the Redis connections; return when they are closed."""
        self._drop_redis()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- per request ----------------------------------------------------------------------

    def check(self, limits: RateLimits, decision: Decision) -> Checked | Awaitable[Checked]:
        """The decision after ``limits`` (the policy's), and the flow's ``rate_limit`` (None when none apply).

        A tuple at once, or (Redis) an awaitable of one.
        """
        if not limits.any:
            return decision, None
        checks = limits.checks(decision)
        if not checks:
            return decision, None
        if self.settings.rate_limit_store == "memory":
            return self._local(decision, checks)
        if self.redis is None or self.unreachable_since is not None:
            return self._store_error(decision, checks)
        return self._shared(self.redis, decision, checks)

    def _local(self, decision: Decision, checks: list[Check]) -> Checked:
        clock = self.local.clock
        now = time.monotonic_ns() // 1000 if clock is monotonic_us else clock()  # the usual clock, inline
        if len(checks) == 1:
            # the usual case: one bucket, with room. What outcome() and Outcome.info() give
            # then, from the level alone; the decision stays as it is (limited_decision)
            limit, key = checks[0]
            level = self.local.take_one(limit, key, now)
            if level is not None:
                return decision, {
                    "kind": limit.kind,
                    "limit": limit.spec.burst,
                    "remaining": max(0, (limit.cap - level) // limit.window_us),
                    "reset": math.ceil(time.time() + -(-level // limit.requests) / 1_000_000),
                }
        consumed, now = self.local.consume(checks, now)
        result = outcome(checks, consumed, now)
        wall = time.time()  # the bucket's clock is monotonic; the headers' reset is Unix time
        return limited_decision(decision, result), result.info(wall)

    async def _shared(self, store: RedisStore, decision: Decision, checks: list[Check]) -> Checked:
        try:
            consumed, now = await store.consume(checks)
        except Exception as e:  # unreachable, slow, refused the script: the fallback decides
            self._unreachable(store, e)
            return self._store_error(decision, checks)
        self.reachable = True
        result = outcome(checks, consumed, now)
        return limited_decision(decision, result), result.info(now / 1_000_000)  # Redis's clock, as its buckets

    def _store_error(self, decision: Decision, checks: list[Check]) -> Checked:
        count_rate_limit_store_error()  # /metrics (nothing when knoxcall_metrics is off)
        policy = self.settings.rate_limit_on_store_error
        if policy == "local":
            return self._local(decision, checks)
        if policy == "allow":
            return decision, None
        shown = redacted_url(self.settings.rate_limit_store)
        return unavailable_decision(decision, f"rate limit store {shown} unavailable"), None

    # -- nonces of signed requests ----------------------------------------------------------

    def remember_nonce(self, key: str, expires_at: float) -> NonceAnswer | Awaitable[NonceAnswer]:
        """True for a (client, nonce) not seen before (now remembered), False for a replay, None
        when it cannot be told (memory full; Redis unreachable and ``rate_limit_on_store_error:
        deny``). With Redis, shared by every proxy using it; else, or when Redis cannot be asked
        (``local`` and ``allow`` alike: a replay check is never skipped), in this process."""
        if self.settings.rate_limit_store == "memory":
            return self.nonces.remember(key, expires_at)
        if self.redis is None or self.unreachable_since is not None:
            return self._nonce_fallback(key, expires_at)
        return self._shared_nonce(self.redis, key, expires_at)

    async def _shared_nonce(self, store: RedisStore, key: str, expires_at: float) -> NonceAnswer:
        try:
            return await store.remember(key, math.ceil((expires_at - time.time()) * 1000))
        except Exception as e:
            self._unreachable(store, e)
            return self._nonce_fallback(key, expires_at)

    def _nonce_fallback(self, key: str, expires_at: float) -> NonceAnswer:
        if self.settings.rate_limit_on_store_error == "deny":
            return None
        return self.nonces.remember(key, expires_at)

    # -- health ---------------------------------------------------------------------------

    def _unreachable(self, store: RedisStore, error: BaseException) -> None:
        """A request could not ask Redis: fall back (see the class) until a probe finds it again."""
        if self._mark_unreachable(store, error):
            self._start_probe(drop_connections=True)

    def _mark_unreachable(self, store: RedisStore, error: BaseException) -> bool:
        """Note the error; log the WARNING and return True when this starts an outage."""
        if store is not self.redis:
            return False  # a store replaced meanwhile (reload)
        self.last_error = store.describe_error(error)
        self.reachable = False
        if self.unreachable_since is not None:
            return False
        self.unreachable_since = time.time()
        fallback = {
            "local": "counting in this process alone (each proxy allows the whole limit)",
            "allow": "allowing requests without rate limits",
            "deny": "refusing rate-limited requests with 503",
        }[self.settings.rate_limit_on_store_error]
        logger.warning(
            f"knoxcall: rate limit store {store.shown} unreachable ({self.last_error}): {fallback} until it is back "
            f"(rate_limit_on_store_error: {self.settings.rate_limit_on_store_error})"
        )
        return True

    def _start_probe(self, first: bool = False, drop_connections: bool = False) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside the event loop (CLI, tests): the first request finds out
        if self._probe is None or self._probe.done():
            self._probe = loop.create_task(self._watch(first, drop_connections))

    async def _watch(self, first: bool, drop_connections: bool = False) -> None:
        """Ask Redis until it answers: at once after (re)configuration, else every PROBE_SECONDS.

        Runs only while the store is unreachable (or not yet asked) and is the one in use.
        """
        store = self.redis
        if store is not None and drop_connections:
            await store.drop_connections()
        while store is not None and store is self.redis:
            if not first:
                await asyncio.sleep(PROBE_SECONDS)
            try:
                await store.ping()
            except Exception as e:
                if first:
                    self._mark_unreachable(store, e)
                first = False
                continue
            if store is not self.redis:
                return
            if self.unreachable_since is not None:
                logger.info(f"knoxcall: rate limit store {store.shown} is reachable again: limits are shared again")
            elif first:
                logger.info(f"knoxcall: rate limit store {store.shown} reachable: limits are shared")
            self.unreachable_since = None
            self.reachable = True
            self.last_error = ""
            return

    def status_lines(self) -> list[str]:
        """For ``knoxcall.status``: the limits, the store and its health."""
        limits = self.limits
        if limits is None or not limits.any:
            counts = "none configured"
        else:
            kinds = [limit.kind for limit in limits.by_prefix.values()]
            counts = ", ".join(f"{kinds.count(k)} {k}" for k in KINDS if k in kinds)
        local = (
            f"{len(self.local.buckets)} buckets in this process (at most {self.local.max_buckets}; "
            f"{self.local.dropped_early} dropped before they were full)"
        )
        nonces = self.nonces
        if nonces.seen or nonces.refused_full:
            memory = "shared through Redis; here only while it cannot be asked" if self.redis else "this process"
            signed = (f"signed requests: {len(nonces.seen)} nonces remembered in memory ({memory}; at most "
                      f"{nonces.max_entries}, {nonces.refused_full} refused while full)")  # fmt: skip
        else:
            signed = ""
        if self.settings.rate_limit_store == "memory":
            return [f"rate limits: {counts}; store: memory (this process), {local}", *filter(None, [signed])]
        if self.unreachable_since is None:
            health = "reachable" if self.reachable else "not asked yet"
        else:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.unreachable_since))
            health = (
                f"UNREACHABLE since {since} ({self.last_error}); "
                f"rate_limit_on_store_error: {self.settings.rate_limit_on_store_error}"
            )
        return [
            f"rate limits: {counts}; store: {redacted_url(self.settings.rate_limit_store)} (shared), {health}",
            f"rate limits, local buckets: {local}",
            *filter(None, [signed]),
        ]
