"""A real redis-server for tests: started on a free loopback port, stopped after (never the system service).

Tests that need it skip, saying how to install it, where the binary is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import free_port, stop_process

INSTALL_HINT = "redis-server is not installed: apt-get install redis-server"


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(INSTALL_HINT)
    return binary


class RedisServer:
    """redis-server on 127.0.0.1:``port``, no persistence; ``kill`` and ``start`` again on the same port."""

    def __init__(self, folder: Path, password: str | None = None, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.folder = folder
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.folder / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout}s")

    def command(self, *words: str, timeout: float = 2) -> bytes:
        """One command in RESP, its raw reply (enough for PING, DBSIZE, KEYS in tests)."""
        parts = [f"*{len(words)}\r\n".encode()]
        if self.password:
            parts.insert(0, f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n".encode())
        for word in words:
            parts.append(f"${len(word.encode())}\r\n{word}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"".join(parts))
            time.sleep(0.05)
            data = b""
            s.settimeout(0.2)
            for _ in range(100):
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
        if self.password and data.startswith(b"+OK\r\n"):
            data = data[5:]  # AUTH's answer
        return data

    def ping(self) -> bool:
        try:
            return b"PONG" in self.command("PING", timeout=0.5)
        except OSError:
            return False

    def stored_keys(self, pattern: str = "*") -> list[str]:
        reply = self.command("KEYS", pattern).decode()
        return [line for line in reply.split("\r\n") if line and line[0] not in "*$+:-"]

    def kill(self) -> None:
        """Gone at once, as a crash: SIGKILL."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
