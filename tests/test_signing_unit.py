"""Signed requests, unit by unit: known vectors (computed with openssl, and with hmac here),
tolerance edges, rotation, tampering, nonces and replays, the nonce memory's bound, lint,
explain and `knoxcall sign`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import secrets
import time

import pytest

from knoxcall_addon.cli import main
from knoxcall_addon.lint import lint
from knoxcall_addon.model import SignatureSpec
from knoxcall_addon.policy import load_policy
from knoxcall_addon.signing import (
    EXPIRED,
    INVALID,
    MISSING,
    REPLAYED,
    NonceMemory,
    check_signed,
    message,
    sign,
    verify,
)

TS = "1700000000"
BODY = b'{"amount":100}'
PATH = "/v1/pay?x=1"
# openssl dgst -sha256 -hmac acme-v2-secret of the message, computed outside Python
VECTOR = "fdeaa14e696bd32614fadd584913fef0e3704ed26c9861d06f3dfb69874d5952"
VECTOR_NONCE = "6a2ff8320451b757744d736444226373bc7a42ce8595a2206281ff598123e659"  # nonce n-0001
VECTOR_UTF8_KEY = "eff2ef346e4d945d21d5b6fbcaf8fc881ff4fc8463d45635ef10916680a79711"  # key "k€y", GET /v1/status


def fields(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]


def test_known_vectors():
    assert sign("acme-v2-secret", TS, "POST", PATH, BODY) == VECTOR
    assert sign("acme-v2-secret", TS, "POST", PATH, BODY, nonce="n-0001") == VECTOR_NONCE
    assert sign("k€y", TS, "GET", "/v1/status", b"") == VECTOR_UTF8_KEY  # keyed with the secret's UTF-8 bytes
    independent = hmac.new(b"acme-v2-secret", (TS + "POST" + PATH).encode() + BODY, hashlib.sha256).hexdigest()
    assert independent == VECTOR


SPEC = SignatureSpec(tolerance_sec=300)
KEY = b"acme-v2-secret"


def check(headers: list[tuple[bytes, bytes]], now: float, *, body: bytes = BODY, keys=(KEY,), spec=SPEC, path=PATH):
    return verify(spec, keys, headers, "POST", path, body, now)


def test_a_good_signature_passes_and_tampering_fails():
    good = fields(X_Timestamp=TS, X_Signature=VECTOR)
    assert check(good, int(TS)).reason is None
    assert check(good, int(TS), body=b'{"amount":1000}').reason == INVALID  # body
    assert check(good, int(TS), path="/v1/pay?x=2").reason == INVALID  # query
    assert verify(SPEC, (KEY,), good, "PUT", PATH, BODY, int(TS)).reason == INVALID  # method
    assert check(fields(X_Timestamp="1700000001", X_Signature=VECTOR), int(TS)).reason == INVALID  # timestamp
    assert check(fields(X_Timestamp=TS, X_Signature=VECTOR.upper()), int(TS)).reason is None  # hex in any case
    assert check(fields(X_Timestamp=TS, X_Signature=VECTOR[:-1]), int(TS)).reason == INVALID
    assert check(fields(X_Timestamp=TS, X_Signature="zz" * 32), int(TS)).reason == INVALID


@pytest.mark.parametrize(
    ("skew", "reason"),
    [(0, None), (300, None), (301, EXPIRED), (-300, None), (-301, EXPIRED), (86_400, EXPIRED)],
)
def test_tolerance_edges(skew, reason):
    assert check(fields(X_Timestamp=TS, X_Signature=VECTOR), int(TS) + skew).reason == reason


def test_rotation_any_secret_of_the_client_may_sign():
    old, new = b"acme-v1-secret", KEY
    good = fields(X_Timestamp=TS, X_Signature=VECTOR)
    assert check(good, int(TS), keys=(new, old)).reason is None
    assert check(good, int(TS), keys=(old, new)).reason is None
    assert check(good, int(TS), keys=(old,)).reason == INVALID
    assert check(good, int(TS), keys=()).reason == INVALID


def test_missing_and_doubled_headers():
    assert check(fields(X_Signature=VECTOR), int(TS)).reason == MISSING
    assert check(fields(X_Timestamp=TS), int(TS)).reason == MISSING
    doubled = [*fields(X_Timestamp=TS, X_Signature=VECTOR), (b"x-signature", VECTOR.encode())]
    assert check(doubled, int(TS)).reason == INVALID
    assert check(fields(X_Timestamp="17e8", X_Signature=VECTOR), int(TS)).reason == INVALID
    nonce_spec = SignatureSpec(nonce=True)
    assert check(fields(X_Timestamp=TS, X_Signature=VECTOR), int(TS), spec=nonce_spec).reason == MISSING


def test_with_a_nonce_the_nonce_is_signed_too():
    spec = SignatureSpec(nonce=True)
    good = fields(X_Timestamp=TS, X_Nonce="n-0001", X_Signature=VECTOR_NONCE)
    verdict = check(good, int(TS), spec=spec)
    assert verdict.reason is None and verdict.nonce == b"n-0001"
    assert verdict.expires_at == int(TS) + 300 + 1
    # a captured request with a fresh nonce does not match: the nonce is part of the message
    fresh = fields(X_Timestamp=TS, X_Nonce="n-0002", X_Signature=VECTOR_NONCE)
    assert check(fresh, int(TS), spec=spec).reason == INVALID
    spaced = fields(X_Timestamp=TS, X_Nonce="has space", X_Signature=VECTOR_NONCE)
    assert check(spaced, int(TS), spec=spec).reason == INVALID


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_nonce_is_accepted_once_within_the_window_and_memory_stays_bounded():
    clock = Clock(1000.0)
    memory = NonceMemory(max_entries=3, clock=clock)
    assert memory.remember("acme\0n1", 1300) is True
    assert memory.remember("acme\0n1", 1300) is False  # replay
    assert memory.remember("other\0n1", 1300) is True  # per client
    assert memory.remember("acme\0n2", 1200) is True
    assert memory.remember("acme\0n3", 1300) is None  # full of live nonces: refused, none forgotten early
    assert len(memory.seen) == 3
    clock.now = 1200  # n2's window is over: it goes, and makes room
    assert memory.remember("acme\0n3", 1500) is True
    assert memory.remember("acme\0n1", 1300) is False  # still within its window
    clock.now = 1300
    assert memory.remember("acme\0n1", 1600) is True  # its request would have expired: remembered anew
    assert len(memory.seen) <= 3


def test_check_signed_refuses_a_replay_and_says_which_in_the_logs_only(tmp_path, make_config, monkeypatch):
    monkeypatch.setenv("KC_SIGN_V2", "acme-v2-secret")
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    from knoxcall_addon.decision import RequestFacts, decide

    decision = decide(policy, RequestFacts(peer="198.51.100.1", method="POST", path=PATH, route="nonced"))
    assert decision.allowed and decision.client == "acme"
    spec = policy.signatures["nonced"]
    keys = policy.signing_keys[("acme", "production")]
    memory = NonceMemory(clock=Clock(int(TS)))
    sent = (fields(X_Timestamp=TS, X_Nonce="n-0001", X_Signature=VECTOR_NONCE), "POST", PATH, BODY)
    assert check_signed(decision, spec, keys, sent, memory.remember, int(TS)) is decision
    replayed = check_signed(decision, spec, keys, sent, memory.remember, int(TS))
    assert replayed.reason == REPLAYED and replayed.status == 401
    assert replayed.body == {"error": "Invalid signature", "status": 401}  # never says which
    assert replayed.target_url is None and not replayed.allowed

    async def later(key: str, expires_at: float) -> bool:
        return False

    async def run():
        return await check_signed(decision, spec, keys, sent, later, int(TS))

    assert asyncio.run(run()).reason == REPLAYED


CONFIG = """\
secrets:
  - name: acme_v2
    env: KC_SIGN_V2
clients:
  - name: acme
    ip_address: 198.51.100.0/28
    signing_secrets: ["{{secret:acme_v2}}"]
  - name: office
    ip_address: 127.0.0.8/29
routes:
  - name: nonced
    signature: {required: true, nonce: true}
  - name: payments
    signature: {tolerance_sec: 60}
    inject_headers: {Authorization: "Bearer {{secret:acme_v2}}"}
  - name: open
    requires_clients: false
    signature: {}
assignments:
  nonced: {production: [acme]}
  payments: {production: [acme, office]}
"""


def test_lint_says_when_an_assigned_client_cannot_sign(make_config, monkeypatch):
    monkeypatch.setenv("KC_SIGN_V2", "x")
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    found = [f for f in lint(policy.config) if f.rule == "unsigned-client"]
    assert len(found) == 1 and found[0].severity == "error"
    assert 'client "office"' in found[0].message and 'route "payments"' in found[0].message


def test_explain_says_a_route_requires_a_signature_and_refuses_an_open_caller(make_config, monkeypatch):
    value = secrets.token_hex(8)
    monkeypatch.setenv("KC_SIGN_V2", value)
    folder = make_config(**{"k.yaml": CONFIG})
    out = io.StringIO()
    main(["explain", str(folder), "--ip", "198.51.100.1", "--route", "payments", "--method", "POST"], out=out)
    text = out.getvalue()
    assert "signature: required (X-Timestamp and X-Signature, within 60 s" in text
    assert "client acme has 1 signing secret(s) here" in text
    assert "injects: Authorization: Bearer {{secret:acme_v2}}" in text
    out = io.StringIO()
    main(["explain", str(folder), "--ip", "203.0.113.5", "--route", "open"], out=out)
    assert out.getvalue().startswith("DENIED (401): signature_invalid")
    assert value not in text + out.getvalue()


def test_knoxcall_sign_prints_headers_and_curl(tmp_path, monkeypatch):
    monkeypatch.setenv("KC_SIGN_CLI", "acme-v2-secret")
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    out = io.StringIO()
    argv = ["sign", "--secret-env", "KC_SIGN_CLI", "--method", "POST", "--path", PATH, "--body-file", str(body),
            "--timestamp", TS, "--url", "http://127.0.0.1:8080"]  # fmt: skip
    assert main(argv, out=out) == 0
    text = out.getvalue()
    assert f"X-Timestamp: {TS}\nX-Signature: {VECTOR}\n" in text
    assert f"curl -X POST 'http://127.0.0.1:8080{PATH}' -H 'X-Timestamp: {TS}' -H 'X-Signature: {VECTOR}'" in text
    assert "acme-v2-secret" not in text
    out = io.StringIO()
    assert main([*argv, "--nonce", "n-0001"], out=out) == 0
    assert f"X-Nonce: n-0001\nX-Signature: {VECTOR_NONCE}\n" in out.getvalue()
    monkeypatch.delenv("KC_SIGN_CLI")
    assert main(argv, out=io.StringIO()) == 2


def test_nonces_when_redis_cannot_be_asked_local_checks_here_deny_refuses(make_config, monkeypatch):
    """A replay check is never skipped: without Redis, this process remembers (local, allow) or refuses (deny)."""
    from knoxcall_addon.model import Settings
    from knoxcall_addon.ratestore import RateLimiter

    monkeypatch.setenv("KC_SIGN_V2", "x")
    limits = load_policy(make_config(**{"k.yaml": CONFIG})).rate_limits
    nowhere = "redis://127.0.0.1:1/0"  # nothing listens on port 1: refused at once, on loopback
    expires = time.time() + 60

    async def twice(on_error: str) -> list[bool | None]:
        limiter = RateLimiter()
        limiter.install(limits, Settings(rate_limit_store=nowhere, rate_limit_on_store_error=on_error))
        answers = []
        for _ in range(2):
            answer = limiter.remember_nonce("acme:n-1", expires)
            answers.append(await answer if not isinstance(answer, bool | None) else answer)
        await limiter.close()
        return answers

    assert asyncio.run(twice("local")) == [True, False]
    assert asyncio.run(twice("allow")) == [True, False]
    assert asyncio.run(twice("deny")) == [None, None]


def test_a_signing_secret_with_bytes_that_are_not_utf8_loads_and_signs(make_config, monkeypatch):
    """os.environ holds such bytes as surrogates: they are the key's bytes, as for injected
    values, never an encoding error whose text would quote a piece of the secret."""
    raw = b"acme-\xff-secret"
    monkeypatch.setenv("KC_SIGN_V2", raw.decode("utf-8", "surrogateescape"))
    policy = load_policy(make_config(**{"k.yaml": CONFIG}))
    assert raw in policy.signing_keys[("acme", "production")]
    assert sign(raw.decode("utf-8", "surrogateescape"), TS, "POST", PATH, BODY) == hmac.new(
        raw, message(TS.encode(), b"POST", PATH.encode(), BODY, None), hashlib.sha256
    ).hexdigest()
