"""Rate limits end to end with the memory store: a real mitmdump in reverse mode, real echo
upstreams, callers bound to 127.0.0.x sources. Windows are an hour long, so that nothing
refills while a test runs: every count below is exact.

Sources: office 127.0.0.8/29 (127.0.0.9 calls), partner 127.0.0.16/29 (127.0.0.17), the
trusted proxy 127.0.0.60, and 127.0.0.99 which no client covers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e_util import assert_denial, record_for
from tests.harness import ROOT, MitmDump, Upstream, client_from

OFFICE = "127.0.0.9"
PARTNER = "127.0.0.17"
STRANGER = "127.0.0.99"
TRUSTED_PROXY = "127.0.0.60"
STATUS_PROBE = ROOT / "tests" / "status_probe.py"

CONFIG = """\
settings:
  default_environment: production
  trusted_proxies: [{trusted}]
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
  - name: partner
    ip_address: 127.0.0.16/29
    rate_limit: {{requests: 2, window_sec: 3600}}
routes:
  - name: tight
    match: {{path_prefix: /tight}}
    client_rate_limit: {{requests: 3, window_sec: 3600}}
  - name: crowd
    match: {{path_prefix: /crowd}}
    rate_limit: {{requests: 5, window_sec: 3600}}
  - name: watch
    match: {{path_prefix: /watch}}
    client_rate_limit: {{requests: 1, window_sec: 3600, mode: report}}
  - name: guarded
    match: {{path_prefix: /guarded}}
    rate_limit: {{requests: 1, window_sec: 3600}}
  - name: theirs
    match: {{path_prefix: /theirs}}
    target_base_url: {own_headers}
    client_rate_limit: {{requests: 100, window_sec: 3600}}
  - name: quiet
    match: {{path_prefix: /quiet}}
assignments:
  tight: {{production: [office, partner]}}
  crowd: {{production: [office]}}
  watch: {{production: [office]}}
  guarded: {{production: [office]}}
  theirs: {{production: [office]}}
  quiet: {{production: [office]}}
"""


class _OwnHeaders(BaseHTTPRequestHandler):
    """An upstream that sends rate limit headers of its own."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("X-RateLimit-Limit", "999")
        self.send_header("X-RateLimit-Remaining", "998")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def own_headers() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OwnHeaders)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Setup:
    def __init__(self, proxy: MitmDump, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream

    def get(self, source: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        with client_from(source) as client:
            return client.get(self.proxy.url + path, headers=headers)

    def seen(self, prefix: str) -> int:
        return sum(1 for r in self.upstream.seen if r["path"].startswith(prefix))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, own_headers: str) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("ratelimit-e2e")
    folder = root / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG.format(trusted=TRUSTED_PROXY, own_headers=own_headers))
    with Upstream("main") as upstream:
        proxy = MitmDump(folder, mode=f"reverse:{upstream.url}", access_log=root / "access.jsonl")
        with proxy:
            yield Setup(proxy, upstream)


def test_the_request_after_the_burst_gets_429_and_never_reaches_the_upstream(setup: Setup) -> None:
    before = time.time()
    allowed = [setup.get(OFFICE, "/tight/x") for _ in range(3)]
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["x-ratelimit-limit"] for r in allowed] == ["3", "3", "3"]
    assert [r.headers["x-ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
    # full again one interval (20 min) per token taken
    resets = [int(r.headers["x-ratelimit-reset"]) for r in allowed]
    for taken, reset in enumerate(resets, 1):
        assert before + taken * 1200 - 1 <= reset <= time.time() + taken * 1200 + 1

    refused = setup.get(OFFICE, "/tight/x")
    retry = refused.json()["retry_after"]
    request_id = assert_denial(
        refused, 429, {"error": "Rate limit exceeded", "status": 429, "limit": "client_route", "retry_after": retry}
    )
    assert 1190 <= retry <= 1200
    assert refused.headers["retry-after"] == str(retry)
    assert (refused.headers["x-ratelimit-limit"], refused.headers["x-ratelimit-remaining"]) == ("3", "0")
    assert setup.seen("/tight") == 3

    record = record_for(setup.proxy, request_id)
    assert (record["decision"], record["reason"], record["status"], record["client"]) == (
        "denied", "rate_limited", 429, "office")  # fmt: skip
    assert record["rate_limit"] == {"kind": "client_route", "limit": 3, "remaining": 0,
                                    "reset": int(refused.headers["x-ratelimit-reset"])}  # fmt: skip
    line = setup.proxy.wait_for_log(f"id={request_id}")
    assert re.search(
        rf"knoxcall: denied rate_limited {OFFICE} route=tight env=production client=office \(client_route limit of "
        rf"tight in production \(3 per 3600 s\) exceeded, retry after {retry} s\) id={request_id}",
        line,
    )
    # another caller has its own bucket
    assert setup.get(PARTNER, "/tight/x").status_code == 200


def test_a_client_limit_counts_the_client_over_all_routes(setup: Setup) -> None:
    # partner: 2 per hour over everything; one was taken by the test above (or is taken here)
    statuses = [setup.get(PARTNER, "/tight/y").status_code for _ in range(3)]
    assert statuses.count(200) <= 2 and statuses[-1] == 429
    refused = setup.get(PARTNER, "/tight/y")
    assert refused.json()["limit"] == "client"  # its per-caller bucket on tight still has tokens


def test_a_request_refused_for_its_ip_takes_no_token(setup: Setup) -> None:
    for _ in range(3):
        assert setup.get(STRANGER, "/guarded").status_code == 403
    assert setup.get(OFFICE, "/guarded").status_code == 200  # the route's one token was still there
    assert setup.get(OFFICE, "/guarded").status_code == 429


def test_concurrent_requests_never_overshoot(setup: Setup) -> None:
    """40 requests at once against a limit of 5 for the whole route: exactly 5 go through."""
    barrier = threading.Barrier(40)

    def one(_: int) -> int:
        with client_from(OFFICE) as client:
            barrier.wait(10)
            return client.get(setup.proxy.url + "/crowd/z").status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(one, range(40)))
    assert sorted(statuses) == [200] * 5 + [429] * 35
    assert setup.seen("/crowd") == 5


def test_report_mode_refuses_nothing_and_logs_who_would_have_been_refused(setup: Setup) -> None:
    responses = [setup.get(OFFICE, "/watch") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert setup.seen("/watch") == 3
    records = [record_for(setup.proxy, r.headers["x-knoxcall-request-id"]) for r in responses]
    assert [(r["decision"], r["reason"], r["status"]) for r in records] == [
        ("allowed", "client", 200), ("allowed", "rate_limited", 200), ("allowed", "rate_limited", 200)]  # fmt: skip
    assert "report_only" not in records[0]["rate_limit"]
    assert records[1]["rate_limit"]["report_only"] is True and records[1]["rate_limit"]["kind"] == "client_route"
    second = responses[1].headers["x-knoxcall-request-id"]
    line = setup.proxy.wait_for_log(f"id={second}")
    assert re.search(
        rf"knoxcall: allowed rate_limited {OFFICE} route=watch env=production client=office \(report-only: "
        rf"client_route limit of watch in production \(1 per 3600 s, report only\) exceeded, retry after \d+ s\) "
        rf"id={second}",
        line,
    )
    assert responses[2].headers["x-ratelimit-remaining"] == "0"


def test_an_upstreams_own_rate_limit_headers_are_left_alone(setup: Setup) -> None:
    response = setup.get(OFFICE, "/theirs")
    assert response.status_code == 200
    assert response.headers.get_list("x-ratelimit-limit") == ["999"]
    assert response.headers.get_list("x-ratelimit-remaining") == ["998"]
    assert "x-ratelimit-reset" not in response.headers  # none of ours beside theirs


def test_routes_without_limits_carry_no_headers_and_log_null(setup: Setup) -> None:
    response = setup.get(OFFICE, "/quiet")
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("x-ratelimit")]
    record = record_for(setup.proxy, response.headers["x-knoxcall-request-id"])
    assert "rate_limit" in record and record["rate_limit"] is None


# -- one proxy per test ------------------------------------------------------------------------

RELOADED = """\
settings:
  default_environment: production
  trusted_proxies: [{trusted}]
{extra_settings}
environments:
  - name: production
clients:
  - name: office
    ip_address: 127.0.0.8/29
{extra_client}
routes:
  - name: api
    client_rate_limit: {{requests: {requests}, window_sec: 3600}}
  - name: flood
    requires_clients: false
    client_rate_limit: {{requests: 1, window_sec: 3600}}
assignments:
  api: {{production: [office]}}
"""


def write_config(folder: Path, requests: int = 3, extra_client: str = "", extra_settings: str = "") -> None:
    text = RELOADED.format(trusted=TRUSTED_PROXY, requests=requests, extra_client=extra_client,
                           extra_settings=extra_settings)  # fmt: skip
    tmp = folder / ".knoxcall.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "knoxcall.yaml")


def statuses(proxy: MitmDump, source: str, count: int, route: str = "api") -> list[int]:
    with client_from(source) as client:
        return [client.get(proxy.url + "/", headers={"x-knoxcall-route": route}).status_code for _ in range(count)]


def test_a_reload_keeps_the_buckets_of_unchanged_limits_and_a_changed_limit_starts_full(tmp_path, upstream):
    folder = tmp_path / "config"
    folder.mkdir()
    write_config(folder)
    with MitmDump(folder, mode=f"reverse:{upstream.url}") as proxy:
        assert statuses(proxy, OFFICE, 4) == [200, 200, 200, 429]
        mark = len(proxy.log_text())
        write_config(folder, extra_client="  - name: lab\n    ip_address: 127.0.0.40/29")
        proxy.wait_for_log("clients +lab", after=mark)
        assert statuses(proxy, OFFICE, 1) == [429]  # the bucket was kept: still empty
        mark = len(proxy.log_text())
        write_config(folder, requests=4, extra_client="  - name: lab\n    ip_address: 127.0.0.40/29")
        proxy.wait_for_log("routes ~api(client_rate_limit)", after=mark)
        assert statuses(proxy, OFFICE, 5) == [200, 200, 200, 200, 429]


def test_a_flood_of_distinct_ipv6_callers_keeps_memory_bounded(tmp_path, upstream):
    folder = tmp_path / "config"
    folder.mkdir()
    write_config(folder, extra_settings="  rate_limit_max_buckets: 50")
    status_file = tmp_path / "status.txt"
    extra = ["-s", str(STATUS_PROBE), "--set", f"status_probe_file={status_file}"]
    with MitmDump(folder, mode=f"reverse:{upstream.url}", extra=extra) as proxy, client_from(TRUSTED_PROXY) as client:

        def call(ip: str) -> int:
            headers = {"x-knoxcall-route": "flood", "X-Forwarded-For": ip}
            return client.get(proxy.url + "/", headers=headers).status_code

        # 300 callers in distinct /64s: each has a fresh bucket, and only 50 are kept
        assert [call(f"2001:db8:{n:x}:1::1") for n in range(300)] == [200] * 300
        # the same /64 is the same caller, whatever the host part
        assert call("2001:db8:12b:1:ffff::2") == 429
        expected = ("rate limits: 2 client_route; store: memory (this process), 50 buckets in this process "
                    "(at most 50; 250 dropped before they were full)")  # fmt: skip
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline and expected not in text:  # the probe writes every 0.1 s
            time.sleep(0.1)
            text = status_file.read_text() if status_file.exists() else ""
        assert expected in text, text


def test_headers_can_be_turned_off_but_retry_after_stays(tmp_path, upstream):
    folder = tmp_path / "config"
    folder.mkdir()
    write_config(folder, requests=1, extra_settings="  rate_limit_headers: false")
    with MitmDump(folder, mode=f"reverse:{upstream.url}") as proxy, client_from(OFFICE) as client:
        ok, refused = (client.get(proxy.url + "/", headers={"x-knoxcall-route": "api"}) for _ in range(2))
        assert (ok.status_code, refused.status_code) == (200, 429)
        for response in (ok, refused):
            assert not [name for name in response.headers if name.startswith("x-ratelimit")]
        assert int(refused.headers["retry-after"]) == json.loads(refused.content)["retry_after"] >= 1
