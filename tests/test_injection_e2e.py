"""Secrets injected into headers, end to end: a real mitmdump or mitmweb, a real upstream that
records what it received (and never repeats it), callers bound to 127.0.0.x sources.

The secret values are random per run. The upstream must receive them; nothing that shows a
flow may: mitmweb's flow API (also while the request is with the upstream, intercepted,
replayed), its flow dump, a ``-w`` file, the terminal at ``flow_detail=3``, the event and
access logs. Every one of those is searched for the values.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import io

from tests.e2e_util import Recorder, Web, h2_client
from tests.harness import MitmDump, client_from

OFFICE = "127.0.0.9"
PLACEHOLDER = "Bearer {{secret:partner_token}}"

CONFIG = """\
environments:
  - name: production
  - name: staging
secrets:
  - name: partner_token
    env: KC_TEST_PARTNER_TOKEN
    environments:
      staging: {file: ../secrets/partner_token}
clients:
  - name: office
    ip_address: 127.0.0.8/29
routes:
  - name: partner
    match: {path_prefix: /partner}
    inject_headers:
      Authorization: "Bearer {{secret:partner_token}}"
      X-Partner: plain
  - name: bare
    match: {path_prefix: /bare}
assignments:
  partner: {production: [office], staging: [office]}
  bare: {production: [office]}
"""


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    """A config folder, the staging secret file beside it, and the random values."""
    values = {"production": secrets.token_hex(16), "staging": secrets.token_urlsafe(24)}
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "partner_token").write_text(values["staging"] + "\n")
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG)
    return {"folder": folder, "values": values, "env": {"KC_TEST_PARTNER_TOKEN": values["production"]}}


def assert_nowhere(values: list[str], *texts: str | bytes) -> None:
    for value in values:
        for i, text in enumerate(texts):
            data = text.encode() if isinstance(text, str) else text
            assert value.encode() not in data, f"a secret value is in sight (text {i} of {len(texts)})"


def get(proxy: MitmDump, path: str, **kwargs: Any) -> httpx.Response:
    with client_from(OFFICE) as client:
        return client.get(proxy.url + path, **kwargs)


def test_the_upstream_gets_the_secret_and_the_terminal_and_a_saved_flow_show_the_placeholder(setup, recorder, tmp_path):
    saved = tmp_path / "flows.mitm"
    access = tmp_path / "access.jsonl"
    proxy = MitmDump(
        setup["folder"], mode=f"reverse:{recorder.url}", access_log=access, log_path=tmp_path / "mitmdump.log",
        env=setup["env"], extra=["-w", str(saved), "--set", "flow_detail=3", "--set", f"confdir={tmp_path / 'conf'}"],
    )  # fmt: skip
    values = list(setup["values"].values())
    with proxy:
        # the caller's own Authorization is replaced, not kept beside ours
        response = get(proxy, "/partner/a?x=1", headers={"Authorization": "Bearer the-callers-own"})
        assert response.status_code == 200
        got = recorder.headers()
        assert got["authorization"] == [f"Bearer {setup['values']['production']}"]
        assert got["x-partner"] == ["plain"]
        response = get(proxy, "/partner/b", headers={"x-knoxcall-environment": "staging"})
        assert response.status_code == 200
        assert recorder.headers()["authorization"] == [f"Bearer {setup['values']['staging']}"]
        with h2_client(OFFICE) as client:  # HTTP/2 from the caller, HTTP/1.1 to the upstream
            response = client.get(f"https://127.0.0.1:{proxy.port}/partner/h2")
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        assert recorder.headers()["authorization"] == [f"Bearer {setup['values']['production']}"]
        # a caller cannot have a placeholder filled in on a route that injects nothing
        assert get(proxy, "/bare", headers={"X-Echo": PLACEHOLDER}).status_code == 200
        assert recorder.headers()["x-echo"] == [PLACEHOLDER]
    log = proxy.log_text()
    assert PLACEHOLDER in log  # flow_detail=3 prints the request headers: ours as the flow holds them
    raw = saved.read_bytes()
    with saved.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    shown = [flow.request.headers.get("authorization") for flow in flows if flow.request.path.startswith("/partner")]
    assert shown == [PLACEHOLDER] * 3
    assert_nowhere(values, log, raw, access.read_bytes())


def request_headers(flow: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in flow["request"]["headers"]}


def in_background(proxy: MitmDump, path: str) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    """A request that waits (held by the upstream, or intercepted) in a thread; its answer, or
    what went wrong, lands in the list."""
    answers: list[httpx.Response | Exception] = []

    def send() -> None:
        try:
            with client_from(OFFICE, timeout=30) as client:
                answers.append(client.get(proxy.url + path))
        except Exception as e:  # reported by the test's assertion
            answers.append(e)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, answers


def answered(thread: threading.Thread, answers: list[httpx.Response | Exception], proxy: MitmDump) -> None:
    thread.join(30)
    assert answers, f"no answer:\n{proxy.log_text()[-3000:]}"
    assert isinstance(answers[0], httpx.Response), f"{answers[0]!r}\n{proxy.log_text()[-3000:]}"
    assert answers[0].status_code == 200, answers[0].text


def test_mitmweb_shows_the_placeholder_while_the_upstream_has_the_request_and_after(setup, recorder, tmp_path):
    """The upstream holds the request: mitmweb's view has the flow all that time (since
    requestheaders), and its API serves it; it must show the placeholder, and the upstream
    must already have the value."""
    values = list(setup["values"].values())
    with Web(setup["folder"], recorder.url, tmp_path, setup["env"]) as web:
        thread, answers = in_background(web.proxy, "/partner/hold")
        assert recorder.arrived.wait(10), "the request did not reach the upstream"
        assert recorder.headers()["authorization"] == [f"Bearer {setup['values']['production']}"]
        text, _ = web.flows()
        flow = web.flow_for("/partner/hold")
        assert "response" not in flow  # in flight
        assert request_headers(flow)["authorization"] == PLACEHOLDER
        assert_nowhere(values, text)
        recorder.release.set()
        answered(thread, answers, web.proxy)
        text, _ = web.flows()
        dump = web.api.get("/flows/dump")
        assert dump.status_code == 200
        assert_nowhere(values, text, dump.content)
        flows = list(io.FlowReader(BytesIO(dump.content)).stream())
        assert [f.request.headers["authorization"] for f in flows] == [PLACEHOLDER]
        status = web.run("knoxcall.status")
        fingerprint = hashlib.sha256(setup["values"]["production"].encode()).hexdigest()[:8]
        assert f"production: environment variable KC_TEST_PARTNER_TOKEN sha256:{fingerprint}" in status
        assert_nowhere(values, status)
    assert_nowhere(values, web.proxy.log_text())


def test_an_intercepted_then_resumed_and_a_replayed_flow_show_the_placeholder(setup, recorder, tmp_path):
    values = list(setup["values"].values())
    with Web(setup["folder"], recorder.url, tmp_path, setup["env"]) as web:
        assert web.api.put("/options", json={"intercept": "~q & ~u held"}).status_code == 200
        thread, answers = in_background(web.proxy, "/partner/held")
        deadline = time.monotonic() + 10
        while not (flow := web.flow_for("/partner/held")).get("intercepted"):
            assert time.monotonic() < deadline, "the flow was not intercepted"
            time.sleep(0.05)
        assert recorder.seen == []  # held by mitmweb, not sent
        assert request_headers(flow)["authorization"] == PLACEHOLDER
        assert_nowhere(values, web.flows()[0])
        assert web.api.post(f"/flows/{flow['id']}/resume").status_code == 200
        answered(thread, answers, web.proxy)
        assert recorder.headers()["authorization"] == [f"Bearer {setup['values']['production']}"]
        # mitmweb's replay sends the flow (as shown) again: decided and injected again
        assert web.api.put("/options", json={"intercept": ""}).status_code == 200
        assert web.api.post(f"/flows/{flow['id']}/replay").status_code == 200
        deadline = time.monotonic() + 10
        while len(recorder.seen) < 2:
            assert time.monotonic() < deadline, "the replay did not reach the upstream"
            time.sleep(0.05)
        assert recorder.headers()["authorization"] == [f"Bearer {setup['values']['production']}"]
        deadline = time.monotonic() + 10
        while not (replayed := web.flow_for("/partner/held")).get("response"):  # replayed in place
            assert time.monotonic() < deadline, "the replay was not answered"
            time.sleep(0.05)
        assert replayed["is_replay"] == "request"
        assert request_headers(replayed)["authorization"] == PLACEHOLDER
        text, _ = web.flows()
        assert_nowhere(values, text, web.api.get("/flows/dump").content)
    assert_nowhere(values, web.proxy.log_text())


def test_the_access_log_and_metadata_name_no_secret(setup, recorder, tmp_path):
    access = tmp_path / "access.jsonl"
    proxy = MitmDump(setup["folder"], mode=f"reverse:{recorder.url}", access_log=access, env=setup["env"],
                     log_path=tmp_path / "mitmdump.log")  # fmt: skip
    with proxy:
        assert get(proxy, "/partner/x").status_code == 200
        deadline = time.monotonic() + 10
        while not proxy.access_records():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    record = proxy.access_records()[0]
    assert record["decision"] == "allowed" and record["route"] == "partner"
    assert_nowhere(list(setup["values"].values()), json.dumps(record), proxy.log_text())


def _kubernetes_layout(secrets_dir: Path, value: str) -> None:
    """A Secret volume as the kubelet writes it: partner_token -> ..data/partner_token, ..data -> ..v1."""
    (secrets_dir / "partner_token").unlink()
    _kubernetes_swap(secrets_dir, value, "v1")
    (secrets_dir / "partner_token").symlink_to("..data/partner_token")


def _kubernetes_swap(secrets_dir: Path, value: str, version: str) -> None:
    """A rotation as the kubelet does it: a new timestamped folder, then ``..data`` swapped by a rename."""
    target = secrets_dir / f"..{version}"
    target.mkdir()
    (target / "partner_token").write_text(value + "\n")
    (secrets_dir / "..data_tmp").symlink_to(target.name)
    (secrets_dir / "..data_tmp").rename(secrets_dir / "..data")


def _replace(path: Path, text: str) -> None:
    """Write a file the safe way (a temporary file renamed over it), as secret managers do."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.rename(path)


def _staging_value(proxy: MitmDump, recorder: Recorder, expected: str, timeout: float = 15) -> None:
    """Ask until the upstream receives ``expected`` in staging (the reload is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        assert get(proxy, "/partner/s", headers={"x-knoxcall-environment": "staging"}).status_code == 200
        if recorder.headers()["authorization"] == [f"Bearer {expected}"]:
            return
        assert time.monotonic() < deadline, f"not in force within {timeout}s:\n{proxy.log_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize("layout", ["file", "kubernetes"])
def test_a_rotated_secret_file_is_in_force_without_a_restart_and_a_broken_one_changes_nothing(
    setup, recorder, tmp_path, layout
):
    secrets_dir = tmp_path / "secrets"
    first, second, third = setup["values"]["staging"], secrets.token_hex(12), secrets.token_hex(12)
    if layout == "kubernetes":
        _kubernetes_layout(secrets_dir, first)
    proxy = MitmDump(setup["folder"], mode=f"reverse:{recorder.url}", env=setup["env"],
                     log_path=tmp_path / "mitmdump.log")  # fmt: skip
    with proxy:
        assert f"{secrets_dir}" in proxy.wait_for_log("for config changes")  # the secret's folder is watched
        _staging_value(proxy, recorder, first)
        if layout == "kubernetes":
            _kubernetes_swap(secrets_dir, second, "v2")
        else:
            _replace(secrets_dir / "partner_token", second + "\n")
        proxy.wait_for_log("secrets ~partner_token(value)")
        _staging_value(proxy, recorder, second)
        # an empty secret is an error: the last good config (and value) stays in force
        if layout == "kubernetes":
            _kubernetes_swap(secrets_dir, "", "v3")
        else:
            _replace(secrets_dir / "partner_token", "")
        log = proxy.wait_for_log("is invalid, still serving")
        assert "secret partner_token has no value in staging" in log
        _staging_value(proxy, recorder, second)
        # fixed: in force again
        if layout == "kubernetes":
            _kubernetes_swap(secrets_dir, third, "v4")
        else:
            _replace(secrets_dir / "partner_token", third)
        _staging_value(proxy, recorder, third)
    assert_nowhere([first, second, third, setup["values"]["production"]], proxy.log_text())
