"""The adapter's signed-request path on test flows: decided at the headers, checked at the body,
and never forwarded unchecked (a lost check, a flow that ends early)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.http import Headers, HTTPFlow
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from knoxcall_addon import injection
from knoxcall_addon.proxy_addon import METADATA_KEY, KnoxCall
from knoxcall_addon.signing import sign

CONFIG = """\
secrets:
  - name: acme
    env: KC_ADDON_SIGN
  - name: token
    env: KC_ADDON_TOKEN
clients:
  - name: acme
    ip_address: 127.0.0.0/29
    signing_secrets: ["{{secret:acme}}"]
routes:
  - name: pay
    target_base_url: https://backend.example.com/base
    match: {path_prefix: /pay}
    signature: {}
    inject_headers: {Authorization: "Bearer {{secret:token}}"}
assignments:
  pay: {production: [acme]}
"""


@pytest.fixture
def values(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    found = {"sign": secrets.token_hex(12), "token": secrets.token_hex(12)}
    monkeypatch.setenv("KC_ADDON_SIGN", found["sign"])
    monkeypatch.setenv("KC_ADDON_TOKEN", found["token"])
    return found


@pytest.fixture
def folder(tmp_path: Path, values: dict[str, str]) -> Path:
    (tmp_path / "knoxcall.yaml").write_text(CONFIG)
    return tmp_path


def addon_for(folder: Path) -> Iterator[KnoxCall]:
    addon = KnoxCall()
    with taddons.context(addon) as context:
        context.configure(addon, knoxcall_config=str(folder))
        yield addon
    addon.done()


@pytest.fixture
def addon(folder: Path) -> Iterator[KnoxCall]:
    yield from addon_for(folder)


def signed_flow(secret: str, body: bytes = b'{"a": 1}', path: str = "/pay?x=1") -> HTTPFlow:
    timestamp = str(int(time.time()))
    headers = [("X-Timestamp", timestamp), ("X-Signature", sign(secret, timestamp, "POST", path, body))]
    request = tutils.treq(host="api.example.com", port=80, method=b"POST", path=path.encode(),
                          headers=Headers([(k.encode(), v.encode()) for k, v in headers]), content=body)  # fmt: skip
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = ("127.0.0.5", 50000)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    return flow


def test_decided_at_the_headers_checked_at_the_body_then_forwarded(addon, values):
    flow = signed_flow(values["sign"])
    addon.requestheaders(flow)
    assert flow.response is None and flow.request.host == "api.example.com"  # nothing forwarded yet
    assert addon.drain.in_flight() == 1  # a drain waits for its body too
    assert flow.metadata[METADATA_KEY]["signature"] == "pending"
    addon.request(flow)
    assert flow.response is None
    assert flow.request.host == "backend.example.com" and flow.request.path == "/base/pay?x=1"
    assert "x-signature" not in flow.request.headers and "x-timestamp" not in flow.request.headers
    assert flow.request.headers["authorization"] == "Bearer {{secret:token}}"
    assert injection.is_armed(flow.request)
    assert flow.metadata[METADATA_KEY]["decision"] == "allowed" and "signature" not in flow.metadata[METADATA_KEY]
    assert addon.drain.in_flight() == 1  # (now decided: until its response)
    addon.responseheaders(flow)  # (no response yet in a test flow: only the disarm matters)
    assert not injection.is_armed(flow.request)


def test_a_tampered_body_is_refused_and_nothing_is_forwarded(addon, values):
    flow = signed_flow(values["sign"])
    addon.requestheaders(flow)
    flow.request.content = b'{"a": 2}'
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 401
    assert flow.metadata[METADATA_KEY]["reason"] == "signature_invalid"
    assert flow.request.host == "api.example.com"  # never re-targeted
    assert "authorization" not in flow.request.headers  # nothing injected


def test_a_check_lost_in_a_script_reload_refuses_the_request(folder, values):
    """The instance that decided the headers is gone when the body is in: never forwarded unchecked."""
    flow = signed_flow(values["sign"])
    first, second = KnoxCall(), KnoxCall()
    with taddons.context(first) as context:
        context.configure(first, knoxcall_config=str(folder))
        first.requestheaders(flow)
        first.done()  # what a script reload does to the old instance
        context.configure(second, knoxcall_config=str(folder))
        second.request(flow)
    second.done()
    assert flow.response is not None and flow.response.status_code == 500


def test_a_request_that_ends_before_its_body_is_logged_refused_and_not_answered(addon, values):
    flow = signed_flow(values["sign"])
    addon.requestheaders(flow)
    flow.error = tflow.terr()
    addon.error(flow)
    assert flow.response is None
    assert flow.metadata[METADATA_KEY]["reason"] == "signature_missing"
    assert addon._awaiting_body == {}


KEY = "signing-unit-key"


def test_a_refused_signed_request_keeps_no_api_key_on_the_flow(tmp_path, values):
    """Decided at the headers (the key still on the request), then refused without an answer
    (it ended) or for an error: the flow keeps no key, as any refused request (replay.forget_key)."""
    keys = f'api_keys:\n  - name: live\n    key_sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
    (tmp_path / "knoxcall.yaml").write_text(CONFIG + keys)
    for addon in addon_for(tmp_path):
        ended = signed_flow(values["sign"])
        ended.request.headers["x-knoxcall-key"] = KEY
        addon.requestheaders(ended)
        assert ended.metadata[METADATA_KEY]["signature"] == "pending" and "x-knoxcall-key" in ended.request.headers
        ended.error = tflow.terr()
        addon.error(ended)
        assert ended.response is None and ended.metadata[METADATA_KEY]["reason"] == "signature_missing"
        assert "x-knoxcall-key" not in ended.request.headers

        lost = signed_flow(values["sign"])
        lost.request.headers["x-knoxcall-key"] = KEY
        addon.requestheaders(lost)
        addon._awaiting_body.clear()  # as after a script reload: refused for an internal error
        addon.request(lost)
        assert lost.response is not None and lost.response.status_code == 500
        assert "x-knoxcall-key" not in lost.request.headers
