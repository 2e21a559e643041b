"""The access log of a real mitmdump: logrotate moves it while requests flow, or the disk is full."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.harness import MitmDump, Upstream, client_from, free_port

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"


def config(tmp_path: Path, upstream: Upstream) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "k.yaml").write_text(
        json.dumps(
            {
                "environments": [{"name": "production"}],
                "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
                "routes": [{"name": "api", "target_base_url": upstream.url}],
                "assignments": {"api": {"production": ["office"]}},
            }
        ),
        encoding="utf-8",
    )
    return folder


def request_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["request_id"] for line in path.read_text("utf-8").splitlines() if line.strip()]


def test_a_rotated_access_log_is_followed_while_serving(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "access.jsonl"
    rotated = tmp_path / "logs" / "access.jsonl.1"
    sent: list[str] = []
    with (
        Upstream("main") as upstream,
        MitmDump(config(tmp_path, upstream), mode=f"reverse:{upstream.url}", access_log=log) as proxy,
        client_from(OFFICE) as office,
        client_from(STRANGER) as stranger,
    ):

        def send() -> None:
            for caller, status in ((office, 200), (stranger, 403)):
                response = caller.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"})
                assert response.status_code == status
                sent.append(response.headers["x-knoxcall-request-id"])

        for _ in range(5):
            send()
        deadline = time.monotonic() + 10
        while len(request_ids(log)) < len(sent) and time.monotonic() < deadline:  # written when answered
            time.sleep(0.05)
        log.rename(rotated)  # what logrotate does (then "create", or not: both work)
        for _ in range(300):  # bounded: the path is looked at once a second
            send()
            if request_ids(log):
                break
            time.sleep(0.05)
        for _ in range(5):
            send()
        deadline = time.monotonic() + 10
        while len(request_ids(log)) + len(request_ids(rotated)) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.wait_for_log("was moved or removed (rotated); writing a new one")
    old, new = request_ids(rotated), request_ids(log)
    assert new, "no line reached a new file at the access log's path"
    assert sorted(old + new) == sorted(sent)  # every request once, none lost, none twice
    assert new[-10:] == sent[-10:]  # the last requests are in the new file
    assert old[:10] == sent[:10]


def test_a_full_disk_never_stops_the_decisions(tmp_path: Path) -> None:
    """/dev/full refuses every write (ENOSPC): requests are still decided, the failure is
    logged once, and /metrics counts the lost lines."""
    port = free_port()
    with (
        Upstream("main") as upstream,
        MitmDump(
            config(tmp_path, upstream),
            mode=f"reverse:{upstream.url}",
            access_log="/dev/full",
            extra=["--set", f"knoxcall_metrics={port}"],
        ) as proxy,
        client_from(OFFICE) as office,
        client_from(STRANGER) as stranger,
    ):
        for _ in range(10):
            assert office.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"}).status_code == 200
            denied = stranger.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"})
            assert denied.status_code == 403 and denied.json()["error"] == "IP not authorized"
        assert len(upstream.seen) == 10  # the refused ones never reached it
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            if "knoxcall_access_log_lines_lost_total 20.0" in text:
                break
            time.sleep(0.05)
        assert "knoxcall_access_log_lines_lost_total 20.0" in text
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        events = proxy.log_text()
    assert events.count("cannot write the access log /dev/full") == 1
