"""Helpers shared by the end-to-end tests (not a test module)."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.harness import MitmDump, free_port

REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def record_for(proxy: MitmDump, request_id: str, timeout: float = 10) -> dict[str, Any]:
    """The access log line of one request (written when it completes, so poll briefly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in proxy.access_records():
            if record["request_id"] == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}:\n{proxy.access_records()}")


def assert_denial(response: httpx.Response, status: int, body: dict[str, Any]) -> str:
    """A denial as the contract says: status, JSON body, content type, request id; returns the id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    request_id = response.headers["x-knoxcall-request-id"]
    assert REQUEST_ID.fullmatch(request_id)
    assert response.json() == {**body, "request_id": request_id}
    return request_id


def upstream_headers(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the echo upstream received, lower-cased names to values."""
    result: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        result.setdefault(name.lower(), []).append(value)
    return result


class H2OnlyContext(ssl.SSLContext):
    """httpcore offers ALPN ["http/1.1", "h2"] and mitmproxy honours the client's order, so
    HTTP/1.1 would win; this context offers h2 alone. Certificates are not checked: the
    proxy's certificate comes from a throwaway CA in the test's confdir."""

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        super().set_alpn_protocols(["h2"])


def h2_client(source: str, timeout: float = 10) -> httpx.Client:
    context = H2OnlyContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    transport = httpx.HTTPTransport(local_address=source, http2=True, verify=context, retries=0)
    return httpx.Client(transport=transport, timeout=timeout)


def raw_http(source: str, host: str, port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes from ``source`` and read until the peer closes or a full response is in."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if match and len(rest) >= int(match.group(1)):
                    break
        return data


def h2_concurrent(
    source: str, port: int, paths: list[str], headers: dict[str, str] | None = None, timeout: float = 10
) -> list[tuple[int, dict[str, str], bytes]]:
    """Open ONE TLS+h2 connection, send every request before reading any answer (concurrent
    streams), and return (status, headers, body) per path, in order.

    Uses the h2 library directly: httpx's sync client races on shared h2 connections
    from several threads.
    """
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.socket()
    raw.settimeout(timeout)
    raw.bind((source, 0))
    raw.connect(("127.0.0.1", port))
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        streams: dict[int, dict[str, Any]] = {}
        for path in paths:
            stream_id = conn.get_next_available_stream_id()
            request_headers = [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", path),
                *(headers or {}).items(),
            ]
            conn.send_headers(stream_id, request_headers, end_stream=True)
            streams[stream_id] = {"headers": {}, "body": b"", "done": False}
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        while not all(s["done"] for s in streams.values()):
            assert time.monotonic() < deadline, "h2 streams did not complete"
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    streams[event.stream_id]["headers"] = {
                        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                        for k, v in event.headers
                    }
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id]["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    streams[event.stream_id]["done"] = True
            sock.sendall(conn.data_to_send())
        return [(int(s["headers"][":status"]), s["headers"], s["body"]) for s in streams.values()]


class Recorder:
    """An upstream that records each request and answers ``{"ok": true}`` (it never echoes).

    A path containing ``hold`` is answered only when ``release`` is set (at most 20 s), so that
    a test can look at the flow while the upstream has it.
    """

    def __init__(self) -> None:
        recorder = self
        self.seen: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.seen.append({"path": self.path, "headers": list(self.headers.items()), "body": body})
                if "hold" in self.path:
                    recorder.arrived.set()
                    recorder.release.wait(20)
                payload = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def headers(self, index: int = -1) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for name, value in self.seen[index]["headers"]:
            result.setdefault(name.lower(), []).append(value)
        return result

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Web:
    """A real mitmweb with the addon in reverse mode, and its HTTP API (as its UI and command bar use it)."""

    def __init__(self, folder: Path, upstream_url: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.web_port = free_port()
        password = secrets.token_hex(8)
        self.proxy = MitmDump(
            folder, mode=f"reverse:{upstream_url}", tool="mitmweb", log_path=tmp_path / "mitmweb.log", env=env,
            extra=["--set", f"web_port={self.web_port}", "--set", "web_host=127.0.0.1",
                   "--set", "web_open_browser=false", "--set", f"web_password={password}",
                   "--set", f"confdir={tmp_path / 'conf'}"],
        )  # fmt: skip
        token = secrets.token_hex(8)  # tornado's XSRF check: the cookie and the header must match
        self.api = httpx.Client(
            base_url=f"http://127.0.0.1:{self.web_port}",
            headers={"Authorization": f"Bearer {password}", "X-XSRFToken": token},
            cookies={"_mitmproxy_xsrf": token},
            timeout=10,
        )

    def run(self, command: str) -> str:
        response = self.api.post(f"/commands/{command}", json={"arguments": []})
        assert response.status_code == 200, response.text
        return response.json()["value"]

    def flows(self) -> tuple[str, list[dict[str, Any]]]:
        """``/flows.json``: its text and its flows."""
        response = self.api.get("/flows.json")
        assert response.status_code == 200
        return response.text, response.json()

    def flow_for(self, path: str, timeout: float = 10) -> dict[str, Any]:
        """The latest flow of ``path`` in mitmweb's view (waiting for it to appear)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [f for f in self.flows()[1] if f.get("request", {}).get("path") == path]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no flow for {path} in mitmweb")

    def __enter__(self) -> Web:
        self.proxy.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.close()
        self.proxy.stop()
