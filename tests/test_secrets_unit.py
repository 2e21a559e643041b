"""Secrets at load: sources, values, placeholders, and the errors that name them (never a value).

Real config folders and files; values are random per run and every message is searched for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import secrets
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import RequestHeaders
from mitmproxy.test import tflow

from knoxcall_addon import injection
from knoxcall_addon.cli import main
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ConfigError, SecretValues
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.secretsource import Injection, read_source
from tests.harness import ROOT, run_mitmdump_expecting_exit

BASE = """\
environments:
  - name: production
  - name: staging
clients:
  - name: office
    ip_address: 127.0.0.8/29
assignments:
  partner: {production: [office], staging: [office]}
"""

SECRETS = """\
secrets:
  - name: partner_token       # line 2
    env: KC_UNIT_TOKEN        # line 3
    environments:
      staging: {file: token}  # line 5: relative to the config folder
"""

PLACEHOLDER = "Bearer {{secret:partner_token}}"
ROUTE = """\
routes:
  - name: partner
    match: {path_prefix: /partner}
    inject_headers:
      Authorization: "Bearer {{secret:partner_token}}"
"""


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    value = secrets.token_hex(16)
    monkeypatch.setenv("KC_UNIT_TOKEN", value)
    return value


def folder_with(tmp_path: Path, *texts: str, staging: str | None = "from-the-file\n") -> Path:
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    for i, text in enumerate(texts):
        (folder / f"part{i}.yaml").write_text(text)
    if staging is not None:
        (folder / "token").write_text(staging)
    return folder


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    return [str(p) for p in info.value.problems]


def test_a_value_comes_from_the_variable_or_per_environment_from_a_file(tmp_path, token):
    policy = load_policy(folder_with(tmp_path, SECRETS, ROUTE, staging="from the file\n"))
    production = policy.injections[("partner", "production")]
    assert production.fields == ((b"Authorization", b"Bearer {{secret:partner_token}}"),)
    assert production.wire == ((b"authorization", b"Bearer {{secret:partner_token}}", f"Bearer {token}".encode()),)
    assert policy.injections[("partner", "staging")].wire[0][2] == b"Bearer from the file"
    # a file loses exactly one trailing newline
    (tmp_path / "two").write_text("line one\nline two\n\n")
    assert read_source("file", str(tmp_path / "two")) == ("line one\nline two\n", "")


def test_a_missing_value_names_file_line_secret_and_source_and_never_a_value(tmp_path, monkeypatch):
    monkeypatch.delenv("KC_UNIT_TOKEN", raising=False)
    folder = folder_with(tmp_path, SECRETS, ROUTE, staging=None)
    found = problems_of(folder)
    assert f"{folder}/part0.yaml:3: secret partner_token has no value in production: environment variable " \
           "KC_UNIT_TOKEN is not set (used by route partner inject_headers Authorization)" in found  # fmt: skip
    assert f"{folder}/part0.yaml:5: secret partner_token has no value in staging: file {folder}/token does not " \
           "exist (used by route partner inject_headers Authorization)" in found  # fmt: skip


def test_an_empty_value_is_no_value_and_a_value_with_a_line_break_cannot_go_into_a_header(tmp_path, token):
    folder = folder_with(tmp_path, SECRETS, ROUTE, staging="\n")
    assert any("staging: file" in p and "is empty" in p for p in problems_of(folder))
    hidden = secrets.token_hex(8)
    (folder / "token").write_text(f"{hidden}\r\nsecond-line")
    found = problems_of(folder)
    assert any("holds a line break or control character" in p for p in found)
    assert not any(hidden in p for p in found)


def test_only_secrets_in_force_need_a_value(tmp_path, monkeypatch):
    monkeypatch.delenv("KC_UNIT_TOKEN", raising=False)
    disabled = ROUTE.replace("  - name: partner\n", "  - name: partner\n    enabled: false\n")
    load_config(folder_with(tmp_path, SECRETS, disabled, staging=None))  # a disabled route: not in force
    unused = SECRETS + "  - name: unused\n    file: /nonexistent/knoxcall-unit\n"
    monkeypatch.setenv("KC_UNIT_TOKEN", "x")
    load_config(folder_with(tmp_path, unused, ROUTE))  # a secret nothing uses may lack a value


def test_an_environment_override_false_removes_the_injection(tmp_path, token):
    route = ROUTE + "    environments:\n      staging: {inject_headers: false}\n"
    policy = load_policy(folder_with(tmp_path, SECRETS, route, staging=None))  # staging needs no value now
    assert ("partner", "production") in policy.injections
    assert ("partner", "staging") not in policy.injections


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("secrets:\n  - name: a\n    env: A\n    file: /x\n", "give exactly one source, env or file, not both"),
        ("secrets:\n  - name: a\n", "needs a source: env: VARIABLE or file: PATH"),
        ("secrets:\n  - name: a b\n    env: A\n", "secret name 'a b' must match"),
        ("secrets:\n  - name: a\n    env: 1A\n", "is not an environment variable name"),
        ("secrets:\n  - name: a\n    env: A\n    environments: {qa: {env: B}}\n", "unknown environment 'qa'"),
        ("secrets:\n  - name: a\n    env: A\n  - name: a\n    env: B\n", "secret 'a' is defined twice"),
        (ROUTE.replace("partner_token", "partner_tokn"), "names unknown secret 'partner_tokn' (did you mean"),
        (ROUTE.replace("{{secret:partner_token}}", "{{ secret:partner_token }}"), "without spaces"),
        (ROUTE.replace("Authorization", "Host"), "Host cannot be injected"),
        (ROUTE.replace("Authorization", "x-knoxcall-route"), "cannot be injected"),
        (ROUTE.replace("Authorization", "Bad Name"), "is not a header name"),
        (ROUTE + "    description: '{{secret:partner_token}}'\n", "may appear only in inject_headers values"),
        ("settings:\n  client_ip_header: '{{secret:partner_token}}'\n", "may appear only in inject_headers"),
        (
            "clients:\n  - name: acme\n    ip_address: 10.0.0.1\n    signing_secrets: [literal-value]\n",
            "each signing secret is a reference {{secret:NAME}}",
        ),
    ],
)
def test_mistakes_are_config_errors(tmp_path, token, text, message):
    parts = [SECRETS, text] if text.startswith("routes") else [SECRETS, ROUTE, text]
    if text.startswith("secrets"):
        parts = [text, ROUTE.replace("partner_token", "a")]
    found = problems_of(folder_with(tmp_path, *parts))
    assert any(message in p for p in found), found


def test_the_store_url_takes_its_password_from_a_secret_percent_encoded(tmp_path, monkeypatch, token):
    password = "p@ss/" + secrets.token_hex(6)
    monkeypatch.setenv("KC_UNIT_REDIS", password)
    store = "settings:\n  rate_limit_store: 'redis://:{{secret:redis}}@127.0.0.1:6390/0'\n"
    secret = "  - name: redis\n    env: KC_UNIT_REDIS\n"
    policy = load_policy(folder_with(tmp_path, SECRETS + secret, ROUTE, store))
    assert policy.store_url == f"redis://:p%40ss%2F{password[5:]}@127.0.0.1:6390/0"
    assert policy.settings.rate_limit_store == "redis://:{{secret:redis}}@127.0.0.1:6390/0"
    assert password in policy.store_secrets
    # a whole URL in a secret is taken as it is; one that is no URL is an error that never shows it
    monkeypatch.setenv("KC_UNIT_REDIS", "not a url " + password)
    whole = "settings:\n  rate_limit_store: '{{secret:redis}}'\n"
    found = problems_of(folder_with(tmp_path, SECRETS + secret, ROUTE, whole))
    assert any("with its secrets filled in is not a valid store URL" in p for p in found)
    assert not any(password in p for p in found)


def test_nothing_shows_a_value_check_shows_a_fingerprint(tmp_path, token, capsys):
    folder = folder_with(tmp_path, SECRETS, ROUTE)
    policy = load_policy(folder)
    assert token not in repr(policy.config) and token not in repr(policy.config.secret_values)
    out = io.StringIO()
    assert main(["check", str(folder)], out=out) == 0
    text = out.getvalue()
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]
    assert f"production: environment variable KC_UNIT_TOKEN sha256:{fingerprint}" in text
    assert token not in text and "from-the-file" not in text


def test_a_compiled_injection_shows_no_value(tmp_path, token):
    """An Injection holds the real values for the wire: its repr (a log line, an assertion's
    message, a traceback) shows the placeholders only."""
    policy = load_policy(folder_with(tmp_path, SECRETS, ROUTE))
    found = policy.injections[("partner", "production")]
    assert token.encode() in b"".join(value for _, _, value in found.wire)
    assert token not in repr(found) and token not in repr(policy.injections)
    assert "{{secret:partner_token}}" in repr(found)


def test_a_policy_whose_injected_secret_has_no_value_is_refused_not_sent_empty(tmp_path, token):
    """The loader refuses such a config (use_problems); a Config that reaches Policy by another
    way fails there too, rather than sending the header with an empty value."""
    config = load_policy(folder_with(tmp_path, SECRETS, ROUTE)).config
    with pytest.raises(ConfigError, match="secret partner_token has no value in production"):
        Policy(dataclasses.replace(config, secret_values=SecretValues()))


def _policy(tmp_path: Path, token: str) -> Policy:
    return load_policy(folder_with(tmp_path, SECRETS, ROUTE))


def test_mitmproxy_hands_the_server_side_a_copy_with_the_real_value(tmp_path, token):
    """The wire substitution itself: the RequestHeaders event that HTTP/1, /2 and /3 serialize."""
    assert injection.install() == ""
    policy = _policy(tmp_path, token)
    flow = http.HTTPFlow.__new__(http.HTTPFlow)
    flow.request = http.Request.make("GET", "http://upstream.test/partner", headers={"Authorization": "theirs"})
    injection.inject(flow, policy.injections[("partner", "production")])
    assert flow.request.headers.get_all("authorization") == ["Bearer {{secret:partner_token}}"]
    event = RequestHeaders(1, flow.request, True)
    assert event.request is not flow.request
    # a replay's event goes to the client side and becomes flow.request: never filled in
    assert RequestHeaders(1, flow.request, False, replay_flow=flow).request is flow.request
    assert event.request.headers["authorization"] == f"Bearer {token}"
    assert flow.request.headers["authorization"] == "Bearer {{secret:partner_token}}"  # the flow never changes
    injection.disarm(flow)
    assert RequestHeaders(1, flow.request, True).request is flow.request  # sent: nothing armed any more
    other = http.Request.make("GET", "http://upstream.test/", headers={"Authorization": PLACEHOLDER})
    assert RequestHeaders(1, other, True).request is other  # a caller's placeholder is never filled in


def test_an_edit_in_intercept_wins_over_the_injected_value(tmp_path, token):
    injection.install()
    policy = _policy(tmp_path, token)
    flow = http.HTTPFlow.__new__(http.HTTPFlow)
    flow.request = http.Request.make("GET", "http://upstream.test/partner")
    injection.inject(flow, policy.injections[("partner", "production")])
    flow.request.headers["Authorization"] = "Bearer edited-by-the-operator"
    assert RequestHeaders(1, flow.request, True).request.headers["authorization"] == "Bearer edited-by-the-operator"
    injection.disarm(flow)


def test_with_proxy_debug_on_a_secret_is_not_injected_but_refused(tmp_path, token):
    injection.install()
    policy = _policy(tmp_path, token)
    flow = http.HTTPFlow.__new__(http.HTTPFlow)
    flow.request = http.Request.make("GET", "http://upstream.test/partner")
    injection.set_debug(True)
    try:
        with pytest.raises(RuntimeError, match="proxy_debug"):
            injection.inject(flow, policy.injections[("partner", "production")])
    finally:
        injection.set_debug(False)
    assert not injection.is_armed(flow.request)


def test_a_missing_secret_at_start_refuses_to_start_and_says_which(tmp_path, monkeypatch):
    monkeypatch.delenv("KC_UNIT_TOKEN", raising=False)
    folder = folder_with(tmp_path, SECRETS, ROUTE)
    result = run_mitmdump_expecting_exit(folder)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "invalid config, not starting" in output
    assert "secret partner_token has no value in production: environment variable KC_UNIT_TOKEN is not set" in output
    assert "listening at" not in output


def test_the_shipped_schema_knows_the_new_keys() -> None:
    schema = (ROOT / "knoxcall_addon" / "config.schema.json").read_text()
    for key in ("secrets", "inject_headers", "signing_secrets", "signature", "tolerance_sec"):
        assert f'"{key}"' in schema


def test_the_cheap_wire_copy_is_the_plain_one_and_leaves_the_flow_alone(tmp_path, token):
    """injection.shallow_copy against copy.copy (plain_copy): the same state, nothing shared that could change."""
    request = http.Request.make(
        "POST", "http://upstream.test/partner?q=1", b"body", headers={"Authorization": "shown", "X-A": "1"}
    )
    fields = ((b"Authorization", b"real"), (b"X-A", b"1"))
    cheap, plain = injection.shallow_copy(request, fields), injection.plain_copy(request, fields)
    assert type(cheap) is type(plain) is http.Request and type(cheap.headers) is http.Headers
    assert cheap.get_state() == plain.get_state()
    assert cheap.headers["authorization"] == "real" and request.headers["authorization"] == "shown"
    assert cheap.data is not request.data and cheap.headers is not request.headers
    cheap.path = "/changed"  # what a server-side layer may do to its copy
    assert request.path == "/partner?q=1"
    assert cheap.stream is request.stream and cheap.content == request.content


def test_two_injected_headers_are_both_filled_in_on_the_wire(tmp_path):
    injection.install()
    flow = http.HTTPFlow.__new__(http.HTTPFlow)
    flow.request = http.Request.make("GET", "http://upstream.test/partner", headers={"X-Keep": "{{secret:a}}"})
    found = Injection(
        names=frozenset({b"authorization", b"x-api"}),
        fields=((b"Authorization", b"Bearer {{secret:a}}"), (b"X-Api", b"{{secret:b}}")),
        wire=((b"authorization", b"Bearer {{secret:a}}", b"Bearer A"), (b"x-api", b"{{secret:b}}", b"B")),
    )
    injection.inject(flow, found)
    try:
        sent = RequestHeaders(1, flow.request, True).request
        sent_fields = [field for field in sent.headers.fields if field[0] != b"content-length"]
        assert sent_fields == [(b"X-Keep", b"{{secret:a}}"), (b"Authorization", b"Bearer A"), (b"X-Api", b"B")]
        assert flow.request.headers["x-api"] == "{{secret:b}}"
    finally:
        injection.disarm(flow)


def test_an_armed_request_keeps_its_values_out_of_the_flows_state_and_copies(tmp_path, token):
    """The real values sit beside the request's state, never in it: a saved flow (get_state),
    mitmweb's copy of a flow and a replay hold the placeholder only."""
    injection.install()
    policy = _policy(tmp_path, token)
    flow = tflow.tflow()
    flow.request.path = "/partner"
    injection.inject(flow, policy.injections[("partner", "production")])
    try:
        assert injection.is_armed(flow.request)
        assert token not in repr(flow.get_state()) and token.encode() not in repr(flow.get_state()).encode()
        copied = flow.copy()
        assert not injection.is_armed(copied.request)
        assert copied.request.headers["authorization"] == "Bearer {{secret:partner_token}}"
        sent = RequestHeaders(1, flow.request, True).request
        assert sent.headers["authorization"] == f"Bearer {token}" and not injection.is_armed(sent)
    finally:
        injection.disarm(flow)
    assert not injection.is_armed(flow.request)
