"""`knoxcall new-key`, the config JSON Schema against the loader, and scripts/demo end to end."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from knoxcall_addon.cli import EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import load_policy
from tests.harness import ROOT

SCHEMA_PATH = ROOT / "knoxcall_addon" / "config.schema.json"

# -- new-key -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["live", "test"])
def test_new_key_prints_a_key_and_a_matching_entry(make_config, key_type):
    out = io.StringIO()
    assert main(["new-key", "--type", key_type, "--name", "deploy-bot"], out=out) == EXIT_OK
    text = out.getvalue()
    keys = re.findall(rf"^    (kc_{key_type}_[A-Za-z0-9_-]{{43}})$", text, re.MULTILINE)
    assert len(keys) == 1
    key = keys[0]
    entry = yaml.safe_load(text[text.index("  - name:") :])
    assert entry == [
        {
            "name": "deploy-bot",
            "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
            "type": key_type,
            "enabled": True,
        }
    ]
    # pasted into a config, the key is accepted by the proxy's own decision
    config = make_config(
        **{
            "k.yaml": {
                "environments": [{"name": "production"}, {"name": "dev"}],
                "routes": [{"name": "api", "requires_api_key": True, "requires_clients": False}],
                "api_keys": entry,
            }
        }
    )
    decision = decide(load_policy(config), RequestFacts(peer="127.0.0.1", route="api", environment="dev", api_key=key))
    assert decision.allowed and decision.api_key == "deploy-bot"


def test_new_keys_differ_and_default_to_live():
    first, second = io.StringIO(), io.StringIO()
    main(["new-key"], out=first)
    main(["new-key"], out=second)
    assert "kc_live_" in first.getvalue() and first.getvalue() != second.getvalue()
    assert main(["new-key", "--name", "bad name"], out=io.StringIO()) == EXIT_USAGE
    assert main(["new-key", "--type", "prod"], out=io.StringIO()) == EXIT_USAGE


# -- schema ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator, folder: Path) -> list[str]:
    errors = []
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        errors += [f"{path.name}: {e.message}" for e in validator.iter_errors(data)]
    return errors


def loader_errors(folder: Path) -> list[str]:
    try:
        load_policy(folder)
    except ConfigError as e:
        return [str(p) for p in e.problems]
    return []


@pytest.mark.parametrize("folder", ["config", "demo/config"])
def test_shipped_configs_pass_schema_and_loader(validator, folder):
    assert schema_errors(validator, ROOT / folder) == []
    assert loader_errors(ROOT / folder) == []
    for path in (ROOT / folder).glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema=")
        assert (path.parent / first.split("$schema=", 1)[1]).resolve() == SCHEMA_PATH


ENVS = "environments: [{name: production}, {name: dev}]\n"
GOOD = [
    ENVS,
    ENVS + "clients: [{name: a, ip_address: [10.0.0.1, '::1'], type: user, enabled: false, description: d}]",
    ENVS + "clients: [{name: a, ip_address: '10.0.0.0/8, 2001:db8::/32'}]",
    ENVS + "routes: [{name: r, target_base_url: 'https://x.example/base', match: {hosts: ['*.example.com'],"
    " path_prefix: /v1}, environments: {dev: {target_base_url: 'http://127.0.0.1:9', allowed_methods: [GET]}}}]",
    ENVS
    + "clients: [{name: a, ip_address: 10.0.0.1}]\nroutes: [{name: r}]\nassignments: {r: {production: [a], dev: a}}",
    ENVS + "api_keys: [{name: k, key_sha256: '" + "ab" * 32 + "', type: test, enabled: true, description: d}]",
    ENVS + "settings: {default_environment: dev, trusted_proxies: [10.0.0.1], client_ip_header: X-Real-IP,"
    " unmatched_requests: allow}",
    ENVS + "secrets: [{name: s, env: HOME, environments: {dev: {env: PATH}}}]\n"
    "routes: [{name: r, inject_headers: {X-Home: 'at {{secret:s}}'}, signature: {tolerance_sec: 60, nonce: true},"
    " environments: {dev: {inject_headers: false}}}]\n"
    "clients: [{name: a, ip_address: 10.0.0.1, signing_secrets: ['{{secret:s}}']}]",
]
BAD = [
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, colour: red}]",  # unknown key
    ENVS + "clients: [{name: a}]",  # ip_address missing
    ENVS + "clients: [{name: -a, ip_address: 10.0.0.1}]",  # bad name
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, type: robot}]",  # bad enum
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, enabled: 'yes'}]",  # string, not bool
    ENVS + "clients: [{name: a, ip_address: 'ten.0.0.1'}]",  # not an address
    ENVS + "clients: {name: a, ip_address: 10.0.0.1}",  # mapping, not list
    ENVS + "routes: [{name: r, target_base_url: 'ftp://x'}]",
    ENVS + "routes: [{name: r, requires_clients: 'no'}]",
    ENVS + "routes: [{name: r, match: {path_prefix: v1}}]",
    ENVS + "routes: [{name: r, allowed_methods: []}]",
    ENVS + "routes: [{name: r, environments: {dev: {requires_clients: false}}}]",
    ENVS + "api_keys: [{name: k, key_sha256: the-secret-itself}]",
    ENVS + "api_keys: [{name: k, key_sha256: '" + "ab" * 32 + "', type: prod}]",
    ENVS + "settings: {unmatched_requests: maybe}",
    ENVS + "settings: {default_environment: Prod}",
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1}]\nroutes: [{name: r}]\nassignments: {r: {production: [a, a]}}",
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1}]\nroutes: [{name: r}]\nassignments: {r: {production: {a: 1}}}",
    ENVS + "secrets: [{name: s, env: HOME, file: /x}]",  # two sources
    ENVS + "clients: [{name: a, ip_address: 10.0.0.1, signing_secrets: [the-secret-itself]}]",
    ENVS + "routes: [{name: r, signature: {tolerance_sec: 0}}]",
    ENVS + "routes: [{name: r, inject_headers: {'Bad Name': x}}]",
    "environments: [{name: Production}]",
    "colours: [red]",
    "- just a list",
]


@pytest.mark.parametrize("text", GOOD)
def test_schema_and_loader_accept_the_same_good_files(validator, make_config, text):
    folder = make_config(**{"k.yaml": text})
    assert schema_errors(validator, folder) == []
    assert loader_errors(folder) == []


@pytest.mark.parametrize("text", BAD)
def test_schema_and_loader_refuse_the_same_bad_files(validator, make_config, text):
    folder = make_config(**{"k.yaml": text})
    assert schema_errors(validator, folder), "the schema accepted it"
    assert loader_errors(folder), "the loader accepted it"


# -- demo --------------------------------------------------------------------------------


def test_demo_runs_to_completion_and_stops_what_it_started():
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=180, cwd=ROOT
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"response 200 \{\"upstream\": \"echo\"", out)
    assert "log knoxcall: allowed client 127.0.0.9 route=demo-api env=production client=demo-office" in out
    assert 'response 403 {"error": "IP not authorized"' in out
    assert "log knoxcall: denied ip_not_whitelisted 127.0.0.99" in out
    assert "denied client_not_assigned 127.0.0.17" in out and "denied client_disabled 127.0.0.33" in out
    assert "is assigned to demo-api only in staging, not in production" in out
    assert "demo done" in out
    port = int(re.search(r"proxy \(mitmdump\): +http://127\.0\.0\.1:(\d+)", out).group(1))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # mitmdump is gone
