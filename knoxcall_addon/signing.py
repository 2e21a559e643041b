"""Signed requests: what a caller signs, checking a signature, and remembering nonces.

The caller sends ``X-Timestamp`` (Unix seconds) and ``X-Signature``: the lowercase hex
HMAC-SHA256, keyed with the secret's UTF-8 bytes, of ``timestamp + METHOD + path + body``
(no separators; the path as sent, with its query; the raw body bytes). With ``nonce: true``
it also sends ``X-Nonce``, and signs ``timestamp + nonce + METHOD + path + body``: a nonce
is accepted once per client within the tolerance window.

Pure (no mitmproxy): the proxy passes the request's header fields and body, a clock and a
nonce store; `knoxcall sign` uses `sign`. Signatures are compared in constant time, against
every secret of the client (rotation: any one may match).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from knoxcall_addon.model import Config, Problem, SignatureSpec, shown
from knoxcall_addon.secretsource import value_for
from knoxcall_addon.yamlsource import LocatedDict

if TYPE_CHECKING:  # decision imports policy, which compiles the signing keys
    from knoxcall_addon.decision import Decision

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Timestamp"
NONCE_HEADER = "X-Nonce"
SIGNED_HEADERS = frozenset({b"x-signature", b"x-timestamp", b"x-nonce"})  # removed before forwarding
SIGNATURE_KEYS = ("required", "tolerance_sec", "nonce")
MAX_TOLERANCE_SEC = 86_400
MAX_NONCES = 200_000  # nonces remembered in memory at most (about 40 MB); beyond: refused, never forgotten early

MISSING = "signature_missing"
EXPIRED = "signature_expired"
INVALID = "signature_invalid"
REPLAYED = "signature_replayed"
UNVERIFIABLE = "signature_unverifiable"  # the body is streamed (stream_large_bodies): it cannot be checked
NONCE_UNAVAILABLE = "signature_nonce_unavailable"  # nonce store unreachable and rate_limit_on_store_error: deny
REASONS = (MISSING, EXPIRED, INVALID, REPLAYED, UNVERIFIABLE, NONCE_UNAVAILABLE)

_TIMESTAMP = re.compile(rb"[0-9]{1,12}")
_NONCE = re.compile(rb"[\x21-\x7e]{1,128}")  # printable ASCII without spaces
_HEX64 = re.compile(rb"[0-9a-fA-F]{64}")


def read_signature(mapping: LocatedDict, what: str) -> tuple[SignatureSpec | None, list[Problem]]:
    """A route's ``signature: {required, tolerance_sec, nonce}`` (defaults: true, 300, false)."""
    if "signature" not in mapping:
        return None, []
    value = mapping["signature"]
    where = mapping.where("signature")
    if not isinstance(value, LocatedDict):
        return None, [
            Problem(where, f"{what}: signature must be a mapping like {{required: true, tolerance_sec: 300}}")
        ]
    problems = [
        Problem(value.where(key), f"unknown key {shown(key)} in {what} signature; allowed: {', '.join(SIGNATURE_KEYS)}")
        for key in value
        if key not in SIGNATURE_KEYS
    ]
    required = value.get("required", True)
    nonce = value.get("nonce", False)
    tolerance = value.get("tolerance_sec", 300)
    for key, flag in (("required", required), ("nonce", nonce)):
        if not isinstance(flag, bool):
            problems.append(Problem(value.where(key), f"{what}: signature {key} must be true or false"))
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 1 <= tolerance <= MAX_TOLERANCE_SEC:
        problems.append(
            Problem(
                value.where("tolerance_sec"),
                f"{what}: signature tolerance_sec must be a whole number of seconds, 1 to {MAX_TOLERANCE_SEC}",
            )
        )
    if problems:
        return None, problems
    return SignatureSpec(required=required, tolerance_sec=tolerance, nonce=nonce), []


# -- what is signed --------------------------------------------------------------------------


def message(timestamp: bytes, method: bytes, path: bytes, body: bytes, nonce: bytes | None = None) -> bytes:
    """The bytes a caller signs: timestamp + [nonce +] METHOD + path + body."""
    return b"".join((timestamp, nonce or b"", method, path, body))


def sign(secret: str, timestamp: str, method: str, path: str, body: bytes, nonce: str | None = None) -> str:
    """The X-Signature value for a request (what `knoxcall sign` prints)."""
    data = message(
        timestamp.encode(), method.encode(), path.encode(), body, nonce.encode() if nonce is not None else None
    )
    return hmac.new(secret.encode("utf-8", "surrogateescape"), data, hashlib.sha256).hexdigest()


# -- compiled at load ------------------------------------------------------------------------


def signing_keys(config: Config) -> dict[tuple[str, str], tuple[bytes, ...]]:
    """(client, environment) -> the client's signing secrets there, as HMAC keys."""
    result: dict[tuple[str, str], tuple[bytes, ...]] = {}
    for client in config.clients.values():
        if not client.signing_secrets:
            continue
        for environment in config.environments:
            keys = [value_for(config, name, environment) for name in client.signing_secrets]
            result[(client.name, environment)] = tuple(k.encode("utf-8", "surrogateescape") for k in keys if k)
    return result


def required_signatures(config: Config) -> dict[str, SignatureSpec]:
    """route -> its signature spec, for enabled routes that require signed requests."""
    return {
        route.name: route.signature
        for route in config.routes.values()
        if route.enabled and route.signature is not None and route.signature.required
    }


# -- checking one request --------------------------------------------------------------------


class Verdict(NamedTuple):
    """A signature's check: ``reason`` None when it is good (then ``nonce`` is to be remembered)."""

    reason: str | None
    detail: str
    nonce: bytes | None = None
    expires_at: float = 0.0  # until when the nonce must be remembered


def signed_fields(fields: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """The values of X-Signature, X-Timestamp and X-Nonce among a request's header fields."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        lowered = name.lower()
        if lowered in SIGNED_HEADERS:
            found.setdefault(lowered, []).append(value)
    return found


def verify(
    spec: SignatureSpec,
    keys: Sequence[bytes],
    fields: Sequence[tuple[bytes, bytes]],
    method: str,
    path: str,
    body: bytes,
    now: float,
) -> Verdict:
    """Check a request's signature against the client's ``keys`` (any one may match).

    In this order: the headers are there (missing), the timestamp is Unix seconds (invalid)
    within ``tolerance_sec`` of ``now`` (expired), the signature matches (invalid). The
    replay check is the caller's, after a good signature (see `NonceMemory`), so that no
    unsigned request can fill the nonce memory.
    """
    found = signed_fields(fields)
    wanted = [b"x-timestamp", b"x-signature"] + ([b"x-nonce"] if spec.nonce else [])
    absent = [name.decode() for name in wanted if name not in found]
    if absent:
        return Verdict(MISSING, f"no {', '.join(absent)} header")
    if any(len(found[name]) > 1 for name in wanted):
        return Verdict(INVALID, "a signature header was sent more than once")
    timestamp, signature = found[b"x-timestamp"][0].strip(), found[b"x-signature"][0].strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        return Verdict(INVALID, "X-Timestamp is not Unix seconds")
    skew = now - int(timestamp)
    if abs(skew) > spec.tolerance_sec:
        return Verdict(EXPIRED, f"X-Timestamp is {abs(skew):.0f} s {'old' if skew > 0 else 'ahead'}, "
                                f"more than the {spec.tolerance_sec} s allowed")  # fmt: skip
    nonce = None
    if spec.nonce:
        nonce = found[b"x-nonce"][0].strip()
        if not _NONCE.fullmatch(nonce):
            return Verdict(INVALID, "X-Nonce must be 1 to 128 printable ASCII characters without spaces")
    if not keys:
        return Verdict(INVALID, "the client has no signing secret here")
    data = message(
        timestamp, method.encode("utf-8", "surrogateescape"), path.encode("utf-8", "surrogateescape"), body, nonce
    )
    provided = signature.lower() if _HEX64.fullmatch(signature) else b"0" * 64
    matched = False
    for key in keys:  # every key, whatever matched: the time does not tell which
        expected = hmac.new(key, data, hashlib.sha256).hexdigest().encode()
        matched |= hmac.compare_digest(expected, provided)
    if not matched or not _HEX64.fullmatch(signature):
        return Verdict(INVALID, "the signature does not match")
    return Verdict(None, "", nonce, int(timestamp) + spec.tolerance_sec + 1)


def nonce_key(client: str, nonce: bytes) -> str:
    """The name a (client, nonce) pair is remembered by."""
    return f"{client}:{nonce.decode('ascii')}"  # (a client name holds no colon)


class NonceMemory:
    """(client, nonce) pairs seen, each until its request would have expired anyway.

    At most ``max_entries``: expired pairs go first; when it is full of live ones, a new
    nonce is refused (`remember` returns None) rather than one forgotten early, which would
    let a replay of it through.
    """

    def __init__(self, max_entries: int = MAX_NONCES, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.seen: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # min-heap over (expires_at, key)
        self.refused_full = 0

    def remember(self, key: str, expires_at: float) -> bool | None:
        """True: first time (now remembered); False: seen before; None: the memory is full."""
        now = self.clock()
        self._forget_expired(now)
        if key in self.seen:
            return False
        if len(self.seen) >= self.max_entries:
            self.refused_full += 1
            return None
        self.seen[key] = expires_at
        heapq.heappush(self._expiry, (expires_at, key))
        return True

    def _forget_expired(self, now: float) -> None:
        heap, seen = self._expiry, self.seen
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            if seen.get(key) == expires_at:
                del seen[key]


NonceAnswer = bool | None  # see NonceMemory.remember
NonceStore = Callable[[str, float], "NonceAnswer | Awaitable[NonceAnswer]"]


def before_body(decision: Decision, streamed: bool) -> Decision | None:
    """An allowed request on a signed route, at its headers: refused now (no client to check
    against, or a body that mitmproxy streams and so forwards unchecked), else None: check it
    once the body is in (`check_signed`)."""
    if decision.client is None:
        return refused(decision, INVALID, "no client matched (open route or test key): no secret to check it with")
    if streamed:
        detail = "the body is streamed (stream_large_bodies): it cannot be checked before it is forwarded"
        return refused(decision, UNVERIFIABLE, detail)
    return None


def check_signed(
    decision: Decision,
    spec: SignatureSpec,
    keys: Sequence[bytes],
    request: tuple[Sequence[tuple[bytes, bytes]], str, str, bytes | None],
    remember: NonceStore,
    now: float,
) -> Decision | Awaitable[Decision]:
    """The decision once the body is in: ``decision`` when the signature is good (and its nonce
    new), else refused. ``request`` is (header fields, method and path as sent, raw body)."""
    fields, method, path, body = request
    if body is None:
        return refused(decision, UNVERIFIABLE, "the body was streamed")
    verdict = verify(spec, keys, fields, method, path, body, now)
    if verdict.reason is not None:
        return refused(decision, verdict.reason, verdict.detail)
    if verdict.nonce is None:
        return decision
    answer = remember(nonce_key(decision.client or "", verdict.nonce), verdict.expires_at)
    if answer is None or isinstance(answer, bool):
        return _after_nonce(decision, answer)
    return _after_nonce_later(decision, answer)


async def _after_nonce_later(decision: Decision, answer: Awaitable[NonceAnswer]) -> Decision:
    return _after_nonce(decision, await answer)


def _after_nonce(decision: Decision, new: NonceAnswer) -> Decision:
    if new is False:
        return refused(decision, REPLAYED, "this client's nonce was used before")
    if new is None:
        return refused(decision, NONCE_UNAVAILABLE, "the nonce store cannot tell whether it was used before")
    return decision


def refused(decision: Decision, reason: str, detail: str) -> Decision:
    """The decision for a request whose signature was refused; its body never says which check
    failed (the reason and the detail are for the logs)."""
    if reason == UNVERIFIABLE:
        status, body = 413, {"error": "Request body too large to verify its signature", "status": 413}
    elif reason == NONCE_UNAVAILABLE:
        status, body = 503, {"error": "Nonce store unavailable", "status": 503}
    else:
        status, body = 401, {"error": "Invalid signature", "status": 401}
    return dataclasses.replace(
        decision, allowed=False, reason=reason, status=status, target_url=None, body=body, detail=detail
    )


def explain_lines(
    spec: SignatureSpec, client_keys: Mapping[tuple[str, str], tuple[bytes, ...]], client: str | None, environment: str
) -> list[str]:
    """For `knoxcall explain`: what a signed route asks of the caller."""
    what = "X-Timestamp, X-Nonce and X-Signature" if spec.nonce else "X-Timestamp and X-Signature"
    once = ", each nonce once" if spec.nonce else ""
    lines = [f"  signature: required ({what}, within {spec.tolerance_sec} s{once}; checked once the body is in)"]
    if client is None:
        lines.append("    no client matched (open route or test key): refused, no secret to check it with")
    else:
        count = len(client_keys.get((client, environment), ()))
        lines.append(f"    client {client} has {count} signing secret(s) here; any one may sign")
    return lines
