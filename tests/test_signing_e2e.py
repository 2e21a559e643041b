"""Signed requests end to end: a real mitmdump in reverse mode, a real upstream that records
what it received, callers bound to 127.0.0.x sources, and (for nonces shared between proxies)
a real redis-server. The signing secrets are random per run and searched for in every log.

acme 127.0.0.16/29 (calls from 127.0.0.17) signs with acme_v2 (a variable) or acme_v1 (a file).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from knoxcall_addon.signing import sign
from tests.e2e_util import Recorder, assert_denial, record_for
from tests.harness import MitmDump, client_from
from tests.redisserver import RedisServer

ACME = "127.0.0.17"
STRANGER = "127.0.0.99"
BODY = b'{"amount": 100, "to": "acme"}'

CONFIG = """\
settings:
  rate_limit_store: {store}
secrets:
  - name: acme_v2
    env: KC_E2E_SIGN_V2
  - name: acme_v1
    file: ../secrets/acme_v1
  - name: partner_token
    env: KC_E2E_TOKEN
clients:
  - name: acme
    ip_address: 127.0.0.16/29
    signing_secrets: ["{{{{secret:acme_v2}}}}", "{{{{secret:acme_v1}}}}"]
routes:
  - name: payments
    match: {{path_prefix: /pay}}
    signature: {{required: true, tolerance_sec: 300}}
    inject_headers: {{Authorization: "Bearer {{{{secret:partner_token}}}}"}}
  - name: nonced
    match: {{path_prefix: /nonced}}
    signature: {{nonce: true}}
  - name: open
    match: {{path_prefix: /open}}
    requires_clients: false
    signature: {{}}
  - name: plain
    match: {{path_prefix: /plain}}
assignments:
  payments: {{production: [acme]}}
  nonced: {{production: [acme]}}
  plain: {{production: [acme]}}
"""


class Setup:
    def __init__(self, root: Path, store: str = "memory") -> None:
        self.values = {"v2": secrets.token_urlsafe(24), "v1": secrets.token_hex(20), "token": secrets.token_hex(16)}
        (root / "secrets").mkdir(exist_ok=True)
        (root / "secrets" / "acme_v1").write_text(self.values["v1"] + "\n")
        self.folder = root / "config"
        self.folder.mkdir(exist_ok=True)
        (self.folder / "knoxcall.yaml").write_text(CONFIG.format(store=store))
        self.env = {"KC_E2E_SIGN_V2": self.values["v2"], "KC_E2E_TOKEN": self.values["token"]}
        self.root = root

    def proxy(self, recorder: Recorder, name: str = "mitmdump", extra: tuple[str, ...] = ()) -> MitmDump:
        return MitmDump(self.folder, mode=f"reverse:{recorder.url}", env=self.env, extra=extra,
                        access_log=self.root / f"{name}.jsonl", log_path=self.root / f"{name}.log")  # fmt: skip


def signed(secret: str, method: str, path: str, body: bytes, *, ts: int | None = None, nonce: str | None = None):
    timestamp = str(ts if ts is not None else int(time.time()))
    headers = {"X-Timestamp": timestamp, "X-Signature": sign(secret, timestamp, method, path, body, nonce)}
    if nonce is not None:
        headers["X-Nonce"] = nonce
    return headers


def post(proxy: MitmDump, path: str, body: bytes, headers: dict[str, str], source: str = ACME) -> httpx.Response:
    with client_from(source) as client:
        return client.post(proxy.url + path, content=body, headers=headers)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def upstream_names(recorder: Recorder) -> set[str]:
    return {name.lower() for name, _ in recorder.seen[-1]["headers"]}


def refused(response: httpx.Response, proxy: MitmDump, reason: str) -> None:
    request_id = assert_denial(response, 401, {"error": "Invalid signature", "status": 401})
    assert record_for(proxy, request_id)["reason"] == reason
    assert f"denied {reason} " in proxy.wait_for_log(request_id)


def test_signed_requests_pass_without_their_signature_headers_and_bad_ones_are_refused(tmp_path, recorder):
    setup = Setup(tmp_path)
    v2, v1 = setup.values["v2"], setup.values["v1"]
    with setup.proxy(recorder) as proxy:
        response = post(proxy, "/pay/now?x=1", BODY, signed(v2, "POST", "/pay/now?x=1", BODY))
        assert response.status_code == 200, response.text
        assert recorder.seen[-1]["body"] == BODY
        names = upstream_names(recorder)
        assert not names & {"x-signature", "x-timestamp", "x-nonce"}  # removed before forwarding
        assert recorder.headers()["authorization"] == [f"Bearer {setup.values['token']}"]  # injected after the check
        # rotation: the client's older secret signs too
        assert post(proxy, "/pay/now", BODY, signed(v1, "POST", "/pay/now", BODY)).status_code == 200
        seen = len(recorder.seen)
        # tampered body, path or method; a stranger's secret; an old or a future timestamp; nothing at all
        headers = signed(v2, "POST", "/pay/now", BODY)
        refused(post(proxy, "/pay/now", BODY.replace(b"100", b"900"), headers), proxy, "signature_invalid")
        refused(post(proxy, "/pay/later", BODY, headers), proxy, "signature_invalid")
        other = signed(secrets.token_hex(8), "POST", "/pay/now", BODY)
        refused(post(proxy, "/pay/now", BODY, other), proxy, "signature_invalid")
        old = signed(v2, "POST", "/pay/now", BODY, ts=int(time.time()) - 3600)
        refused(post(proxy, "/pay/now", BODY, old), proxy, "signature_expired")
        ahead = signed(v2, "POST", "/pay/now", BODY, ts=int(time.time()) + 3600)
        refused(post(proxy, "/pay/now", BODY, ahead), proxy, "signature_expired")
        refused(post(proxy, "/pay/now", BODY, {}), proxy, "signature_missing")
        with client_from(ACME) as client:  # a GET signs an empty body
            response = client.request("PUT", proxy.url + "/pay/now", content=BODY, headers=headers)
        refused(response, proxy, "signature_invalid")
        # an open route that requires signatures has no client to check against: refused
        refused(post(proxy, "/open", BODY, signed(v2, "POST", "/open", BODY), source=STRANGER), proxy,
                "signature_invalid")  # fmt: skip
        assert len(recorder.seen) == seen  # none of those reached the upstream
        # a route without signatures passes the headers on untouched
        assert post(proxy, "/plain", BODY, {"X-Signature": "caller's own"}).status_code == 200
        assert recorder.headers()["x-signature"] == ["caller's own"]
    logs = proxy.log_text() + (tmp_path / "mitmdump.jsonl").read_text()
    for value in setup.values.values():
        assert value not in logs


def test_a_nonce_is_accepted_once(tmp_path, recorder):
    setup = Setup(tmp_path)
    with setup.proxy(recorder) as proxy:
        headers = signed(setup.values["v2"], "POST", "/nonced", BODY, nonce="n-" + secrets.token_hex(6))
        assert post(proxy, "/nonced", BODY, headers).status_code == 200
        assert "x-nonce" not in upstream_names(recorder)
        refused(post(proxy, "/nonced", BODY, headers), proxy, "signature_replayed")
        # the same request with a fresh nonce but the old signature: the nonce is signed
        refused(post(proxy, "/nonced", BODY, {**headers, "X-Nonce": "n-fresh"}), proxy, "signature_invalid")
        assert len(recorder.seen) == 1


def status_or_closed(proxy: MitmDump, path: str, content: Any, headers: dict[str, str]) -> int | None:
    """The status, or None when the proxy closed the connection (how a streamed request is refused)."""
    try:
        with client_from(ACME) as client:
            return client.post(proxy.url + path, content=content, headers=headers).status_code
    except httpx.HTTPError:
        return None


def test_a_streamed_body_cannot_be_verified_and_is_refused(tmp_path, recorder):
    setup = Setup(tmp_path)
    big = b"x" * 4096
    with setup.proxy(recorder, extra=("--set", "stream_large_bodies=1k")) as proxy:
        # mitmproxy streams this body as it arrives: it cannot also answer, so the connection is closed
        assert status_or_closed(proxy, "/pay", big, signed(setup.values["v2"], "POST", "/pay", big)) in (None, 413)
        # a body of unknown length might be streamed too: refused at its headers
        chunked = iter([b'{"a": ', b"1}"])
        assert status_or_closed(proxy, "/pay", chunked, signed(setup.values["v2"], "POST", "/pay", b'{"a": 1}')) in (
            None,
            413,
        )
        deadline = time.monotonic() + 10
        while len([r for r in proxy.access_records() if r["reason"] == "signature_unverifiable"]) < 2:
            assert time.monotonic() < deadline, proxy.access_records()
            time.sleep(0.05)
        assert recorder.seen == []
        # small bodies are still checked and forwarded
        assert post(proxy, "/pay", BODY, signed(setup.values["v2"], "POST", "/pay", BODY)).status_code == 200


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def test_with_redis_a_replay_to_another_proxy_is_refused_too(tmp_path, recorder, redis_server):
    setup = Setup(tmp_path, store=redis_server.url)
    with setup.proxy(recorder, "first") as first, setup.proxy(recorder, "second") as second:
        for proxy in (first, second):
            proxy.wait_for_log("reachable: limits are shared")
        headers = signed(setup.values["v2"], "POST", "/nonced", BODY, nonce="n-" + secrets.token_hex(6))
        assert post(first, "/nonced", BODY, headers).status_code == 200
        refused(post(second, "/nonced", BODY, headers), second, "signature_replayed")
        assert len(recorder.seen) == 1
        assert len(redis_server.stored_keys("knoxcall:nonce:*")) == 1  # remembered in Redis, with an expiry
        ttl = int(redis_server.command("PTTL", redis_server.stored_keys("knoxcall:nonce:*")[0]).strip(b":\r\n"))
        assert 0 < ttl <= 301_000
