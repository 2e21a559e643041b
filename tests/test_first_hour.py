"""Issue 10, "the first hour of a new user": what a newcomer types first must work, and
what goes wrong must say so in words they can act on.

The CLI runs for real (its ``main()``, and as a subprocess where the working directory
matters); the addon's words come from a real ``KnoxCall`` in mitmproxy's test context.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow

from knoxcall_addon.cli import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.configdiff import diff_configs
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ConfigError
from knoxcall_addon.proxy_addon import KnoxCall
from tests.harness import BIN

# A newcomer's first config: a client, a route, an assignment in production.
FIRST = """\
clients:
  - name: office
    ip_address: 127.0.0.0/29
  - name: old-office
    ip_address: 127.0.1.0/24
    enabled: false
routes:
  - name: orders
assignments:
  orders:
    production: [office, old-office]
"""


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def knoxcall(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, run from ``cwd``."""
    exe = BIN / "knoxcall"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "knoxcall_addon.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def first(tmp_path: Path) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(FIRST, encoding="utf-8")
    return folder


def addon_error(folder: str) -> str:
    """What the addon says when it starts with ``knoxcall_config`` set to ``folder`` (it must
    refuse to start: its ERROR lines, then SystemExit)."""
    addon = KnoxCall()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("knoxcall").addHandler(handler)
    try:
        with taddons.context(addon) as tctx, pytest.raises(SystemExit) as caught:
            tctx.configure(addon, knoxcall_config=folder)
    finally:
        logging.getLogger("knoxcall").removeHandler(handler)
    assert caught.value.code == 1
    return "\n".join(lines)


# -- the config folder, taken the same way by every command -------------------------------


def test_every_command_takes_the_folder_positionally_or_with_config(first):
    explain = ["explain", "--ip", "127.0.0.3", "--route", "orders"]
    for argv in ([*explain, str(first)], [str(first), *explain[1:]], [*explain, "--config", str(first)]):
        if argv[0] != "explain":
            argv = ["explain", *argv]
        code, out = run(*argv)
        assert code == EXIT_OK, (argv, out)
        assert out.startswith("ALLOWED: client"), out
    for command in ("check", "ping"):
        by_option = run(command, "--config", str(first))
        by_position = run(command, str(first))
        assert by_option == by_position
        assert by_option[0] == EXIT_OK, by_option
    # the same folder twice is fine; two different ones are a usage error, not a guess
    assert run("check", str(first), "--config", str(first))[0] == EXIT_OK
    assert run("check", str(first), "--config", str(first.parent))[0] == EXIT_USAGE


def test_explain_with_the_folder_last_as_a_console_script(first):
    """Exactly what issue 10 typed: it was "unrecognized arguments"."""
    result = knoxcall("explain", "--ip", "127.0.0.3", "--route", "orders", first.name, cwd=first.parent)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("ALLOWED: client")


# -- what is wrong with the folder itself: the same words from the CLI and the addon ------


def test_a_missing_folder_is_named_by_its_full_path(tmp_path):
    result = knoxcall("check", "nope", cwd=tmp_path)
    assert result.returncode == EXIT_FINDINGS
    assert f"{tmp_path}/nope: error[config] config folder does not exist" in result.stdout
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope")
    assert str(caught.value) == f"{tmp_path}/nope: config folder does not exist"
    assert f"{tmp_path}/nope: config folder does not exist" in addon_error(str(tmp_path / "nope"))


def test_a_file_is_not_a_folder(first):
    file = first / "knoxcall.yaml"
    result = knoxcall("check", "cfg/knoxcall.yaml", cwd=first.parent)
    assert result.returncode == EXIT_FINDINGS
    expected = f"{file}: the config folder is a file, not a folder; name the folder that holds it, {first}"
    assert f"{file}: error[config] the config folder is a file, not a folder; name the folder" in result.stdout
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(caught.value) == expected
    assert expected in addon_error(str(file))
    other = first.parent / "notes.txt"
    other.write_text("x")
    code, out = run("explain", "--ip", "127.0.0.3", "--route", "orders", str(other))
    assert code == EXIT_FINDINGS
    assert out == f"{other}: error[config] the config folder is a file, not a folder\n"


def test_a_broken_symlink_says_so(tmp_path):
    (tmp_path / "current").symlink_to(tmp_path / "release-9")
    code, out = run("check", str(tmp_path / "current"))
    assert code == EXIT_FINDINGS
    assert f"{tmp_path}/current: error[config] the config folder is a broken symlink" in out


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_folder_name_is_refused_not_read_as_the_working_directory(tmp_path, first, empty):
    # the working directory holds a valid config: '' used to load it (Path('') is '.')
    result = knoxcall("check", empty, cwd=first)
    assert result.returncode == EXIT_FINDINGS
    assert result.stdout.splitlines() == [
        '"": error[config] the config folder name is empty: name a folder, e.g. config',
        '"": config invalid; 1 error(s), 0 warning(s)',
    ]
    assert "is empty: name a folder" in knoxcall("explain", "--ip", "127.0.0.3", "--route", "orders", "--config",
                                                 empty, cwd=first).stdout  # fmt: skip
    assert "the config folder name is empty: name a folder" in addon_error(empty)


def test_an_empty_folder_still_says_it_has_no_files_by_its_full_path(tmp_path):
    (tmp_path / "empty").mkdir()
    result = knoxcall("check", "empty", cwd=tmp_path)
    assert f"{tmp_path}/empty: error[config] no config files (*.yaml, *.yml) in this folder" in result.stdout
    assert os.path.isabs(result.stdout.split(":", 1)[0])


# -- a first config without environments -------------------------------------------------


def test_a_first_config_without_environments_loads_with_its_default_environment(first):
    config = load_config(first)
    assert list(config.environments) == ["production"]
    assert config.environments["production"].implicit
    code, out = run("check", str(first))
    assert code == EXIT_OK, out
    assert (
        "note: no environments are declared, so the default environment 'production' is the only one; "
        "an 'environments' list replaces it\n"
    ) in out
    code, out = run("check", "--format", "json", str(first))
    assert '"notes": [\n    "no environments are declared' in out
    # the proxy decides with it like with any other: the office is let in, others are not
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(first))
        for peer, reason in [
            ("127.0.0.3", "client"),
            ("127.0.1.3", "client_disabled"),
            ("127.0.2.3", "ip_not_whitelisted"),
        ]:
            flow = tflow.tflow()
            flow.client_conn.peername = (peer, 40000)
            flow.request.headers["x-knoxcall-route"] = "orders"
            addon.requestheaders(flow)
            assert flow.metadata["knoxcall"]["reason"] == reason
            assert flow.metadata["knoxcall"]["environment"] == "production"


def test_the_implicit_environment_is_the_default_one_and_a_declared_list_wins(first):
    settings = "settings: {default_environment: dev}\n"
    (first / "knoxcall.yaml").write_text(FIRST.replace("production:", "dev:") + settings, encoding="utf-8")
    assert list(load_config(first).environments) == ["dev"]

    (first / "envs.yaml").write_text("environments: [{name: staging}]\n", encoding="utf-8")
    code, out = run("check", str(first))
    assert code == EXIT_FINDINGS
    assert (
        f"{first}/knoxcall.yaml:12: error[config] default environment 'dev' is not defined under 'environments'" in out
    )
    assert "error[config] assignments.orders: unknown environment 'dev'\n" in out  # no word of implicit ones
    assert "note:" not in out


def test_naming_another_environment_says_how_to_declare_it(first):
    (first / "knoxcall.yaml").write_text(FIRST + "    staging: [office]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(first)
    assert [p.message for p in caught.value.problems] == [
        "assignments.orders: unknown environment 'staging'; no environments are declared, so only the default "
        "environment 'production' exists: list every environment under 'environments' to have more"
    ]


def test_an_implicit_default_environment_must_still_be_a_valid_name(first):
    (first / "knoxcall.yaml").write_text(FIRST + "settings: {default_environment: Prod}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(first)
    assert "knoxcall.yaml:12: settings.default_environment 'Prod' must match ^[a-z0-9_-]+$" in str(caught.value)


def test_declaring_the_implicit_environment_is_a_change_the_audit_line_shows(first):
    before = load_config(first)
    (first / "envs.yaml").write_text("environments: [{name: production}]\n", encoding="utf-8")
    after = load_config(first)
    assert not after.environments["production"].implicit
    assert diff_configs(before, after).summary().startswith("environments ~production(")


# -- messages show the bad value, never a huge one -------------------------------------------


def test_type_errors_show_the_value_given(first):
    text = """\
clients:
  - name: office
    type: sever
    ip_address: 127.0.0.1
api_keys:
  - name: ci
    key_sha256: "0000000000000000000000000000000000000000000000000000000000000000"
    type: tset
settings:
  unmatched_requests: alow
  client_ip_header: X Forwarded For
"""
    (first / "knoxcall.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(first)
    assert [str(p).replace(f"{first}/", "") for p in caught.value.problems] == [
        "knoxcall.yaml:3: client 'office': type must be 'server' or 'user', not 'sever'",
        "knoxcall.yaml:8: API key 'ci': type must be 'live' or 'test', not 'tset'",
        "knoxcall.yaml:10: settings.unmatched_requests must be 'deny' or 'allow', not 'alow'",
        "knoxcall.yaml:11: settings.client_ip_header must be a header name (letters, digits, '-'), "
        "not 'X Forwarded For'",
    ]


def test_a_huge_value_is_elided_in_every_message(first):
    """Values a careless paste can make huge: names, addresses, keys, a list where a string goes."""
    huge = "x" * 100_000
    key = "k" * 1000  # YAML allows keys of up to 1024 characters
    addresses = ", ".join(f"10.{i // 256 % 256}.{i % 256}.1" for i in range(20_000))
    text = f"""\
clients:
  - name: {huge}
    ip_address: 127.0.0.1
  - name: c{huge}
    type: {huge}
    ip_address: "{addresses}, {huge}"
  - name: d
    ip_address: 127.0.0.2
    {key}: 1
    description: [{addresses}]
routes:
  - name: r
    target_base_url: http://{huge}/?q
    match: {{hosts: [{huge}], path_prefix: /{huge}/..}}
assignments:
  r{key}:
    production: [d]
  r:
    production: [d, e{huge}]
    staging{key}: [d]
settings:
  default_environment: {huge}
"""
    (first / "knoxcall.yaml").write_text(text, encoding="utf-8")
    code, out = run("check", str(first))
    assert code == EXIT_FINDINGS
    lines = out.splitlines()
    assert len(lines) == 10, out  # nine errors and the summary
    longest = max((line.replace(str(first), "") for line in lines), key=len)
    assert len(longest) < 500, longest[:1000]
    assert "xxx...xxx" in out and "kkk...kkk" in out
    assert "type must be 'server' or 'user', not 'xxx" in out


# -- YAML syntax errors: PyYAML's words, and the likely cause --------------------------------

SYNTAX = [
    (
        "clients:\n\t- name: office\n",
        "2: invalid YAML: found character '\\t' that cannot start any token; a tab on this line: "
        "YAML allows no tab in indentation or before a value, use spaces",
    ),
    (
        "clients:\n  - name: office\n    description: Note: the HQ\n",
        "3: invalid YAML: mapping values are not allowed here; a value that contains ': ' must be quoted, "
        'e.g. description: "Note: the HQ"',
    ),
    (
        "clients:\n  - name:office\n    ip_address: 10.0.0.1\n",
        "3: invalid YAML: mapping values are not allowed here; line 2: a key needs a space after its ':' "
        "(name: office, not name:office)",
    ),
    (
        "clients:\n  - name:office\n\n    ip_address: 10.0.0.1\n",  # the line it names is the one above with text
        "4: invalid YAML: mapping values are not allowed here; line 2: a key needs a space after its ':' "
        "(name: office, not name:office)",
    ),
    (
        "clients:\n  - name: office\n      ip_address: 10.0.0.1\n",
        "3: invalid YAML: mapping values are not allowed here; check the indentation: this line is indented "
        "deeper than the key it belongs to",
    ),
    (
        "clients:\n  - name: office\n   ip_address: 10.0.0.1\n",
        "3: invalid YAML: expected <block end>, but found '<block mapping start>'; check the indentation: "
        "keys of one mapping, and the '- ' of one list, must line up",
    ),
    (
        "routes:\n  - name: api\n    match: {hosts: [*.example.com]}\n",
        "3: invalid YAML: expected alphabetic or numeric character, but found '.'; a value that starts with "
        "'*' or '&' must be quoted, e.g. hosts: [\"*.example.com\"]",
    ),
    (
        "clients:\n  - name: office\n    description: & co\n",
        "3: invalid YAML: expected alphabetic or numeric character, but found ' '; a value that starts with "
        "'*' or '&' must be quoted, e.g. hosts: [\"*.example.com\"]",
    ),
    (
        'clients:\n  - name: "office\n    ip_address: 10.0.0.1\n',
        "4: invalid YAML: found unexpected end of stream; a quote opened on line 2 is not closed",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SYNTAX)
def test_a_yaml_syntax_error_names_its_likely_cause(first, text, expected):
    (first / "knoxcall.yaml").write_text(text, encoding="utf-8")
    code, out = run("check", str(first))
    assert code == EXIT_FINDINGS
    assert out.splitlines()[0] == f"{first}/knoxcall.yaml:{expected.replace(': invalid', ': error[config] invalid', 1)}"


# -- several problems at a reload: a summary line, then one line each -------------------------


def test_several_problems_at_a_reload_are_one_line_each(first, caplog):
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(first), knoxcall_reload=False)
        version = addon.current.policy.version
        (first / "knoxcall.yaml").write_text(
            FIRST.replace("127.0.0.0/29", "127.0.0.1/29").replace("[office, old-office]", "[ofice, old-office]"),
            encoding="utf-8",
        )
        (first / "more.yaml").write_text("routes:\n  - name: api\n    enabled: yes please\n", encoding="utf-8")
        with caplog.at_level(logging.ERROR, logger="knoxcall"):
            answer = tctx.master.commands.call("knoxcall.reload")
        status = tctx.master.commands.call("knoxcall.status")
    assert addon.current.policy.version == version  # the last good config stays in force
    expected = [
        f"3 problems in {first}/knoxcall.yaml, {first}/more.yaml:",
        f"  {first}/knoxcall.yaml:3: '127.0.0.1/29' has host bits set; did you mean 127.0.0.0/29 (or 127.0.0.1 alone)?",
        f"  {first}/knoxcall.yaml:11: assignments.orders.production: unknown client 'ofice' (did you mean 'office'?)",
        f"  {first}/more.yaml:3: route 'api': 'enabled' must be true or false, not a string ('yes please')",
    ]
    assert answer.splitlines() == [f"knoxcall: config invalid, still serving {version}: {expected[0]}", *expected[1:]]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().splitlines() == [
        f"knoxcall: config in {first} is invalid, still serving {version}: {expected[0]}",
        *expected[1:],
    ]
    assert "\n".join(expected) in status


def test_one_problem_at_a_reload_stays_on_its_line(first):
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(first), knoxcall_reload=False)
        version = addon.current.policy.version
        (first / "knoxcall.yaml").write_text(FIRST.replace("[office,", "[ofice,"), encoding="utf-8")
        answer = tctx.master.commands.call("knoxcall.reload")
    assert answer == (
        f"knoxcall: config invalid, still serving {version}: {first}/knoxcall.yaml:11: assignments.orders.production: "
        "unknown client 'ofice' (did you mean 'office'?)"
    )


# -- explain: a disabled client assigned here ---------------------------------------------------


def test_explain_says_where_a_disabled_client_is_assigned(first):
    """Issue 10: it said "disabled; assigned nowhere" of a client assigned to that very route."""
    code, out = run("explain", "--ip", "127.0.1.3", "--route", "orders", str(first))
    assert code == EXIT_OK
    assert out.splitlines()[0] == "DENIED (403): client_disabled"
    assert "    client old-office (127.0.1.0/24) is disabled (it is assigned to orders in production)\n" in out
    code, out = run("explain", "--ip", "127.0.2.3", "--route", "orders", str(first))
    assert "  assigned here: office (127.0.0.0/29), old-office (127.0.1.0/24; disabled)\n" in out

    text = FIRST.replace("routes:\n  - name: orders\n", "routes:\n  - name: orders\n  - name: billing\n")
    (first / "knoxcall.yaml").write_text(text + "  billing:\n    production: [old-office]\n", encoding="utf-8")
    out = run("explain", "--ip", "127.0.1.3", "--route", "orders", str(first))[1]
    assert "is disabled (it is assigned to orders in production); also assigned to billing/production\n" in out
    out = run("explain", "--ip", "127.0.1.3", "--route", "billing", "--config", str(first))[1]
    assert "is disabled (it is assigned to billing in production); also assigned to orders/production\n" in out
