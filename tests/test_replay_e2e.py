"""Replaying flows: decided again as the original request was, on the policy in force now.

A real mitmdump saves the flows of an allowed and a refused request (`-w`), then another
replays them from that file (`-C`, mitmproxy's client replay: the same path as mitmweb's
*replay*) against a real upstream: once with the same config, once after the allowed
client was removed. The API key is never in the saved flows, and a replay never proves one.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from mitmproxy import io

from tests.e2e_util import sha
from tests.harness import MitmDump, Upstream, client_from

OFFICE, STRANGER = "127.0.0.9", "127.0.0.99"
KEY = "replay-test-key-" + str(time.time_ns())


def write_config(folder: Path, upstream: Upstream, office: str = "127.0.0.8/29") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "environments": [{"name": "production"}, {"name": "staging"}],
        "clients": [{"name": "office", "ip_address": office}],
        "routes": [
            {"name": "api", "target_base_url": upstream.url + "/base", "match": {"path_prefix": "/v1"}},
            {"name": "keyed", "target_base_url": upstream.url, "requires_api_key": True,
             "match": {"path_prefix": "/keyed"}},
        ],
        "assignments": {"api": {"production": ["office"], "staging": ["office"]},
                        "keyed": {"production": ["office"]}},
        "api_keys": [{"name": "ci", "key_sha256": sha(KEY)}],
    }  # fmt: skip
    (folder / "knoxcall.yaml").write_text(yaml.safe_dump(config))
    return folder


def replay(folder: Path, flows: Path, upstream: Upstream, log: Path, access: Path) -> list[dict]:
    """Replay every flow of ``flows`` through a fresh mitmdump; the access log lines it wrote."""
    proxy = MitmDump(folder, access_log=access, log_path=log, extra=["-C", str(flows)])
    with proxy:
        deadline = time.monotonic() + 30
        while len(proxy.access_records()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        return proxy.access_records()


def test_replay_is_decided_like_the_original_and_proves_no_key(tmp_path: Path) -> None:
    with Upstream("api") as upstream:
        folder = write_config(tmp_path / "config", upstream)
        flows = tmp_path / "flows.mitm"
        proxy = MitmDump(folder, mode=f"reverse:{upstream.url}", extra=["-w", str(flows)])
        with proxy, client_from(OFFICE) as office, client_from(STRANGER) as stranger:
            allowed = office.get(proxy.url + "/v1/users?x=1", headers={"x-knoxcall-environment": "staging"})
            keyed = office.get(proxy.url + "/keyed/a", headers={"x-knoxcall-key": KEY})
            refused = stranger.get(proxy.url + "/v1/users", headers={"x-knoxcall-key": KEY})
        assert (allowed.status_code, keyed.status_code, refused.status_code) == (200, 200, 403)
        assert [s["path"] for s in upstream.seen] == ["/base/v1/users?x=1", "/keyed/a"]
        saved = flows.read_bytes()
        assert KEY.encode() not in saved  # the key is in no saved flow, allowed or refused
        with flows.open("rb") as f:
            assert len(list(io.FlowReader(f).stream())) == 3

        # the same config: the allowed request again, to the same target, for the same
        # route and environment; the keyed one needs its key, which a replay never has
        records = replay(folder, flows, upstream, tmp_path / "r1.log", tmp_path / "r1.jsonl")
        got = sorted((r["route"], r["environment"], r["client_ip"], r["decision"], r["reason"]) for r in records)
        assert got == [
            ("api", "production", STRANGER, "denied", "ip_not_whitelisted"),
            ("api", "staging", OFFICE, "allowed", "client"),
            ("keyed", "production", OFFICE, "denied", "api_key_required"),
        ]
        assert [s["path"] for s in upstream.seen] == ["/base/v1/users?x=1", "/keyed/a", "/base/v1/users?x=1"]
        headers = {name.lower(): value for name, value in upstream.seen[-1]["headers"]}
        assert headers["x-forwarded-for"] == OFFICE  # the peer once, not once per replay
        assert not any(name.startswith("x-knoxcall-") for name in headers)

        # the office is no longer a client: the replay gets today's answer
        write_config(folder, upstream, office="127.0.0.200")
        records = replay(folder, flows, upstream, tmp_path / "r2.log", tmp_path / "r2.jsonl")
        assert sorted((r["client_ip"], r["reason"]) for r in records) == [
            (OFFICE, "api_key_required"),
            (OFFICE, "ip_not_whitelisted"),
            (STRANGER, "ip_not_whitelisted"),
        ]
        assert len(upstream.seen) == 3
