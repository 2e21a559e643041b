"""End to end: IPv6 callers, raw TCP/UDP, refusing to start on a bad config, and scripts/run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e_util import assert_denial, h2_client, record_for
from tests.harness import ADDON, BIN, ROOT, MitmDump, Upstream, client_from, free_port, run_mitmdump_expecting_exit

IP_BODY = "IP not authorized"
# A connection closed without an answer: EOF (RemoteProtocolError) or reset (ReadError).
# Never a timeout: that would mean the caller was left waiting.
CUT_OFF = (httpx.RemoteProtocolError, httpx.ReadError)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- IPv6 ----------------------------------------------------------------------------------


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_caller(make_config, tmp_path: Path) -> None:
    with Upstream("main") as upstream:
        config = make_config(
            **{
                "k.yaml": {
                    "environments": [{"name": "production"}],
                    "clients": [
                        {"name": "v6-dev", "ip_address": "::1"},
                        {"name": "v4-only", "ip_address": "127.0.0.0/8"},
                    ],
                    "routes": [
                        {"name": "api", "target_base_url": upstream.url, "match": {"path_prefix": "/v1"}},
                        {"name": "v4", "target_base_url": upstream.url, "match": {"path_prefix": "/v4"}},
                    ],
                    "assignments": {"api": {"production": ["v6-dev"]}, "v4": {"production": ["v4-only"]}},
                }
            }
        )
        proxy = MitmDump(
            config, mode=f"reverse:{upstream.url}", listen_host="::1", access_log=tmp_path / "access.jsonl"
        )
        with proxy, client_from("::1") as client:
            r = client.get(proxy.url + "/v1/six")
            assert r.status_code == 200
            assert r.json()["path"] == "/v1/six"
            headers = {k.lower(): v for k, v in r.json()["headers"]}
            assert headers["x-forwarded-for"] == "::1"
            record = record_for(proxy, r.headers["x-knoxcall-request-id"])
            assert (record["client"], record["client_ip"], record["peer_ip"]) == ("v6-dev", "::1", "::1")
            denied = client.get(proxy.url + "/v4/six")
            assert_denial(
                denied, 403, {"error": IP_BODY, "status": 403, "ip": "::1", "route": "v4", "environment": "production"}
            )
            # ::1 is a known client, just not on this route
            proxy.wait_for_log("knoxcall: denied client_not_assigned ::1 route=v4 env=production client=v6-dev")


# -- raw TCP and UDP -----------------------------------------------------------------------


class TcpEcho:
    """A TCP server that answers every chunk with b"echo:" + chunk and counts its connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self.sock.close()


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.received.append(data)
            self.sock.sendto(b"echo:" + data, peer)

    def close(self) -> None:
        self.sock.close()


RAW_CONFIG = {
    "k.yaml": {
        "environments": [{"name": "production"}],
        "clients": [
            {"name": "office", "ip_address": "127.0.0.8/29"},
            {"name": "old", "ip_address": "127.0.0.40/29", "enabled": False},
        ],
        "routes": [{"name": "api"}],
        "assignments": {"api": {"production": ["office"]}},
    }
}


@pytest.fixture
def tcp_echo() -> Iterator[TcpEcho]:
    server = TcpEcho()
    yield server
    server.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


def test_raw_tcp_from_uncovered_peers_is_closed(make_config, tcp_echo: TcpEcho, tmp_path: Path) -> None:
    config = make_config(**RAW_CONFIG)
    proxy = MitmDump(config, mode=f"reverse:tcp://127.0.0.1:{tcp_echo.port}", access_log=tmp_path / "a.jsonl")
    with proxy:
        for source, answer in [("127.0.0.9", b"echo:hello"), ("127.0.0.99", b""), ("127.0.0.41", b"")]:
            with socket.socket() as s:
                s.settimeout(10)
                s.bind((source, 0))
                s.connect(("127.0.0.1", proxy.port))
                try:
                    s.sendall(b"hello")
                    got = s.recv(100)
                except ConnectionResetError:
                    got = b""
                assert got == answer, source
        assert tcp_echo.connections == 1  # the denied peers never reached the upstream
        proxy.wait_for_log("knoxcall: denied ip_not_whitelisted 127.0.0.99")
        proxy.wait_for_log("knoxcall: denied client_disabled 127.0.0.41")
        # (127.0.0.1 is the harness probing the listener; it is refused like any stranger)
        records = [r for r in proxy.access_records() if r["client_ip"] != "127.0.0.1"]
        reasons = [(r["client_ip"], r["decision"], r["reason"]) for r in records]
        assert reasons == [
            ("127.0.0.9", "allowed", "client"),
            ("127.0.0.99", "denied", "ip_not_whitelisted"),
            ("127.0.0.41", "denied", "client_disabled"),
        ]


class UdpMitmDump(MitmDump):
    """A UDP listener accepts no TCP connection: "listening at" in the log is the signal."""

    def _accepts(self) -> bool:
        return True


def test_raw_udp_from_uncovered_peers_is_dropped(make_config, udp_echo: UdpEcho) -> None:
    config = make_config(**RAW_CONFIG)
    with UdpMitmDump(config, mode=f"reverse:udp://127.0.0.1:{udp_echo.port}") as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.bind(("127.0.0.9", 0))
            s.sendto(b"allowed", ("127.0.0.1", proxy.port))
            assert s.recv(100) == b"echo:allowed"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.bind(("127.0.0.99", 0))
            s.sendto(b"denied", ("127.0.0.1", proxy.port))
            with pytest.raises(TimeoutError):
                s.recv(100)
        proxy.wait_for_log("knoxcall: denied ip_not_whitelisted 127.0.0.99")
        assert udp_echo.received == [b"allowed"]


# -- refusing to start -------------------------------------------------------------------------


def test_invalid_config_makes_mitmdump_exit_with_file_and_line(make_config) -> None:
    config = make_config(
        **{
            "settings.yaml": "environments:\n  - name: production\n",
            "clients.yaml": "clients:\n  - name: office\n    ip_address: 192.168.1.5/24\n",
        }
    )
    result = run_mitmdump_expecting_exit(config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{config}/clients.yaml:3: '192.168.1.5/24' has host bits set; did you mean 192.168.1.0/24" in output
    # once, each problem on its own line, no traceback, and out before mitmproxy listens
    assert output.count("has host bits set") == 1, output
    assert "knoxcall: invalid config, not starting (1 problem(s)):" in output
    assert "Traceback" not in output and "error in script" not in output
    assert "listening" not in output, output


def test_missing_config_folder_makes_mitmdump_exit(tmp_path: Path) -> None:
    result = run_mitmdump_expecting_exit(tmp_path / "no-such-folder")
    assert result.returncode != 0
    assert "config folder does not exist" in result.stdout + result.stderr


# -- scripts/run with the example config ------------------------------------------------------------


@pytest.mark.parametrize("tool", ["mitmdump", "mitmweb"])
def test_scripts_run_serves_the_example_config(tmp_path: Path, tool: str) -> None:
    """scripts/run (and scripts/run web) starts the proxy in forward mode with config/;
    the example routes decide."""
    port = free_port()
    log_path = tmp_path / "run.log"
    web = ["web", "--set", "web_host=127.0.0.1", "--set", f"web_port={free_port()}",
           "--set", "web_open_browser=false"] if tool == "mitmweb" else []  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "run"), *web, "--listen-host", "127.0.0.1", "-p", str(port),
             "--set", f"confdir={tmp_path / 'conf'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,  # scripts/run must not depend on the caller's directory
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "listening at" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            # A stranger calls the example's protected route through the proxy; the
            # request is denied before mitmproxy connects anywhere.
            with socket.socket() as s:
                s.settimeout(10)
                s.bind(("127.0.0.99", 0))
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET http://api.example.com/v1/users HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
                data = b""
                while b"}" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403"), data
            denied = httpx.Response(403, content=body).json()
            assert (denied["ip"], denied["route"], denied["environment"]) == (
                "127.0.0.99",
                "my-first-route",
                "production",
            )
            # An office address (127.0.0.0/28 in the example) is allowed on the same route.
            # The example target 127.0.0.1:9000 may have nothing listening: the decision is
            # what is checked here, from the event log.
            with socket.socket() as s:
                s.settimeout(15)
                s.bind(("127.0.0.5", 0))
                s.connect(("127.0.0.1", port))
                s.sendall(b"GET http://api.example.com/v1/users HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
                s.recv(4096)
            deadline = time.monotonic() + 10
            needle = "knoxcall: allowed client 127.0.0.5 route=my-first-route env=production client=office-network"
            while needle not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def test_raw_tcp_inside_a_connect_tunnel_is_refused(make_config, tcp_echo: TcpEcho, tmp_path: Path) -> None:
    """Open routes make a CONNECT from anyone acceptable (requests inside are decided one by
    one); raw TCP inside such a tunnel is refused, for clients too: it could carry any
    request to any route."""
    config = make_config(
        **{
            "k.yaml": {
                **RAW_CONFIG["k.yaml"],
                "routes": [
                    {"name": "api"},
                    {"name": "status", "requires_clients": False, "match": {"path_prefix": "/s"}},
                ],
            }
        }
    )
    proxy = MitmDump(config, access_log=tmp_path / "a.jsonl", extra=["--set", f"confdir={tmp_path / 'conf'}"])
    with proxy:
        for source, answer in [("127.0.0.9", b""), ("127.0.0.99", b"")]:
            with socket.socket() as s:
                s.settimeout(10)
                s.bind((source, 0))
                s.connect(("127.0.0.1", proxy.port))
                target = f"127.0.0.1:{tcp_echo.port}"
                s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)
                assert head.startswith(b"HTTP/1.1 200"), (source, head)  # the tunnel itself is allowed
                try:
                    s.sendall(b"\x00\x01raw")
                    got = s.recv(100)
                except (ConnectionResetError, BrokenPipeError):
                    got = b""
                assert got == answer, source
        assert tcp_echo.connections == 0
        proxy.wait_for_log("knoxcall: denied not_http 127.0.0.99")
        records = [(r["method"], r["client_ip"], r["decision"], r["reason"]) for r in proxy.access_records()]
        assert records == [
            ("CONNECT", "127.0.0.9", "allowed", "client"),
            (None, "127.0.0.9", "denied", "not_http"),
            ("CONNECT", "127.0.0.99", "allowed", "open_route"),
            (None, "127.0.0.99", "denied", "not_http"),
        ]


def test_invalid_config_makes_mitmweb_exit_too(make_config, tmp_path: Path) -> None:
    config = make_config(**{"k.yaml": "environments:\n  - name: production\nclients: [{name: a}]\n"})
    result = subprocess.run(
        [str(BIN / "mitmweb"), "-s", str(ADDON),
         "--set", f"knoxcall_config={config}", "--listen-host", "127.0.0.1", "-p", str(free_port()),
         "--set", "web_host=127.0.0.1", "--set", f"web_port={free_port()}", "--set", "web_open_browser=false",
         "--set", f"confdir={tmp_path / 'conf'}"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{config}/k.yaml:3: client 'a' is missing required key 'ip_address'" in output


def _streaming_proxy(make_config, upstream: Upstream, tmp_path: Path) -> MitmDump:
    """Reverse proxy with stream_large_bodies=1k; office (127.0.0.8/29) may call api."""
    config = make_config(
        **{
            "k.yaml": {
                "environments": [{"name": "production"}],
                "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
                "routes": [{"name": "api", "target_base_url": upstream.url}],
                "assignments": {"api": {"production": ["office"]}},
            }
        }
    )
    return MitmDump(
        config,
        mode=f"reverse:{upstream.url}",
        access_log=tmp_path / "a.jsonl",
        extra=["--set", "stream_large_bodies=1k", "--set", f"confdir={tmp_path / 'conf'}"],
    )


def test_stream_large_bodies_denials_do_not_crash(make_config, tmp_path: Path) -> None:
    """With stream_large_bodies, a denied large upload is cut off (mitmproxy cannot answer a
    request whose body it streams); nothing reaches the upstream, nothing crashes."""
    with Upstream("main") as upstream:
        proxy = _streaming_proxy(make_config, upstream, tmp_path)
        big = b"x" * 100_000
        with proxy:
            with client_from("127.0.0.9") as office:
                r = office.post(proxy.url + "/up", content=big, headers={"x-knoxcall-route": "api"})
                assert r.status_code == 200 and len(r.json()["body"]) == len(big)
            with client_from("127.0.0.99") as stranger:
                with pytest.raises(CUT_OFF):
                    stranger.post(proxy.url + "/big", content=big, headers={"x-knoxcall-route": "api"})
                with pytest.raises(CUT_OFF):
                    stranger.post(proxy.url + "/chunked", content=iter([big]), headers={"x-knoxcall-route": "api"})
                small = stranger.post(proxy.url + "/small", content=b"tiny", headers={"x-knoxcall-route": "api"})
                assert small.status_code == 403 and small.json()["ip"] == "127.0.0.99"
            with h2_client("127.0.0.99") as stranger:
                url = f"https://127.0.0.1:{proxy.port}/h2"
                with pytest.raises(httpx.RemoteProtocolError):  # the stream is reset
                    stranger.post(url, content=iter([big]), headers={"x-knoxcall-route": "api"})
                r = stranger.get(url, headers={"x-knoxcall-route": "api"})
                assert r.http_version == "HTTP/2" and r.status_code == 403
            proxy.wait_for_log("knoxcall: denied ip_not_whitelisted 127.0.0.99")
            assert "has crashed" not in proxy.log_text()
            assert [s["path"] for s in upstream.seen] == ["/up"]


def test_killed_uploads_never_leave_the_caller_waiting(make_config, tmp_path: Path) -> None:
    """Each refused chunked upload ends with a closed connection at once, never a hang.

    mitmproxy 12 sometimes skips closing a killed client's socket (its reader task is
    cancelled while waiting for the connection's lock, ~5% of such requests here); the
    addon closes it at client_disconnected. Many tries, because the race is timing-bound.
    """
    with Upstream("main") as upstream:
        proxy = _streaming_proxy(make_config, upstream, tmp_path)
        big = b"x" * 100_000
        with proxy:
            for attempt in range(60):
                with client_from("127.0.0.99", timeout=5) as stranger, pytest.raises(CUT_OFF):
                    stranger.post(proxy.url + f"/u{attempt}", content=iter([big]), headers={"x-knoxcall-route": "api"})
        assert upstream.seen == []


def test_unreachable_upstream_is_logged_with_null_status(make_config, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = make_config(
        **{
            "k.yaml": {
                "environments": [{"name": "production"}],
                "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
                "routes": [{"name": "api", "target_base_url": dead}],
                "assignments": {"api": {"production": ["office"]}},
            }
        }
    )
    proxy = MitmDump(config, mode=f"reverse:{dead}", access_log=tmp_path / "a.jsonl")
    with proxy, client_from("127.0.0.9") as client:
        r = client.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"})
        assert r.status_code == 502  # made by mitmproxy, after the request was allowed
        deadline = time.monotonic() + 10
        while not proxy.access_records():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (record,) = proxy.access_records()
        assert (record["decision"], record["reason"], record["status"]) == ("allowed", "client", None)


def test_run_web_shows_the_comment_column_and_names_a_taken_ui_port(tmp_path: Path) -> None:
    """scripts/run web: KnoxCall's reason and caller in the flow list without extra flags;
    a UI port already taken is said in one line instead of mitmweb's traceback."""
    port, web_port, token = free_port(), free_port(), "knoxcall-test-token"
    args = [str(ROOT / "scripts" / "run"), "web", "-p", str(port), "--set", f"web_port={web_port}",
            "--set", f"web_password={token}", "--set", "web_open_browser=false",
            "--set", f"confdir={tmp_path / 'conf'}"]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(args, cwd=ROOT, start_new_session=True, **quiet)
    try:
        deadline = time.monotonic() + 60
        options = None
        while options is None and time.monotonic() < deadline:
            assert process.poll() is None
            try:
                options = httpx.get(f"http://127.0.0.1:{web_port}/options.json", params={"token": token}).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert options is not None
        assert "comment" in options["web_columns"]["value"]
        taken = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1
        assert f"mitmweb's UI cannot listen on 127.0.0.1:{web_port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
