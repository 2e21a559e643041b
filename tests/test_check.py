"""`knoxcall check`: the loader's errors, each lint rule on a config made for it, exit codes, JSON."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from knoxcall_addon.cli import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.lint import RULES, lint
from knoxcall_addon.loader import load_config
from tests.harness import BIN, ROOT

SHA = "0" * 64


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def base(**overrides):
    """A clean config: one described server client on one route, in the default environment."""
    data = {
        "environments": [{"name": "production"}, {"name": "staging"}],
        "clients": [{"name": "app", "ip_address": "10.1.2.3", "description": "app server"}],
        "routes": [{"name": "api", "target_base_url": "http://127.0.0.1:9"}],
        "assignments": {"api": {"production": ["app"], "staging": ["app"]}},
    }
    data.update(overrides)
    return data


def rules_of(config_dir: Path) -> list[tuple[str, str]]:
    return [(f.rule, f.severity) for f in lint(load_config(config_dir))]


def test_clean_config_has_no_findings(make_config):
    config = make_config(**{"k.yaml": base()})
    assert rules_of(config) == []
    code, out = run("check", str(config))
    assert code == EXIT_OK
    assert "0 error(s), 0 warning(s)" in out


def test_example_config_has_no_errors_and_only_the_intended_warnings():
    """config/ warns on purpose: the retired old-vpn, the open status page, the test key."""
    code, out = run("check", str(ROOT / "config"))
    assert code == EXIT_OK
    findings = sorted((f.rule, f.severity) for f in lint(load_config(ROOT / "config")))
    assert findings == [("open-route", "warning"), ("test-key", "warning"), ("unused-client", "warning")]
    assert 'client "old-vpn" is disabled and assigned to no route' in out
    assert run("check", "--strict", str(ROOT / "config"))[0] == EXIT_FINDINGS
    ignored = ["--ignore", "open-route", "--ignore", "test-key", "--ignore", "unused-client"]
    assert run("check", "--strict", *ignored, str(ROOT / "config"))[0] == EXIT_OK


def test_demo_config_loads_without_errors():
    code, out = run("check", str(ROOT / "demo" / "config"))
    assert code == EXIT_OK, out
    assert "disabled-assigned" in out  # the demo's old-vpn, on purpose


def test_load_errors_are_printed_as_config_errors(make_config):
    config = make_config(**{"k.yaml": base(clients=[{"name": "app", "ip_address": "10.1.2.3/24"}])})
    code, out = run("check", str(config))
    assert code == EXIT_FINDINGS
    line = out.splitlines()[0]
    assert line.startswith(f"{config}/k.yaml:")
    assert "error[config] '10.1.2.3/24' has host bits set; did you mean 10.1.2.0/24" in line
    assert "config invalid" in out


def test_missing_folder_is_an_error(tmp_path):
    code, out = run("check", str(tmp_path / "nope"))
    assert code == EXIT_FINDINGS
    assert "error[config] config folder does not exist" in out


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        (
            "open range in default env",
            base(clients=[{"name": "app", "ip_address": "0.0.0.0/0", "description": "x"}]),
            ("open-range", "error"),
        ),
        (
            "open v6 range elsewhere",
            base(
                clients=[
                    {"name": "app", "ip_address": "10.1.2.3", "description": "x"},
                    {"name": "any6", "ip_address": "::/0", "description": "x"},
                ],
                assignments={"api": {"production": ["app"], "staging": ["any6"]}},
            ),
            ("open-range", "warning"),
        ),
        (
            "wide v4",
            base(clients=[{"name": "app", "ip_address": "10.0.0.0/8", "description": "x"}]),
            ("wide-range", "warning"),
        ),
        (
            "wide v6",
            base(clients=[{"name": "app", "ip_address": "2001:db8::/31", "description": "x"}]),
            ("wide-range", "warning"),
        ),
        (
            "unused client",
            base(
                clients=[
                    {"name": "app", "ip_address": "10.1.2.3", "description": "x"},
                    {"name": "spare", "ip_address": "10.1.2.4", "description": "x"},
                ]
            ),
            ("unused-client", "warning"),
        ),
        (
            "disabled assigned",
            base(clients=[{"name": "app", "ip_address": "10.1.2.3", "description": "x", "enabled": False}]),
            ("disabled-assigned", "warning"),
        ),
        (
            "user client in default env",
            base(clients=[{"name": "app", "ip_address": "10.1.2.3", "description": "x", "type": "user"}]),
            ("user-in-default", "warning"),
        ),
        (
            "shared client",
            base(
                routes=[{"name": f"r{i}", "target_base_url": "http://127.0.0.1:9"} for i in range(6)],
                assignments={f"r{i}": {"production": ["app"]} for i in range(6)},
            ),
            ("shared-client", "warning"),
        ),
        (
            "no description",
            base(clients=[{"name": "app", "ip_address": "10.1.2.3"}]),
            ("no-description", "warning"),
        ),
        (
            "open route",
            base(
                routes=[
                    {"name": "api", "target_base_url": "http://127.0.0.1:9"},
                    {"name": "pub", "target_base_url": "http://127.0.0.1:9", "requires_clients": False},
                ]
            ),
            ("open-route", "warning"),
        ),
        (
            "open forward",
            base(
                routes=[
                    {"name": "api", "target_base_url": "http://127.0.0.1:9"},
                    {"name": "any", "requires_clients": False},
                ]
            ),
            ("open-forward", "error"),
        ),
        (
            "open any-host route shadowing a protected host",
            base(
                routes=[
                    {"name": "api", "match": {"hosts": ["secret.example"]}},
                    {"name": "pub", "requires_clients": False, "match": {"path_prefix": "/public"}},
                ]
            ),
            ("open-shadows-host", "error"),
        ),
        (
            "route with no client in an environment",
            base(assignments={"api": {"production": ["app"]}}),
            ("unassigned-route", "warning"),
        ),
        (
            "route whose only client in an environment is disabled",
            base(
                clients=[
                    {"name": "app", "ip_address": "10.1.2.3", "description": "x"},
                    {"name": "old", "ip_address": "10.1.2.4", "description": "x", "enabled": False},
                ],
                assignments={"api": {"production": ["app"], "staging": ["old"]}},
            ),
            ("unassigned-route", "warning"),
        ),
        (
            "duplicate range in one client",
            base(clients=[{"name": "app", "ip_address": ["10.1.2.3", "10.1.2.3"], "description": "x"}]),
            ("duplicate-range", "warning"),
        ),
        (
            "nested range in one client",
            base(clients=[{"name": "app", "ip_address": "10.1.0.0/16, 10.1.2.3", "description": "x"}]),
            ("duplicate-range", "warning"),
        ),
        (
            "overlap between clients",
            base(
                clients=[
                    {"name": "app", "ip_address": "10.1.2.0/24", "description": "x"},
                    {"name": "db", "ip_address": "10.1.2.7", "description": "x"},
                ],
                assignments={"api": {"production": ["app", "db"]}},
            ),
            ("overlapping-range", "warning"),
        ),
        (
            "every proxy trusted",
            base(settings={"trusted_proxies": ["0.0.0.0/0"]}),
            ("trusted-proxies", "error"),
        ),
        (
            "wide trusted proxies",
            base(settings={"trusted_proxies": "10.0.0.0/8"}),
            ("trusted-proxies", "warning"),
        ),
        (
            "test key",
            base(api_keys=[{"name": "ci", "key_sha256": SHA, "type": "test"}]),
            ("test-key", "warning"),
        ),
        (
            "per-caller limit above the whole route's",
            base(
                routes=[
                    {
                        "name": "api",
                        "target_base_url": "http://127.0.0.1:9",
                        "rate_limit": {"requests": 10, "window_sec": 1},
                        "client_rate_limit": {"requests": 20, "window_sec": 1},
                    }
                ]
            ),
            ("unreachable-limit", "warning"),
        ),
        (
            "report mode in the default environment",
            base(routes=[{"name": "api", "target_base_url": "http://127.0.0.1:9", "mode": "report"}]),
            ("report-mode", "warning"),
        ),
        (
            "a route requiring signatures, a client without signing secrets",
            base(routes=[{"name": "api", "target_base_url": "http://127.0.0.1:9", "signature": {"required": True}}]),
            ("unsigned-client", "error"),
        ),
    ],
)
def test_each_rule_fires_on_a_config_made_for_it(make_config, name, data, expected):
    config = make_config(**{"k.yaml": data})
    found = rules_of(config)
    assert expected in found, (name, found)
    code, out = run("check", "--format", "json", str(config))
    report = json.loads(out)
    assert any((f["rule"], f["severity"]) == expected for f in report["findings"])
    for finding in report["findings"]:
        if finding["rule"] == "trusted-proxies":  # settings have no line in the model: the folder is named
            assert (finding["file"], finding["line"]) == (str(config), 0)
        else:
            assert finding["file"].endswith("k.yaml") and finding["line"] > 0
    assert code == (EXIT_FINDINGS if expected[1] == "error" else EXIT_OK)
    assert run("check", "--strict", str(config))[0] == EXIT_FINDINGS


def test_every_rule_is_exercised():
    """The table above covers every documented rule (config is covered by the load-error tests)."""
    source = Path(__file__).read_text()
    for rule in RULES:
        assert f'"{rule}"' in source, rule


def test_text_output_names_file_line_severity_and_rule(make_config):
    config = make_config(**{"k.yaml": base(clients=[{"name": "x", "ip_address": "0.0.0.0/0", "description": "d"}],
                                           assignments={"api": {"production": ["x"]}})})  # fmt: skip
    code, out = run("check", str(config))
    assert code == EXIT_FINDINGS
    expected = (
        'error[open-range] client "x" allows 0.0.0.0/0: every address, and it is assigned in the default environment'
    )
    assert f"{config}/k.yaml:5: {expected} production" in out


def test_open_range_on_a_disabled_client_is_only_a_warning(make_config):
    clients = [
        {"name": "app", "ip_address": "10.1.2.3", "description": "x"},
        {"name": "x", "ip_address": "0.0.0.0/0", "description": "d", "enabled": False},
    ]
    config = make_config(**{"k.yaml": base(clients=clients, assignments={"api": {"production": ["app", "x"]}})})
    assert ("open-range", "warning") in rules_of(config)


def test_overlaps_of_many_ranges_are_grouped_per_client_pair(make_config):
    """20k ranges inside one wide range give one finding per pair of clients, not 20k."""
    many = [str(ipaddress.IPv4Address(0x0A000000 + i * 4)) + "/30" for i in range(20000)]
    clients = [
        {"name": "app", "ip_address": "10.0.0.0/8", "description": "x"},
        {"name": "many", "ip_address": many, "description": "x"},
    ]
    config = make_config(**{"k.yaml": base(clients=clients, assignments={"api": {"production": ["app", "many"]}})})
    findings = [f for f in lint(load_config(config)) if f.rule == "overlapping-range"]
    assert len(findings) == 1
    assert "and 19999 more" in findings[0].message


def test_no_overlap_between_adjacent_ranges(make_config):
    clients = [
        {"name": "a", "ip_address": "10.1.2.0/25", "description": "x"},
        {"name": "b", "ip_address": "10.1.2.128/25, ::1", "description": "x"},
        {"name": "c", "ip_address": "::2", "description": "x"},
    ]
    assignments = {"api": {"production": ["a", "b", "c"], "staging": ["a"]}}
    config = make_config(**{"k.yaml": base(clients=clients, assignments=assignments)})
    assert rules_of(config) == []


def test_usage_error_exit_code():
    assert run("check", "--format", "xml")[0] == EXIT_USAGE
    assert run("no-such-command")[0] == EXIT_USAGE
    assert run("check", "--ignore", "open-rnage", str(ROOT / "config"))[0] == EXIT_USAGE


def test_console_script_runs():
    """The installed `knoxcall` entry point (pyproject) exits with the check's code."""
    exe = BIN / "knoxcall"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "knoxcall_addon.cli"]
    result = subprocess.run([*cmd, "check", str(ROOT / "config")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "0 error(s)" in result.stdout


def test_open_shadows_host_names_both_routes_and_spares_safe_shapes(make_config):
    """Flagged only where forward mode would take the open route for the protected host."""
    shadowing = make_config(
        **{
            "k.yaml": base(
                routes=[
                    {"name": "api", "match": {"hosts": ["secret.example"], "path_prefix": "/v1"}},
                    {"name": "pub", "requires_clients": False, "match": {"path_prefix": "/v1/status"}},
                ]
            )
        }
    )
    findings = [f for f in lint(load_config(shadowing)) if f.rule == "open-shadows-host"]
    assert len(findings) == 1
    assert '"pub"' in findings[0].message and '"api"' in findings[0].message and "secret.example" in findings[0].message
    safe = [
        {"name": "pub", "requires_clients": False, "match": {"path_prefix": "/other"}},  # not under /v1
        {"name": "pub", "requires_clients": False, "match": {"hosts": ["pub.example"], "path_prefix": "/v1/s"}},
        {"name": "pub", "requires_clients": False, "target_base_url": "http://127.0.0.1:9",
         "match": {"path_prefix": "/v1/s"}},  # has a target: never reaches secret.example
    ]  # fmt: skip
    for open_route in safe:
        config = make_config(
            **{
                "k.yaml": base(
                    routes=[{"name": "api", "match": {"hosts": ["secret.example"], "path_prefix": "/v1"}}, open_route]
                )
            }
        )
        assert "open-shadows-host" not in [f.rule for f in lint(load_config(config))], open_route
