"""Report-only rollout: refusals of the client check are logged (report_only) and let through.

Pure decisions on a small config, `knoxcall check`/`explain`, and a real mitmdump whose
upstream receives the reported requests while the access log, event log and flow say
what would have been refused.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from knoxcall_addon.cli import EXIT_OK, main
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.lint import lint
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import load_policy
from tests.e2e_util import record_for
from tests.harness import MitmDump, Upstream, client_from

OFFICE, STRANGER = "127.0.0.9", "127.0.0.99"


def config(upstream_url: str = "http://127.0.0.1:9", **settings: object) -> dict:
    return {
        "settings": {"default_environment": "production", **settings},
        "environments": [{"name": "production"}, {"name": "staging"}],
        "clients": [
            {"name": "office", "ip_address": "127.0.0.8/29"},
            {"name": "lab", "ip_address": "127.0.0.16/29"},
            {"name": "old", "ip_address": "127.0.0.24/29", "enabled": False},
        ],
        "routes": [
            {"name": "api", "target_base_url": upstream_url, "allowed_methods": ["GET"], "mode": "report",
             "match": {"path_prefix": "/v1"}, "environments": {"staging": {"mode": "enforce"}}},
            {"name": "admin", "target_base_url": upstream_url, "match": {"path_prefix": "/admin"}},
            {"name": "keyed", "target_base_url": upstream_url, "requires_api_key": True, "mode": "report",
             "match": {"path_prefix": "/keyed"}},
        ],
        "assignments": {"api": {"production": ["office", "old"], "staging": ["office"]},
                        "admin": {"production": ["office"]}, "keyed": {"production": ["office"]}},
    }  # fmt: skip


def write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "knoxcall.yaml").write_text(yaml.safe_dump(data))
    return folder


def facts(peer: str, path: str = "/v1/x", **kw: object) -> RequestFacts:
    return RequestFacts(peer=peer, host="api.local", path=path, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "reason", "client"),
    [(STRANGER, "ip_not_whitelisted", None), ("127.0.0.17", "client_not_assigned", "lab"),
     ("127.0.0.25", "client_disabled", "old")],
)  # fmt: skip
def test_client_refusals_are_reported_and_let_through(tmp_path: Path, peer: str, reason: str, client: str) -> None:
    policy = load_policy(write(tmp_path / "c", config()))
    decision = decide(policy, facts(peer))
    assert (decision.allowed, decision.reason, decision.report_only, decision.client) == (True, reason, True, client)
    assert decision.target_url == "http://127.0.0.1:9" and decision.status == 0
    assert "(report-only: would be refused 403" in decision.summary()
    assert decision.fields()["report_only"] is True


def test_the_most_specific_mode_wins_and_other_answers_are_unchanged(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path / "c", config(mode="report")))
    # the route's environment override says enforce
    assert decide(policy, facts(STRANGER, environment="staging")).reason == "ip_not_whitelisted"
    assert not decide(policy, facts(STRANGER, environment="staging")).allowed
    # settings.mode report reaches the admin route, which says nothing itself
    assert decide(policy, facts(STRANGER, path="/admin")).report_only
    # 405, 401 and 404 are about the request, not the allowlist: unchanged
    wrong_method = decide(policy, facts(STRANGER, method="POST"))
    assert (wrong_method.allowed, wrong_method.reason, wrong_method.report_only) == (False, "method_not_allowed", False)
    assert decide(policy, facts(STRANGER, path="/keyed")).reason == "api_key_required"
    assert decide(policy, facts(STRANGER, path="/nowhere")).reason == "route_not_found"
    # an allowed caller is allowed as before, not "reported"
    assert (decide(policy, facts(OFFICE)).reason, decide(policy, facts(OFFICE)).report_only) == ("client", False)
    enforced = load_policy(write(tmp_path / "e", config(mode="enforce")))
    assert not decide(enforced, facts(STRANGER, path="/admin")).allowed


def test_a_bad_mode_is_a_config_error_with_file_and_line(tmp_path: Path) -> None:
    data = config()
    data["routes"][1]["mode"] = "warn"
    with pytest.raises(ConfigError, match=r"knoxcall.yaml:\d+: route 'admin': mode must be 'enforce' or 'report'"):
        load_config(write(tmp_path / "c", data))


def test_check_warns_in_the_default_environment_and_notes_the_rest(tmp_path: Path) -> None:
    data = config()
    data["routes"][0]["environments"] = {"staging": {"mode": "report"}}
    data["routes"][0].pop("mode")
    folder = write(tmp_path / "c", data)
    out = io.StringIO()
    assert main(["check", str(folder)], out=out) == EXIT_OK
    assert "note: route 'api' is in report mode in staging" in out.getvalue()
    assert 'warning[report-mode] route "api"' not in out.getvalue()  # staging is not the default
    assert [f.rule for f in lint(load_config(write(tmp_path / "d", config()))) if f.rule == "report-mode"] == [
        "report-mode",
        "report-mode",
    ]  # api and keyed, in production


def test_explain_says_report_only(tmp_path: Path) -> None:
    folder = write(tmp_path / "c", config())
    out = io.StringIO()
    main(["explain", str(folder), "--ip", STRANGER, "--route", "api"], out=out)
    first = out.getvalue().splitlines()[0]
    assert first == "ALLOWED (report-only: refused when enforced): ip_not_whitelisted"


def test_report_mode_end_to_end(tmp_path: Path) -> None:
    with Upstream("api") as upstream:
        folder = write(tmp_path / "config", config(upstream.url))
        proxy = MitmDump(folder, mode=f"reverse:{upstream.url}", access_log=tmp_path / "access.jsonl")
        with proxy:
            with client_from(STRANGER) as client:
                reported = client.get(proxy.url + "/v1/users")
                enforced = client.get(proxy.url + "/v1/users", headers={"x-knoxcall-environment": "staging"})
                wrong_method = client.post(proxy.url + "/v1/users")
            assert reported.status_code == 200 and reported.json()["path"] == "/v1/users"  # the upstream got it
            assert enforced.status_code == 403 and wrong_method.status_code == 405
            assert len(upstream.seen) == 1
            record = record_for(proxy, reported.headers["x-knoxcall-request-id"])
            assert (record["decision"], record["reason"], record["report_only"], record["status"]) == (
                "allowed", "ip_not_whitelisted", True, 200,
            )  # fmt: skip
            assert record_for(proxy, enforced.headers["x-knoxcall-request-id"])["report_only"] is False
            line = proxy.wait_for_log(f"id={reported.headers['x-knoxcall-request-id']}")
            assert f"knoxcall: allowed ip_not_whitelisted {STRANGER} route=api env=production" in line
            assert "(report-only: would be refused 403)" in line
    assert json.loads((tmp_path / "access.jsonl").read_text().splitlines()[0])["report_only"] is True
