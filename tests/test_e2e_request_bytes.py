"""End to end, over raw sockets: what callers can spell in bytes (issue 8, findings 6 and 8).

A real mitmdump (reverse mode, access log on) in front of a real echo upstream, all on
loopback. 127.0.0.1 is a trusted proxy; the client "office" is 127.0.0.8/29.

- Finding 6: bytes that are not UTF-8 in User-Agent, Host, the path, x-knoxcall-route
  and x-knoxcall-environment; each request, allowed or denied, gets its access log line,
  valid UTF-8 JSON, with those bytes written as \\xHH.
- Finding 8: X-Forwarded-For entries from the trusted proxy that are not strictly an
  address stop the walk: the client is the proxy itself (denied, nothing upstream),
  never the office address written in the entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_util import raw_http, record_for
from tests.harness import MitmDump, Upstream

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
PROXY = "127.0.0.1"  # trusted


class Setup:
    def __init__(self, proxy: MitmDump, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream

    def send(self, source: str, head: bytes) -> tuple[int, dict[str, Any] | None, str]:
        """Send one raw HTTP/1.1 request head; (status, its access log record, request id)."""
        raw = raw_http(source, "127.0.0.1", self.proxy.port, head)
        status_line, _, rest = raw.partition(b"\r\n")
        status = int(status_line.split()[1])
        match = re.search(rb"(?im)^x-knoxcall-request-id:\s*([0-9a-f]{32})", rest)
        assert match, raw
        request_id = match.group(1).decode()
        return status, record_for(self.proxy, request_id), request_id

    def reached_upstream(self, marker: str) -> bool:
        return any(marker in seen["path"] for seen in self.upstream.seen)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("e2e-bytes")
    folder = root / "config"
    folder.mkdir()
    with Upstream("main") as upstream:
        (folder / "knoxcall.yaml").write_text(
            f"""\
settings:
  trusted_proxies: [{PROXY}]
environments: [{{name: production}}, {{name: staging}}]
clients:
  - {{name: office, ip_address: 127.0.0.8/29}}
routes:
  - name: api
    target_base_url: {upstream.url}
    match: {{path_prefix: /v1}}
assignments:
  api: {{production: [office], staging: [office]}}
"""
        )
        proxy = MitmDump(folder, mode=f"reverse:{upstream.url}", access_log=root / "access.jsonl")
        with proxy:
            yield Setup(proxy, upstream)


def request(path: bytes, headers: list[tuple[bytes, bytes]], host: bytes = b"api.test") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: " + host, *(name + b": " + value for name, value in headers)]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def assert_log_is_utf8_json(proxy: MitmDump) -> None:
    """Every line of the access log is UTF-8 and one JSON object."""
    assert proxy.access_log is not None
    for line in proxy.access_log.read_bytes().decode("utf-8").splitlines():
        assert isinstance(json.loads(line), dict)


# -- finding 6: every request gets its access log line --------------------------------------

# (name, source, path, headers, host, decision, fields expected in the line). decision None:
# either, by the request's own spelling (a non-ASCII path or host may be refused as not
# canonical before any route is looked at); the line must be there all the same.
NOT_UTF8: list[tuple[str, str, bytes, list[tuple[bytes, bytes]], bytes, str | None, dict[str, str]]] = [
    ("user-agent", OFFICE, b"/v1/ua", [(b"User-Agent", b"agent/\xff\xfe 1.0")], b"api.test", "allowed",
     {"user_agent": "agent/\\xff\\xfe 1.0"}),
    ("query", OFFICE, b"/v1/q?q=\xff", [], b"api.test", "allowed", {"path": "/v1/q?q=\\xff"}),
    ("path", OFFICE, b"/v1/caf\xe9", [], b"api.test", None, {"path": "/v1/caf\\xe9"}),
    ("host", OFFICE, b"/v1/host", [], b"h\xe9st.test", None, {"host": "h\\xe9st.test"}),
    ("method", OFFICE, b"/v1/method", [], b"api.test", None, {"method": "G\\xffT"}),
    ("all-denied", STRANGER, b"/v1/\xc3(", [(b"User-Agent", b"\x80")], b"\xfe.test", "denied",
     {"path": "/v1/\\xc3(", "user_agent": "\\x80", "host": "\\xfe.test"}),
    ("route", OFFICE, b"/v1/route", [(b"x-knoxcall-route", b"ap\xffi")], b"api.test", "denied",
     {"route": "ap\\xffi", "reason": "route_not_found"}),
    ("environment", OFFICE, b"/v1/env", [(b"x-knoxcall-environment", b"st\xe4ging")], b"api.test", "denied",
     {"environment": "st\\xe4ging", "reason": "environment_not_found"}),
    ("valid-utf8-kept", OFFICE, b"/v1/utf8", [(b"User-Agent", "caf\u00e9 \u2603".encode())], b"api.test", "allowed",
     {"user_agent": "caf\u00e9 \u2603"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "path", "headers", "host", "decision", "expected"),
    [case[1:] for case in NOT_UTF8],
    ids=[case[0] for case in NOT_UTF8],
)
def test_every_request_gets_its_access_log_line(
    setup: Setup,
    source: str,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    host: bytes,
    decision: str | None,
    expected: dict[str, str],
) -> None:
    head = request(path, headers, host)
    if "method" in expected:
        head = b"G\xffT" + head.removeprefix(b"GET")
    logged_before = len(setup.proxy.log_text())
    status, record, _ = setup.send(source, head)
    assert record is not None
    assert record["status"] == status
    if decision is not None:
        assert record["decision"] == decision
        assert (status == 200) == (decision == "allowed")
    assert {name: record[name] for name in expected} == expected
    assert_log_is_utf8_json(setup.proxy)
    assert "cannot write the access log" not in setup.proxy.log_text()[logged_before:]


# -- finding 8: strict X-Forwarded-For from a trusted proxy -------------------------------------

BAD_SPELLINGS = [
    f"{OFFICE}:0",
    f"{OFFICE}:65536",
    f"{OFFICE}:abc",
    f"{OFFICE}:",
    f"{OFFICE}:080",
    f"[::ffff:{OFFICE}]x",
    f"[::ffff:{OFFICE}]:",
    f"[{OFFICE}]",
    f"{OFFICE}%eth0",
    f"::ffff:{OFFICE}%eth0",
    f"203.0.113.7,\x0b{OFFICE}",  # only space and tab are trimmed (mitmproxy strips a line's ends)
]


@pytest.mark.parametrize("entry", BAD_SPELLINGS)
def test_bad_forwarded_entry_stops_the_walk(setup: Setup, entry: str) -> None:
    marker = f"bad-{BAD_SPELLINGS.index(entry)}"
    head = request(f"/v1/{marker}".encode(), [(b"X-Forwarded-For", entry.encode())])
    status, record, _ = setup.send(PROXY, head)
    assert status == 403
    assert record is not None
    assert (record["reason"], record["client_ip"], record["peer_ip"]) == ("ip_not_whitelisted", PROXY, PROXY)
    assert not setup.reached_upstream(marker)


GOOD_SPELLINGS = [
    [OFFICE],
    [f"{OFFICE}:1"],
    [f"{OFFICE}:65535"],
    [f"::ffff:{OFFICE}"],
    [f"[::ffff:{OFFICE}]"],
    [f"[::ffff:{OFFICE}]:443"],
    [f"203.0.113.7, {OFFICE}, {PROXY}"],  # trusted hops skipped, the left part not believed
    [f"\t{OFFICE}\t,\t,{PROXY} "],  # tabs and spaces around entries, empty elements
    ["203.0.113.7", f"{OFFICE}", f"{PROXY}:8080"],  # several field lines: one list
]


@pytest.mark.parametrize("values", GOOD_SPELLINGS, ids=repr)
def test_good_forwarded_entries_name_the_client(setup: Setup, values: list[str]) -> None:
    marker = f"good-{GOOD_SPELLINGS.index(values)}"
    head = request(f"/v1/{marker}".encode(), [(b"X-Forwarded-For", value.encode()) for value in values])
    status, record, _ = setup.send(PROXY, head)
    assert status == 200
    assert record is not None
    assert (record["reason"], record["client"], record["client_ip"], record["peer_ip"]) == (
        "client",
        "office",
        OFFICE,
        PROXY,
    )
    assert setup.reached_upstream(marker)


def test_the_run_logged_no_access_log_failure(setup: Setup) -> None:
    assert_log_is_utf8_json(setup.proxy)
    assert "cannot write the access log" not in setup.proxy.log_text()


# -- finding 6: a line that cannot be written is logged, once per burst -----------------------


def test_failed_access_log_writes_are_logged_once(tmp_path: Path) -> None:
    """/dev/full as the access log: every write fails (ENOSPC). Requests are still decided
    and answered; the event log says so once, not once per line, and the count at the end."""
    folder = tmp_path / "config"
    folder.mkdir()
    with Upstream("full") as upstream:
        (folder / "knoxcall.yaml").write_text(
            "environments: [{name: production}]\n"
            "clients: [{name: office, ip_address: 127.0.0.8/29}]\n"
            f"routes: [{{name: api, target_base_url: '{upstream.url}', match: {{path_prefix: /v1}}}}]\n"
            "assignments: {api: {production: [office]}}\n"
        )
        proxy = MitmDump(folder, mode=f"reverse:{upstream.url}", access_log="/dev/full")
        with proxy:
            answers = [
                raw_http(source, "127.0.0.1", proxy.port, request(f"/v1/full-{i}".encode(), []))
                for i, source in enumerate([OFFICE, STRANGER, OFFICE, STRANGER, OFFICE])
            ]
            assert [int(a.split()[1]) for a in answers] == [200, 403, 200, 403, 200]
            assert len(upstream.seen) == 3
            proxy.wait_for_log("cannot write the access log")
        text = proxy.log_text()
    assert text.count("cannot write the access log") == 1, text
    assert "No space left on device" in text
    assert "Traceback" not in text
    assert "its last 5 lines were lost" in text  # said when the log is closed at shutdown
