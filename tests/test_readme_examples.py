"""The README's try-it examples, run exactly as written, so that they cannot drift.

Each ```sh block after a ``<!-- readme-example: NAME -->`` marker is run line by line from
the repository root: a line ending in `&` starts in the background (and is stopped at the
end), a `curl` line must answer the status its comment names (`# 403 {"error": ...}` also
checks that text in the body), `kill %N` lines are what the test does itself. The
examples use the ports they name (8080, 9000) and the shipped config/, all on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.harness import ROOT, accepts, port_free

README = ROOT / "README.md"
MARKER = re.compile(r"<!-- readme-example: (\S+) -->\n```sh\n(.*?)```", re.S)
PORTS = (8080, 9000)


def examples() -> dict[str, list[str]]:
    return {name: body.strip().splitlines() for name, body in MARKER.findall(README.read_text())}


def test_the_readme_has_its_examples() -> None:
    assert set(examples()) == {"reverse", "forward"}


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"background command exited with {process.returncode}"
        if accepts("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port} within {timeout}s")


@contextlib.contextmanager
def background(command: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        ["bash", "-c", command], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _port_of(command: str) -> int:
    """The port a background command listens on: its -p/--port, else 8080 (mitmproxy's)."""
    words = shlex.split(command)
    for flag in ("-p", "--port"):
        if flag in words:
            return int(words[words.index(flag) + 1])
    return 8080


@pytest.mark.parametrize("name", ["reverse", "forward"])
def test_readme_example_works_as_written(name: str) -> None:
    busy = [port for port in PORTS if not port_free(port)]
    if busy:
        pytest.skip(f"the README's example ports {busy} are in use on this machine (stop what uses them)")
    lines = examples()[name]
    with contextlib.ExitStack() as stack:
        checked = 0
        for line in lines:
            command, _, comment = line.partition("  #")
            command = command.strip()
            if command.endswith("&"):
                command = command[:-1].strip()
                process = stack.enter_context(background(command))
                _wait_for_port(_port_of(command), process)
            elif command.startswith("curl "):
                expected = comment.strip()
                status = int(re.match(r"\d+", expected).group())  # type: ignore[union-attr]
                result = subprocess.run(
                    ["bash", "-c", command + " -s -w '\\n%{http_code}'"],
                    cwd=ROOT, capture_output=True, text=True, timeout=30,
                )  # fmt: skip
                body, _, code = result.stdout.rpartition("\n")
                assert int(code) == status, (line, result.stdout, result.stderr)
                quoted = re.search(r"(\{.*?)(, \.\.\.\})?$", expected)
                if quoted and quoted.group(2):
                    assert quoted.group(1) in body, (line, body)
                checked += 1
            else:
                assert command.startswith("kill %"), f"a README example line the test cannot run: {line}"
        assert checked >= 2
