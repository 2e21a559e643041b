"""`knoxcall logs`: on a log a real mitmdump wrote, on rotated and gzipped files, filters,
report-only lines, bounded memory, and --follow across a rotation."""

from __future__ import annotations

import gzip
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from knoxcall_addon import loginsights
from knoxcall_addon.cli import main
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.explain import advice, nearest_assigned
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.loginsights import Summary, Tally, since_cutoff, summarize
from knoxcall_addon.networks import parse_network
from knoxcall_addon.policy import load_policy
from tests.harness import MitmDump, Upstream, client_from

CONFIG = {
    "environments": [{"name": "production"}, {"name": "staging"}],
    "clients": [
        {"name": "partner-acme", "ip_address": "127.0.0.0/29"},
        {"name": "laptops", "ip_address": "127.0.1.0/24"},
        {"name": "retired", "ip_address": "127.0.2.0/24", "enabled": False},
    ],
    "routes": [{"name": "payments"}],
    "assignments": {"payments": {"production": ["partner-acme", "retired"], "staging": ["laptops"]}},
}


def write_config(folder: Path, upstream_url: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    config = json.loads(json.dumps(CONFIG))
    if upstream_url:
        config["routes"][0]["target_base_url"] = upstream_url
    (folder / "k.yaml").write_text(json.dumps(config), encoding="utf-8")
    return folder


def run(*argv: str, expect: int = 0) -> str:
    out = io.StringIO()
    assert main(["logs", *argv], out=out) == expect
    return out.getvalue()


def line(**fields: Any) -> str:
    record = {"ts": "2026-11-30T10:00:00.000Z", "decision": "denied", "route": "payments", "environment": "production"}
    return json.dumps({**record, **fields}) + "\n"


def test_a_log_written_by_mitmdump(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    with Upstream("main") as upstream:
        config = write_config(tmp_path / "config", upstream.url)
        with MitmDump(config, mode=f"reverse:{upstream.url}", access_log=log) as proxy:
            sent = {"127.0.0.3": 4, "127.0.0.9": 7, "127.0.1.5": 3, "127.0.2.9": 2}  # allowed, none, staging, disabled
            for source, count in sent.items():
                with client_from(source) as caller:
                    for _ in range(count):
                        caller.get(proxy.url + "/pay", headers={"x-knoxcall-route": "payments"})
            deadline = time.monotonic() + 10
            while len(proxy.access_records()) < sum(sent.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
    text = run(str(log), "--config", str(config), "--format", "json")
    data = json.loads(text)
    assert data["requests"] == {"total": 16, "allowed": 4, "denied": 12, "report_only": 0}
    assert data["denied_by_reason"] == {"ip_not_whitelisted": 7, "client_not_assigned": 3, "client_disabled": 2}
    assert data["denied_by_route"] == [{"route": "payments", "environment": "production", "count": 12}]
    top = {row["client_ip"]: row for row in data["top_refused"]}
    assert [row["client_ip"] for row in data["top_refused"]] == ["127.0.0.9", "127.0.1.5", "127.0.2.9"]
    assert top["127.0.0.9"]["count"] == 7
    assert top["127.0.0.9"]["near_miss"] == (
        "no client holds 127.0.0.9; client partner-acme (assigned here) has 127.0.0.0/29"
    )
    assert top["127.0.0.9"]["change"].startswith("add 127.0.0.9 to client partner-acme's ip_address, or assign")
    assert top["127.0.1.5"]["near_miss"] == (
        "client laptops (127.0.1.0/24) is assigned to payments only in staging, not in production"
    )
    assert top["127.0.1.5"]["change"] == "add laptops to assignments: payments: production"
    assert top["127.0.2.9"]["change"] == "enable client retired (enabled: true)"

    text = run(str(log), "--config", str(config))
    assert "127.0.0.9 was refused 7 times on payments/production (ip_not_whitelisted)" in text
    assert "    change: add 127.0.0.9 to client partner-acme's ip_address" in text


def test_rotated_and_gzipped_files_are_read_oldest_first(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    with gzip.open(tmp_path / "access.jsonl.2.gz", "wt") as f:
        f.write(line(client_ip="10.0.0.1", reason="ip_not_whitelisted") * 3)
    (tmp_path / "access.jsonl.1").write_text(line(client_ip="10.0.0.2", reason="ip_not_whitelisted") * 2)
    log.write_text(line(client_ip="10.0.0.3", reason="ip_not_whitelisted"))
    (tmp_path / "access.jsonl.bak-notes").write_text("not a rotated log\n")
    now = time.time()
    os.utime(tmp_path / "access.jsonl.2.gz", (now - 7200, now - 7200))
    os.utime(tmp_path / "access.jsonl.1", (now - 3600, now - 3600))
    text = run(str(log), "--config", str(tmp_path / "none"), "--format", "json")
    data = json.loads(text)
    assert data["files"] == [str(tmp_path / n) for n in ("access.jsonl.2.gz", "access.jsonl.1", "access.jsonl")]
    assert data["requests"]["denied"] == 6 and data["unreadable_lines"] == 0
    assert data["config"]["folder"].endswith("no advice")
    text = run(str(log), "--no-rotated", "--format", "json")
    assert json.loads(text)["requests"]["denied"] == 1
    # a rotated file last written before --since is not even opened
    text = run(str(log), "--since", "90m", "--format", "json")
    assert json.loads(text)["files"] == [str(tmp_path / "access.jsonl.1"), str(log)]


def test_since_route_and_environment_filters(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    log.write_text(
        line(ts="2026-11-30T09:00:00.000Z", client_ip="10.0.0.1", reason="ip_not_whitelisted")
        + line(ts="2026-11-30T11:00:00.000Z", client_ip="10.0.0.2", reason="ip_not_whitelisted")
        + line(ts="2026-11-30T11:00:01.000Z", client_ip="10.0.0.3", reason="ip_not_whitelisted", environment="staging")
        + line(ts="2026-11-30T11:00:02.000Z", client_ip="10.0.0.4", reason="route_not_found", route="other")
    )
    text = run(str(log), "--since", "2026-11-30T10:00:00Z", "--format", "json")
    assert json.loads(text)["requests"]["denied"] == 3
    text = run(str(log), "--since", "2026-11-30T10:00:00Z", "--env", "production", "--format", "json")
    assert json.loads(text)["requests"]["denied"] == 2
    text = run(str(log), "--route", "payments", "--env", "staging", "--format", "json")
    assert [r["client_ip"] for r in json.loads(text)["top_refused"]] == ["10.0.0.3"]
    run(str(log), "--since", "yesterday", expect=2)


def test_since_forms() -> None:
    now = 1_800_000_000.0
    assert since_cutoff("1h", now) == "2027-01-15T07:00:00.000Z"
    assert since_cutoff("1h30m", now) == "2027-01-15T06:30:00.000Z"
    assert since_cutoff("2026-11-30T10:00:00", now) == "2026-11-30T10:00:00.000Z"
    assert since_cutoff("2026-11-30T12:00:00+02:00", now) == "2026-11-30T10:00:00.000Z"
    with pytest.raises(ValueError):
        since_cutoff("1 fortnight", now)


def test_report_only_lines_are_listed_apart() -> None:
    summary = summarize(
        [
            line(decision="report", reason="client_not_assigned", client_ip="10.0.0.1").encode(),
            line(decision="allowed", report_only=True, reason="ip_not_whitelisted", client_ip="10.0.0.2").encode(),
            line(decision="allowed", reason="rate_limited", client_ip="10.0.0.3").encode(),  # a rate limit, reported
            line(decision="allowed", reason="client", client_ip="10.0.0.4").encode(),
            line(decision="denied", reason="ip_not_whitelisted", client_ip="10.0.0.5").encode(),
            b"not json\n",
            b'{"torn": \n',
        ]
    )
    assert (summary.allowed, summary.denied, summary.report_only, summary.unreadable) == (1, 1, 3, 2)
    assert {key[0] for key in summary.reported.counts} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert dict(summary.by_reason.top()) == {"ip_not_whitelisted": 1}  # report-only lines are not denials


def test_the_tally_is_exact_below_its_capacity_and_bounded_above() -> None:
    tally = Tally(capacity=1000)
    for i in range(900):
        tally.add(f"k{i % 300}")
    assert tally.slack == 0 and tally.counts["k7"] == 3
    heavy = Tally(capacity=1000)
    for i in range(200_000):  # 200,000 distinct callers, and one that comes back every tenth line
        heavy.add("heavy" if i % 10 == 0 else f"once-{i}")
        assert len(heavy.counts) <= 1000
    assert heavy.top(1)[0][0] == "heavy"
    assert 20_000 - heavy.slack <= heavy.counts["heavy"] <= 20_000


def test_an_overlong_line_is_skipped_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loginsights, "MAX_LINE_BYTES", 64)
    good = b'{"decision":"allowed","reason":"client"}\n'
    lines = list(loginsights.read_lines(io.BytesIO(b"x" * 1000 + b"\n" + good)))
    assert lines == [None, good]  # the 1000-byte line was read 64 bytes at a time and dropped
    summary = Summary()
    for item in lines:
        summary.add_line(item)
    assert (summary.unreadable, summary.allowed) == (1, 1)


def test_follow_prints_new_refusals_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    log.write_text(line(client_ip="10.0.0.1", reason="ip_not_whitelisted"))
    config = write_config(tmp_path / "config")
    command = [sys.executable, "-m", "knoxcall_addon.cli", "logs", str(log), "--follow", "--format", "json"]
    child = subprocess.Popen(
        [*command, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(text) for text in child.stdout or ()], daemon=True)
    reader.start()

    def next_line() -> str:
        return lines.get(timeout=30)  # bounded: a missing line fails the test, it does not hang it

    try:
        summary_lines = []
        for _ in range(200):  # the summary (indented JSON) ends with a lone "}"
            text = next_line()
            summary_lines.append(text)
            if text == "}\n":
                break
        assert json.loads("".join(summary_lines))["requests"]["denied"] == 1
        with log.open("a") as f:
            f.write(line(client_ip="127.0.0.9", reason="ip_not_whitelisted"))
            f.write(line(decision="allowed", reason="client", client_ip="127.0.0.3"))
        first = json.loads(next_line())
        assert first["client_ip"] == "127.0.0.9" and first["report_only"] is False
        assert first["change"].startswith("add 127.0.0.9 to client partner-acme's ip_address")
        log.rename(tmp_path / "access.jsonl.1")  # logrotate
        log.write_text(line(decision="report", reason="client_not_assigned", client_ip="127.0.1.5"))
        second = json.loads(next_line())
        assert second["client_ip"] == "127.0.1.5" and second["report_only"] is True
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def test_advice_for_each_kind_of_refusal(make_config) -> None:
    """explain.advice (what `knoxcall logs` prints) decided from the real decision of each case."""
    config = json.loads(json.dumps(CONFIG))
    config["clients"] += [
        {"name": "far", "ip_address": ["10.0.0.0/8", "2001:db8:1::/48"]},
        {"name": "near-v6", "ip_address": "2001:db8:2:5::/64"},
        {"name": "spare", "ip_address": "127.0.3.0/24", "enabled": False},
    ]
    config["routes"].append({"name": "lonely"})
    config["assignments"]["payments"]["production"] += ["far", "near-v6"]
    policy = load_policy(make_config(**{"k.yaml": config}))

    def advised(ip: str, route: str = "payments", env: str = "production") -> tuple[str, str] | None:
        return advice(policy, decide(policy, RequestFacts(peer=ip, route=route, environment=env)))

    assert advised("127.0.0.3") is None  # allowed: nothing to advise
    assert advised("2001:db8:2:9::1") == (
        "no client holds 2001:db8:2:9::1; client near-v6 (assigned here) has 2001:db8:2:5::/64",
        "add 2001:db8:2:9::1 to client near-v6's ip_address, or assign the client that should hold it "
        "to payments in production",
    )
    assert nearest_assigned(policy, parse_ip("10.9.9.9"), "payments", "production") == (
        "far",
        parse_network("10.0.0.0/8"),
    )
    assert advised("127.0.3.7") == (
        "client spare (127.0.3.0/24) is disabled; assigned nowhere",
        "enable client spare (enabled: true) and add spare to assignments: payments: production",
    )
    assert advised("127.0.2.1")[1] == "enable client retired (enabled: true)"  # disabled, assigned here
    assert advised("127.0.0.200", route="lonely") == (
        "no client holds 127.0.0.200 and no enabled client is assigned to lonely in production",
        "add a client with 127.0.0.200 and assign it to lonely in production",
    )
