"""Config loading: what loads, and every error naming file, line and what is wrong.

The config is written as YAML text (not dumped from Python values) so that the line
numbers the errors must name are visible in the test itself.
"""

from __future__ import annotations

import copy
import ipaddress
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent

ENVS = """\
environments:
  - name: production
  - name: staging
"""  # lines 1-3; everything appended starts at line 4


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors(folder: Path, *, policy: bool = False) -> list[str]:
    """The problems of a config that must not load, as 'file:line: message' with the folder removed."""
    with pytest.raises(ConfigError) as caught:
        (load_policy if policy else load_config)(folder)
    return [str(p).replace(f"{folder}/", "") for p in caught.value.problems]


def one_error(folder: Path, **kw: bool) -> str:
    found = errors(folder, **kw)
    assert len(found) == 1, found
    return found[0]


# -- what loads ------------------------------------------------------------------------


def test_example_config_folder_loads() -> None:
    """The shipped config/ is valid and compiles; scripts/run relies on it."""
    policy = load_policy(ROOT / "config")
    config = policy.config
    assert config.settings.default_environment == "production"
    assert {"production", "staging", "development"} <= set(config.environments)
    assert "my-first-route" in config.routes
    assert config.clients["dev-laptop"].networks == (
        ipaddress.ip_network("127.0.1.0/24"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.clients["old-vpn"].enabled is False
    assert policy.clients_by_ip.lookup(ipaddress.ip_address("127.0.0.5")) == ("office-network",)


def test_multi_file_merge_yml_yaml_hidden_and_empty(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a-settings.yaml", "settings:\n  default_environment: staging\n" + ENVS)
    write(folder, "b-clients.yml", "clients:\n  - name: one\n    ip_address: 10.0.0.1\n")
    write(folder, "c-more-clients.yaml", "clients:\n  - name: two\n    ip_address: [10.0.1.0/24]\n")
    write(folder, "d-routes.yaml", "routes:\n  - name: r\nassignments:\n  r: {staging: [one, two]}\n")
    write(folder, "e-empty.yaml", "")
    write(folder, "f-comment-only.yaml", "# nothing here yet\n")
    # Hidden files (editor swap files, ConfigMap's ..data) and other suffixes are not read,
    # even though they would be errors.
    write(folder, ".hidden.yaml", "clients: not-a-list\n")
    write(folder, "notes.txt", "bogus: [\n")
    write(folder, "backup.yaml.bak", "bogus: 1\n")
    config = load_config(folder)
    assert set(config.clients) == {"one", "two"}
    assert list(config.clients) == ["one", "two"]  # file order, then declaration order
    assert config.settings.default_environment == "staging"
    assert config.assigned_clients("r", "staging") == ("one", "two")
    assert [Path(f).name for f in config.files] == [
        "a-settings.yaml",
        "b-clients.yml",
        "c-more-clients.yaml",
        "d-routes.yaml",
        "e-empty.yaml",
        "f-comment-only.yaml",
    ]


def test_defaults_and_all_address_forms(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "k.yaml",
        ENVS
        + """\
clients:
  - name: single
    ip_address: 10.1.2.3
  - name: comma
    ip_address: "10.0.0.0/8, 2001:db8::/32 ,192.168.0.1"
  - name: listed
    type: user
    enabled: false
    ip_address: [172.16.0.0/12, "::1"]
  - name: mapped
    ip_address: "::ffff:10.9.9.9"
  - name: mapped-range
    ip_address: "::ffff:10.9.0.0/112"
""",
    )
    config = load_config(folder)
    net = ipaddress.ip_network
    assert config.clients["single"].networks == (net("10.1.2.3/32"),)
    assert config.clients["single"].type == "server" and config.clients["single"].enabled
    assert config.clients["comma"].networks == (net("10.0.0.0/8"), net("2001:db8::/32"), net("192.168.0.1/32"))
    assert config.clients["listed"].networks == (net("172.16.0.0/12"), net("::1/128"))
    assert config.clients["listed"].type == "user" and not config.clients["listed"].enabled
    # IPv4-mapped IPv6 is taken as the IPv4 address (callers' addresses are normalised the same way).
    assert config.clients["mapped"].networks == (net("10.9.9.9/32"),)
    assert config.clients["mapped-range"].networks == (net("10.9.0.0/16"),)
    s = config.settings
    assert (s.default_environment, s.client_ip_header, s.unmatched_requests, s.trusted_proxies) == (
        "production",
        "X-Forwarded-For",
        "deny",
        (),
    )


def test_route_fields_and_overrides(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "r.yaml",
        ENVS
        + """\
routes:
  - name: api
    target_base_url: https://api.example.com/base
    requires_api_key: true
    allowed_methods: [get, POST]
    match: {hosts: [API.Example.com, "*.example.org"], path_prefix: /v1/}
    environments:
      staging: {target_base_url: "http://127.0.0.1:9000", allowed_methods: [GET]}
""",
    )
    route = load_config(folder).routes["api"]
    assert route.requires_clients is True and route.requires_api_key is True and route.enabled is True
    assert route.allowed_methods == frozenset({"GET", "POST"})
    assert route.match is not None
    assert route.match.hosts == ("api.example.com", "*.example.org")
    assert route.match.path_prefix == "/v1"  # a trailing slash is the same segment prefix
    assert route.target_for("production") == "https://api.example.com/base"
    assert route.target_for("staging") == "http://127.0.0.1:9000"
    assert route.methods_for("staging") == frozenset({"GET"})
    assert route.methods_for("production") == frozenset({"GET", "POST"})


# -- errors: each names file and line ---------------------------------------------------


def test_broken_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "bad.yaml", ENVS + "clients:\n  - name: a\n    ip_address: [10.0.0.1\n")
    message = one_error(folder)
    assert message.startswith("bad.yaml:")
    assert "invalid YAML" in message
    line = int(message.split(":")[1])
    assert 6 <= line <= 7  # the unclosed flow list, or the end of the file just after it


def test_yaml_tab_indentation_error_has_line(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "bad.yaml", ENVS + "clients:\n\t- name: a\n")
    assert one_error(folder).startswith("bad.yaml:5: invalid YAML")


def test_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "bin.yaml").write_bytes(b"environments:\n  - name: production\n# caf\xe9\n")
    assert one_error(folder) == "bin.yaml:3: file is not valid UTF-8"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config folder does not exist"):
        load_config(tmp_path / "nope")


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS)
    write(folder, "list.yaml", "- name: production\n")
    assert one_error(folder).startswith("list.yaml:1: the file must be a mapping")


def test_duplicate_key_in_a_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "clients:\n  - name: a\n    ip_address: 10.0.0.1\n    ip_address: 10.0.0.2\n")
    assert one_error(folder) == "a.yaml:7: duplicate key 'ip_address' (first at line 6)"


def test_duplicate_top_level_key_points_at_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "environments:\n  - name: development\n")
    assert one_error(folder) == "a.yaml:4: duplicate key 'environments' (first at line 1)"


def test_name_defined_twice_in_one_file(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS + "clients:\n  - name: a\n    ip_address: 10.0.0.1\n  - name: a\n    ip_address: 10.0.0.2\n",
    )
    assert one_error(folder) == "a.yaml:7: client 'a' is defined twice (first at a.yaml:5)"


def test_name_defined_twice_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "routes:\n  - name: api\n")
    write(folder, "b.yml", "routes:\n  - {name: other}\n  - name: api\n")
    assert one_error(folder) == "b.yml:3: route 'api' is defined twice (first at a.yaml:5)"


def test_environment_and_setting_defined_twice_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "settings:\n  client_ip_header: X-Real-IP\n")
    write(folder, "b.yaml", "environments:\n  - name: staging\nsettings:\n  client_ip_header: X-Forwarded-For\n")
    found = errors(folder)
    assert "b.yaml:2: environment 'staging' is defined twice (first at a.yaml:3)" in found
    assert any(e.startswith("b.yaml:4: settings.client_ip_header is defined twice (first at a.yaml:5)") for e in found)
    assert len(found) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clientz:\n  - name: a\n", "a.yaml:4: unknown key 'clientz' in the top level (did you mean 'clients'?)"),
        (
            "settings:\n  trusted_proxy: []\n",
            "a.yaml:5: unknown key 'trusted_proxy' in settings (did you mean 'trusted_proxies'?)",
        ),
        (
            "clients:\n  - name: a\n    ip_adress: 10.0.0.1\n",
            "a.yaml:6: unknown key 'ip_adress' in client 'a' (did you mean 'ip_address'?)",
        ),
        (
            "routes:\n  - name: r\n    required_api_key: true\n",
            "a.yaml:6: unknown key 'required_api_key' in route 'r' (did you mean 'requires_api_key'?)",
        ),
        (
            "routes:\n  - name: r\n    match:\n      path_prefx: /v1\n",
            "a.yaml:7: unknown key 'path_prefx' in route 'r' match (did you mean 'path_prefix'?)",
        ),
        (
            "routes:\n  - name: r\n    environments:\n      staging:\n        target_base_uri: http://x\n",
            "a.yaml:8: unknown key 'target_base_uri' in route 'r' environment 'staging' "
            "(did you mean 'target_base_url'?)",
        ),
        (
            "api_keys:\n  - name: k\n    key_sha256: " + "ab" * 32 + "\n    typ: test\n",
            "a.yaml:7: unknown key 'typ' in API key 'k' (did you mean 'type'?)",
        ),
        (
            "environments_extra: 1\n",
            "a.yaml:4: unknown key 'environments_extra' in the top level (did you mean 'environments'?)",
        ),
    ],
    ids=["top", "settings", "client", "route", "match", "override", "api_key", "top2"],
)
def test_unknown_key_with_suggestion(tmp_path: Path, text: str, expected: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + text)
    found = errors(folder)
    assert any(e.startswith(expected) for e in found), found


def test_unknown_key_with_block_value_points_at_the_key(tmp_path: Path) -> None:
    """Regression: the line of a key whose value is a block list is the key's line."""
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "bogus:\n  - 1\n  - 2\n")
    assert one_error(folder).startswith("a.yaml:4: unknown key 'bogus' in the top level")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "clients:\n  - name: a\n    ip_address: 10.0.0.1\n    enabled: 'false'\n",
            "a.yaml:7: client 'a': 'enabled' must be true or false, not a string ('false')",
        ),
        (
            "routes:\n  - name: r\n    requires_clients: 'no'\n",
            "a.yaml:6: route 'r': 'requires_clients' must be true or false, not a string ('no')",
        ),
        (
            "routes:\n  - name: r\n    description: true\n",
            "a.yaml:6: route 'r': 'description' must be a string, not true or false (True)",
        ),
        (
            "routes:\n  - name: r\n    match: [api.example.com]\n",
            "a.yaml:6: route 'r': 'match' must be a mapping, not a list",
        ),
        (
            "routes:\n  - name: r\n    match: {hosts: api.example.com}\n",
            "a.yaml:6: route 'r' match: 'hosts' must be a list, not a string",
        ),
        (
            "routes:\n  - name: r\n    environments: [staging]\n",
            "a.yaml:6: route 'r': 'environments' must be a mapping, not a list",
        ),
        (
            "routes:\n  - name: r\n    allowed_methods: GET\n",
            "a.yaml:6: route 'r': allowed_methods must be a non-empty list",
        ),
        ("routes:\n  - name: r\n    allowed_methods: [GET, 7]\n", "a.yaml:6: route 'r': 7 is not an HTTP method"),
        ("clients: {a: 10.0.0.1}\n", "a.yaml:4: 'clients' must be a list"),
        ("settings: [a]\n", "a.yaml:4: 'settings' must be a mapping"),
        ("clients:\n  - a\n", "a.yaml:5: each client must be a mapping with a 'name'"),
        ("clients:\n  - ip_address: 10.0.0.1\n", "a.yaml:5: client is missing required key 'name'"),
        ("clients:\n  - name: 12\n    ip_address: 10.0.0.1\n", "a.yaml:5: client: 'name' must be a string"),
        ("clients:\n  - name: a\n", "a.yaml:5: client 'a' is missing required key 'ip_address'"),
        (
            "clients:\n  - name: a\n    ip_address: {net: 10.0.0.0/8}\n",
            "a.yaml:6: client 'a' must be an IP, a CIDR, a comma-separated string or a list",
        ),
        ("clients:\n  - name: a\n    ip_address: [10]\n", "a.yaml:6: client 'a': 10 must be a string"),
        ("clients:\n  - name: a\n    ip_address: 10.0.0.1\n    type: robot\n", "a.yaml:7: client 'a': type must be"),
        (
            "api_keys:\n  - name: k\n    key_sha256: " + "ab" * 32 + "\n    type: prod\n",
            "a.yaml:7: API key 'k': type must be 'live' or 'test'",
        ),
        ("settings:\n  unmatched_requests: maybe\n", "a.yaml:5: settings.unmatched_requests must be 'deny' or 'allow'"),
        ("settings:\n  default_environment: [production]\n", "a.yaml:5: settings.default_environment must be"),
        ("settings:\n  client_ip_header: 'X Forwarded'\n", "a.yaml:5: settings.client_ip_header must be a header"),
        ("assignments:\n  r: [a]\n", None),  # unknown route first; see below
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str | None) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + text)
    found = errors(folder)
    if expected is None:
        assert found == ["a.yaml:5: assignments: unknown route 'r'"]
        return
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_assignment_value_types(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS
        + """\
clients: [{name: c, ip_address: 10.0.0.1}]
routes: [{name: r}, {name: s}]
assignments:
  r: [c]
  s:
    production: {c: true}
    staging: [c, c, 5]
""",
    )
    assert errors(folder) == [
        "a.yaml:7: assignments.r must map environments to lists of clients",
        "a.yaml:9: assignments.s.production must be a list of client names",
        "a.yaml:10: assignments.s.staging: 'c' is listed twice",
        "a.yaml:10: assignments.s.staging: 5 is not a name",
    ]


def test_dangling_references(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS
        + """\
clients:
  - name: office
    ip_address: 10.0.0.0/8
routes:
  - name: api
    environments:
      develop: {allowed_methods: [GET]}
assignments:
  ap1:
    production: [office]
  api:
    stagin: [office]
    production:
      - ofice
""",
    )
    assert errors(folder) == [
        "a.yaml:10: route 'api': unknown environment 'develop'",
        "a.yaml:12: assignments: unknown route 'ap1' (did you mean 'api'?)",
        "a.yaml:15: assignments.api: unknown environment 'stagin' (did you mean 'staging'?)",
        "a.yaml:17: assignments.api.production: unknown client 'ofice' (did you mean 'office'?)",
    ]


def test_default_environment_not_defined(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "settings:\n  default_environment: prod\n")
    assert one_error(folder) == "a.yaml:5: default environment 'prod' is not defined under 'environments'"


def test_implicit_default_environment_must_be_defined(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", "environments:\n  - name: staging\n")
    message = one_error(folder)
    assert message.startswith("a.yaml")
    assert "default environment 'production' is not defined" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.168.1.5/24", "'192.168.1.5/24' has host bits set; did you mean 192.168.1.0/24 (or 192.168.1.5 alone)?"),
        ("2001:db8::1/32", "'2001:db8::1/32' has host bits set; did you mean 2001:db8::/32 (or 2001:db8::1 alone)?"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR range"),
        ("10.0.0.300", "'10.0.0.300' is not an IP address or CIDR range"),
        ("office", "'office' is not an IP address or CIDR range"),
        ("fe80::1%eth0", "'fe80::1%eth0': zone indexes (%...) are not allowed in config"),
        ("'10.0.0.1, 10.0.0.x, 10.0.0.3'", "'10.0.0.x' is not an IP address or CIDR range"),
        ("'10.0.0.1,,10.0.0.3'", "empty address in '10.0.0.1,,10.0.0.3'"),
    ],
)
def test_bad_addresses(tmp_path: Path, value: str, expected: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"clients:\n  - name: a\n    ip_address: {value}\n")
    assert one_error(folder) == f"a.yaml:6: {expected}"


def test_bad_address_in_a_list_names_its_own_line(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "clients:\n  - name: a\n    ip_address:\n      - 10.0.0.1\n      - 10.0.0.1/8\n")
    assert one_error(folder).startswith("a.yaml:8: '10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8")


@pytest.mark.parametrize("value", ["''", "", "[]"], ids=["empty-string", "null", "empty-list"])
def test_empty_ip_address(tmp_path: Path, value: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"clients:\n  - name: a\n    ip_address: {value}\n")
    found = errors(folder)
    assert "a.yaml:6: client 'a' has no IP addresses" in found


def test_bad_trusted_proxies(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "settings:\n  trusted_proxies:\n    - 10.0.0.1\n    - 10.1.0.1/16\n")
    assert one_error(folder).startswith("a.yaml:7: '10.1.0.1/16' has host bits set; did you mean 10.1.0.0/16")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://files.example.com",
        "api.example.com/v1",
        "http://",
        "https://api.example.com/v1?x=1",
        "http://a:99999",
        "http://a:0",
        "http://a:port",
    ],
)
def test_bad_target_base_url(tmp_path: Path, url: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"routes:\n  - name: r\n    target_base_url: '{url}'\n")
    message = one_error(folder)
    assert message.startswith("a.yaml:6: route 'r': ")
    assert url in message


def test_bad_target_base_url_in_override(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "routes:\n  - name: r\n    environments:\n      staging: {target_base_url: nope}\n")
    assert one_error(folder).startswith("a.yaml:7: route 'r' (staging): target_base_url 'nope' must be")


@pytest.mark.parametrize(
    "digest",
    ["abc", "zz" * 32, "ab" * 33, "the-secret-key-itself"],
)
def test_bad_key_sha256(tmp_path: Path, digest: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"api_keys:\n  - name: k\n    key_sha256: '{digest}'\n")
    assert one_error(folder) == (
        "a.yaml:6: API key 'k': key_sha256 must be 64 hex digits (the SHA-256 of the key, never the key itself)"
    )


def test_key_sha256_missing(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "api_keys:\n  - name: k\n    type: test\n")
    assert one_error(folder) == "a.yaml:5: API key 'k' is missing required key 'key_sha256'"


@pytest.mark.parametrize("name", ["Production", "prod env", "prod.eu", "é"])
def test_bad_environment_name(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"  - name: '{name}'\n")
    assert one_error(folder) == f"a.yaml:4: environment name {name!r} must match ^[a-z0-9_-]+$"


def test_bad_object_names_and_hosts(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS
        + """\
clients:
  - {name: '-dash', ip_address: 10.0.0.1}
routes:
  - name: r
    match: {hosts: ['api example.com', '*.ok.com', 'a.*.com'], path_prefix: v1}
""",
    )
    found = errors(folder)
    assert found[0].startswith("a.yaml:5: client name '-dash' must match")
    assert "a.yaml:8: route 'r': 'api example.com' is not a host name (a leading '*.' is allowed)" in found
    assert "a.yaml:8: route 'r': 'a.*.com' is not a host name (a leading '*.' is allowed)" in found
    assert "a.yaml:8: route 'r': path_prefix must start with '/'" in found
    assert len(found) == 4


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """An operator fixes a config in one go: all problems of all files are listed, sorted."""
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "clients:\n  - {name: a, ip_address: 10.0.0.1/8}\n")
    write(folder, "b.yaml", "routes:\n  - {name: r, enabled: 1}\nbogus: 1\n")
    found = errors(folder)
    assert [f.split(": ")[0] for f in found] == ["a.yaml:5", "b.yaml:2", "b.yaml:3"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("{hosts: [a.example.com], path_prefix: /v1}", "{hosts: [a.example.com], path_prefix: /v1/}"),
        ("{path_prefix: /v1}", "{path_prefix: /v1}"),
        ("{hosts: ['*.example.com']}", "{hosts: [b.example.com, '*.example.com'], path_prefix: /}"),
    ],
    ids=["host-and-prefix", "any-host", "wildcard"],
)
def test_two_routes_with_identical_match(tmp_path: Path, first: str, second: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"routes:\n  - name: r\n    match: {first}\n  - name: s\n    match: {second}\n")
    load_config(folder)  # each route is valid on its own; compiling the policy finds the clash
    message = one_error(folder, policy=True)
    assert message.startswith("a.yaml:7: route 's' has the same match as route 'r' (a.yaml:5)")


def test_same_prefix_on_different_hosts_is_fine(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS + "routes:\n"
        "  - {name: r, match: {hosts: [a.example.com], path_prefix: /v1}}\n"
        "  - {name: s, match: {hosts: [b.example.com], path_prefix: /v1}}\n"
        "  - {name: t, match: {path_prefix: /v1}}\n"
        "  - {name: u, enabled: false, match: {path_prefix: /v1}}\n",
    )
    assert set(load_policy(folder).routes) == {"r", "s", "t", "u"}


@pytest.mark.parametrize("value", ["1:2:3:4:5:6:7:8", "[10.0.0.1, 1:2:3:4:5:6:7:8]"])
def test_unquoted_ipv6_read_as_a_number_gets_a_hint(tmp_path: Path, value: str) -> None:
    """YAML 1.1 reads 1:2:3:4:5:6:7:8 as a base-60 number; the error says to quote it."""
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"clients:\n  - name: a\n    ip_address: {value}\n")
    message = one_error(folder)
    assert message.startswith("a.yaml:6: client 'a'")
    assert "put addresses in quotes" in message


def test_quoted_ipv6_with_decimal_groups_loads(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "clients:\n  - name: a\n    ip_address: '1:2:3:4:5:6:7:8'\n")
    assert load_config(folder).clients["a"].networks == (ipaddress.ip_network("1:2:3:4:5:6:7:8/128"),)


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [("/v1/../admin", "/admin"), ("/a%20b", "/a b"), ("/v1?x=1", "/v1"), ("/a//b", "/a/b"), ("/./v1", "/v1")],
)
def test_path_prefix_that_could_never_match(tmp_path: Path, prefix: str, normal: str) -> None:
    """Request paths are matched decoded and normalised; a prefix written otherwise is an error."""
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"routes:\n  - name: r\n    match:\n      path_prefix: '{prefix}'\n")
    assert one_error(folder) == (
        f"a.yaml:7: route 'r': path_prefix {prefix!r} can never match, since request paths are matched "
        f"percent-decoded and normalised; write {normal!r}"
    )


@pytest.mark.parametrize(("prefix", "stored"), [("/", "/"), ("//", "/"), ("/v1/", "/v1"), ("/a b", "/a b")])
def test_path_prefix_forms_that_load(tmp_path: Path, prefix: str, stored: str) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + f"routes:\n  - name: r\n    match: {{path_prefix: '{prefix}'}}\n")
    route = load_policy(folder).routes["r"]
    assert route.match is not None and route.match.path_prefix == stored
    table = load_policy(folder).route_table
    found = table.find("any.example.com", stored + "/x" if stored != "/" else "/x")
    assert found is not None and found.name == "r"


def test_pathologically_deep_yaml_is_a_config_error(tmp_path: Path) -> None:
    """PyYAML recurses per nesting level; the RecursionError must not escape as a crash."""
    folder = tmp_path / "cfg"
    write(folder, "deep.yaml", ENVS + "clients: " + "[" * 5000 + "]" * 5000 + "\n")
    assert one_error(folder) == "deep.yaml:1: invalid YAML: nested too deeply"


def test_yaml_oddities(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(
        folder,
        "a.yaml",
        ENVS
        + """\
clients:
  - name: 2024-01-01
    ip_address: 10.0.0.1
  - &same {name: a, ip_address: 10.0.0.2}
  - *same
  - !!binary YWJj
""",
    )
    found = errors(folder)
    assert "a.yaml:5: client: 'name' must be a string, not date (datetime.date(2024, 1, 1))" in found
    assert "a.yaml:7: client 'a' is defined twice (first at a.yaml:7)" in found
    assert "a.yaml:9: each client must be a mapping with a 'name'" in found


# -- property: whatever is written, the loader answers with a Config or a ConfigError ----------

_BASE: dict[str, Any] = {
    "settings": {"default_environment": "production", "trusted_proxies": ["10.9.0.0/16"], "unmatched_requests": "deny"},
    "environments": [{"name": "production", "description": "x"}, {"name": "staging"}],
    "clients": [
        {"name": "c", "type": "server", "ip_address": "10.0.0.0/8", "enabled": True},
        {"name": "d", "ip_address": ["::1", "10.1.0.0/16"]},
    ],
    "routes": [
        {
            "name": "r",
            "target_base_url": "http://127.0.0.1:9000/b",
            "requires_api_key": False,
            "allowed_methods": ["GET"],
            "match": {"hosts": ["a.com", "*.b.com"], "path_prefix": "/v1"},
            "environments": {"staging": {"target_base_url": "http://127.0.0.1:9001", "allowed_methods": ["GET"]}},
        },
        {"name": "s", "match": {"path_prefix": "/s"}},
    ],
    "assignments": {"r": {"production": ["c"], "staging": ["d"]}, "s": {"production": ["c", "d"]}},
    "api_keys": [{"name": "k", "key_sha256": "a" * 64, "type": "test", "enabled": True}],
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found += _paths(child, (*prefix, key))
    return found


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**12)
    | st.floats(allow_nan=False)
    | st.sampled_from(["production", "r", "c", "10.0.0.1/8", "::1", "http://x", "/v1", "/../", "%", "", "*.a.com"])
    | st.text(max_size=6)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(st.tuples(st.sampled_from(_paths(_BASE)), _VALUES, st.booleans()), min_size=1, max_size=3))
def test_any_edit_of_a_valid_config_loads_or_is_a_config_error(tmp_path: Path, edits: list) -> None:
    doc = copy.deepcopy(_BASE)
    for path, value, delete in edits:
        target: Any = doc
        try:
            for key in path[:-1]:
                target = target[key]
            if delete and isinstance(target, dict):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    folder = tmp_path / f"cfg{uuid.uuid4().hex}"
    folder.mkdir()
    (folder / "a.yaml").write_text(yaml.safe_dump(doc))
    try:
        load_policy(folder)
    except ConfigError as e:
        assert e.problems and all(str(p).startswith(f"{folder}/a.yaml") for p in e.problems)


def test_problems_of_the_whole_config_name_a_file_or_the_folder(tmp_path: Path) -> None:
    only_settings = tmp_path / "only-settings"
    write(only_settings, "a.yaml", "settings:\n  unmatched_requests: deny\n")
    write(only_settings, "b.yaml", "environments:\n  - name: staging\n")
    # the file that lists the environments is named: that list must hold the default
    assert errors(only_settings) == ["b.yaml: default environment 'production' is not defined under 'environments'"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(empty)
    assert str(caught.value) == f"{empty}: no config files (*.yaml, *.yml) in this folder"


def test_configmap_style_symlinks_are_followed(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as name -> ..data/name -> ..<timestamp>/name."""
    folder = tmp_path / "cfg"
    real = folder / "..2026_11_28_00_00_00.000"
    write(real, "knoxcall.yaml", ENVS + "clients:\n  - name: a\n    ip_address: 10.0.0.1\n")
    (folder / "..data").symlink_to(real.name)
    (folder / "knoxcall.yaml").symlink_to("..data/knoxcall.yaml")
    config = load_config(folder)
    assert list(config.clients) == ["a"]
    assert [Path(f).name for f in config.files] == ["knoxcall.yaml"]


def test_target_base_url_with_credentials(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    write(folder, "a.yaml", ENVS + "routes:\n  - name: r\n    target_base_url: 'https://user:pw@api.example.com'\n")
    assert one_error(folder) == "a.yaml:6: route 'r': target_base_url must not contain credentials (user:password@)"
