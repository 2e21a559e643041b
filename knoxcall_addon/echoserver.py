"""A stand-in API for trying KnoxCall on one machine: `knoxcall echo`.

Answers every request with what it received (method, path, headers, peer) as JSON, so
that a caller sees exactly what the proxy forwarded. Loopback by default; stdlib only.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "knoxcall-echo"

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = {
            "upstream": getattr(self.server, "name", "knoxcall echo"),
            "method": self.command,
            "path": self.path,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
            "peer": self.client_address[0],
        }
        record = getattr(self.server, "seen", None)  # the tests' upstream keeps every request
        if record is not None:
            record.append(seen)
        payload = json.dumps(seen, indent=2).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        print(f"knoxcall echo: {self.client_address[0]} {format % args}", flush=True)


def serve(host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    print(f"knoxcall echo: answering on http://{host}:{port} with what each request carried", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
