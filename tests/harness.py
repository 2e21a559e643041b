"""Real processes for end-to-end tests, the demo and the benchmark: all on loopback.

- `Upstream`: a threaded HTTP/1.1 server that echoes what it received as JSON.
- `MitmDump`: a real ``mitmdump -s knoxcall_addon/addon.py`` process.
- `client_from`: an httpx client whose sockets are bound to a chosen 127.0.0.0/8 (or ::1) source.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from knoxcall_addon.echoserver import EchoHandler

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "knoxcall_addon" / "addon.py"
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now (nothing listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def accepts(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on ``host``:``port`` now (0.5 s at most)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Send ``sig`` to a process still running and wait ``timeout`` s; SIGKILL it if it is still there."""
    if process and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class _EchoHandler(EchoHandler):
    """`knoxcall echo`'s handler, quiet: the upstream of every end-to-end test."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Upstream:
    """An echo server on loopback, in a thread; use as a context manager."""

    def __init__(self, name: str = "upstream", host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = ThreadingHTTPServer((host, port), _EchoHandler)
        self.server.daemon_threads = True
        self.server.name = name  # type: ignore[attr-defined]
        self.server.seen = []  # type: ignore[attr-defined]
        self.host = host
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"upstream-{name}", daemon=True)

    @property
    def seen(self) -> list[dict[str, Any]]:
        """Every request this upstream received, in order: proof that a denial never reached it."""
        return self.server.seen  # type: ignore[attr-defined]

    def __enter__(self) -> Upstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class MitmDump:
    """A real mitmdump process with the KnoxCall addon; use as a context manager.

    ``log_path`` collects everything mitmdump prints (the event log). Startup waits
    for the "listening at" line; a process that exits instead raises with its output.
    """

    def __init__(
        self,
        config: str | Path,
        *,
        mode: str | None = None,
        listen_host: str = "127.0.0.1",
        port: int | None = None,
        access_log: str | Path | None = None,
        extra: Sequence[str] = (),
        log_path: str | Path | None = None,
        tool: str = "mitmdump",
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = Path(config)
        self.listen_host = listen_host
        self.port = port or free_port(listen_host)
        self.access_log = Path(access_log) if access_log else None
        self.log_path = Path(log_path) if log_path else self.config.parent / f"mitmdump-{self.port}.log"
        args = [
            str(BIN / tool),
            "-s",
            str(ADDON),
            "--set",
            f"knoxcall_config={self.config}",
            "--listen-host",
            listen_host,
            "-p",
            str(self.port),
        ]
        # Defaults for re-targeting per route (see README); an explicit extra wins.
        for default in ("connection_strategy=lazy", "keep_host_header=true"):
            if not any(a.startswith(default.split("=")[0] + "=") for a in extra):
                args += ["--set", default]
        if mode:
            args += ["--mode", mode]
        if self.access_log:
            args += ["--set", f"knoxcall_access_log={self.access_log}"]
        self.args = [*args, *extra]
        self.env = env or {}  # added to the process's environment (e.g. secrets read from variables)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30) -> MitmDump:
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.process.returncode}:\n{self.log_text()}")
            if "listening at" in self.log_text() and self._accepts():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start in {timeout}s:\n{self.log_text()}")

    def _accepts(self) -> bool:
        return accepts(self.listen_host, self.port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop with ``sig`` (SIGTERM drains first, see drain.py; SIGINT stops at once) and wait."""
        stop_process(self.process, sig, timeout)
        if hasattr(self, "_log"):
            self._log.close()
        return self.process.returncode if self.process else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10, after: int = 0) -> str:
        """Wait until ``needle`` appears in the event log (past offset ``after``); return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text[after:]:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.log_text()[after:]}")

    def access_records(self) -> list[dict[str, Any]]:
        if not self.access_log or not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def __enter__(self) -> MitmDump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client_from(source: str, *, http2: bool = False, timeout: float = 10, **kwargs: Any) -> httpx.Client:
    """An httpx client whose connections leave from ``source`` (e.g. 127.0.0.9 or ::1)."""
    transport = httpx.HTTPTransport(local_address=source, http2=http2, retries=0)
    return httpx.Client(transport=transport, timeout=timeout, **kwargs)


def run_mitmdump_expecting_exit(config: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Start mitmdump with a config that must make it refuse to start; return the result."""
    port = free_port()
    return subprocess.run(
        [str(BIN / "mitmdump"), "-s", str(ADDON), "--set", f"knoxcall_config={config}",
         "--listen-host", "127.0.0.1", "-p", str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip
