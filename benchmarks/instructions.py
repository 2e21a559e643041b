"""Instructions per request through mitmdump, counted by valgrind's callgrind.

Timings on a shared 2-core machine vary by ±10% between runs; instruction counts repeat to
well under 1%, so a change of a few percent shows. Each variant is a mitmdump in reverse
mode run under ``valgrind --tool=callgrind --instr-atstart=no``: nothing is counted while
it starts and loads its config, nor during a warm-up; then, round by round and variant by
variant in turn, instrumentation is switched on (``callgrind_control -i on``) for a fixed
number of requests on keep-alive connections, switched off, and the counts dumped
(``-d``) and read. Only mitmdump's instructions are counted, never this process's (the
client) or the upstream's. Loopback only; every wait is bounded.

Used by ``scripts/bench --sections instructions`` (see bench.py), and on its own for A/B
comparisons of scripts: ``python -m benchmarks.instructions --help``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUTE_HEADER = "x-knoxcall-route"
# what the e2e section's mitmdumps get too (bench.MITM_FLAGS)
MITM_FLAGS = ["--set", "connection_strategy=lazy", "--set", "keep_host_header=true",
              "--set", "termlog_verbosity=warn", "--set", "flow_detail=0"]  # fmt: skip
START_TIMEOUT = 600.0  # seconds for a mitmdump under valgrind to listen and answer (a 100k config loads slowly)
REQUEST_TIMEOUT = 120.0  # seconds for one answer under valgrind
CONTROL_TIMEOUT = 60.0  # seconds for callgrind_control to get an answer
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


def available() -> str | None:
    """None when valgrind and callgrind_control are installed; else what is missing."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install valgrind)"
    return None


@dataclass
class Variant:
    """One mitmdump to count: its name and the arguments after the common ones."""

    name: str
    args: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers
    expect: int = 200  # the status every request must get
    python_args: list[str] = field(default_factory=list)  # e.g. -X perf (see profile.py)


class Connection:
    """A blocking keep-alive HTTP/1.1 client connection: send one GET, read the whole answer."""

    def __init__(self, port: int, headers: dict[str, str], path: str = "/bench") -> None:
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
        self.buffer = b""

    def get(self) -> int:
        """The status of one request (the body is read and dropped)."""
        self.send()
        return self.receive()

    def send(self) -> None:
        self.sock.sendall(self.request)

    def receive(self) -> int:
        """The status of the next answer (its body is read and dropped)."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        length = int(match.group(1)) if match else 0
        while len(self.buffer) < length:
            self._more()
        self.buffer = self.buffer[length:]
        return int(head[9:12])

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by mitmdump")
        self.buffer += data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Counted:
    """A mitmdump running under callgrind, with instrumentation off until `count` turns it on."""

    def __init__(
        self, variant: Variant, upstream_port: int, work: Path, connections: int, keep_dumps: bool = False,
        hash_seed: int = 0,
    ) -> None:
        self.variant = variant
        self.port = free_port()
        self.out_dir = work / f"callgrind-{re.sub(r'[^A-Za-z0-9_.-]', '-', variant.name)}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "mitmdump.log"
        self.connections_wanted = connections
        self.connections: list[Connection] = []
        args = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={self.out_dir / 'cg.out'}", *self.valgrind_args(variant),
                sys.executable, *variant.python_args, str(BIN / "mitmdump"),
                "--mode", f"reverse:http://127.0.0.1:{upstream_port}", "--listen-host", "127.0.0.1",
                "-p", str(self.port), *MITM_FLAGS, *variant.args]  # fmt: skip
        self.log = self.log_path.open("wb")
        # the same string hashes in every variant: dict probe sequences, and so the counts,
        # depend on them (with random seeds two runs of the same script differ by ~0.2%)
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.started = False
        self.keep_dumps = keep_dumps
        self.rounds_counted = 0

    @staticmethod
    def valgrind_args(variant: Variant) -> list[str]:
        # -X perf writes the trampolines of Python functions at run time: have them re-read
        return ["--smc-check=all-non-file"] if "perf" in variant.python_args else []

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, deadline: float) -> None:
        """Until mitmdump answers a request as expected (the addon may still be loading its config)."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.variant.name}: mitmdump exited with {self.process.returncode}:\n"
                                   + self.log_path.read_text("utf-8", "replace")[-2000:])  # fmt: skip
            try:
                connection = Connection(self.port, self.variant.headers, "/ready")
                try:
                    status = connection.get()
                finally:
                    connection.close()
                if status == self.variant.expect:
                    self.started = True
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.variant.name}: mitmdump did not answer {self.variant.expect} in time")

    def requests(self, n: int) -> int:
        """Send ``n`` requests, one in flight on each keep-alive connection at a time, in lockstep
        (all connections send, then all answers are read); how many got the expected status.

        With several in flight, mitmdump handles several events per turn of its event loop,
        as under load; one connection (one request at a time) charges each request a whole
        turn of the loop.
        """
        if not self.connections:
            self.connections = [Connection(self.port, self.variant.headers) for _ in range(self.connections_wanted)]
        ok = 0
        sent = 0
        while sent < n:
            batch = self.connections[: n - sent]
            for connection in batch:
                connection.send()
            for connection in batch:
                ok += connection.receive() == self.variant.expect
            sent += len(batch)
        return ok

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, timeout=CONTROL_TIMEOUT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def _dumps(self) -> set[Path]:
        return {p for p in self.out_dir.iterdir() if p.name.startswith("cg.out")}

    def count(self, n: int) -> tuple[int, int, float]:
        """(instructions mitmdump executed while answering ``n`` requests, how many were answered
        as expected, the seconds that took)."""
        before = self._dumps()
        self._control("-i", "on")
        start = time.monotonic()
        try:
            ok = self.requests(n)
        finally:
            seconds = time.monotonic() - start
            self._control("-i", "off")
        return self._collect(before), ok, seconds

    def idle(self, seconds: float) -> int:
        """Instructions executed in ``seconds`` without any request: what runs on timers and threads."""
        before = self._dumps()
        self._control("-i", "on")
        time.sleep(seconds)
        self._control("-i", "off")
        return self._collect(before)

    def _collect(self, before: set[Path]) -> int:
        """Dump the counts since the last dump and read their total."""
        self._control("-d")
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while time.monotonic() < deadline:
            new = self._dumps() - before
            totals = _TOTALS.findall(b"".join(p.read_bytes() for p in new)) if new else []
            if totals:
                self.rounds_counted += 1
                for p in new:
                    if self.keep_dumps:  # for callgrind_annotate (pyprofile.py)
                        p.rename(p.with_name(f"round-{self.rounds_counted}.{p.name}"))
                    else:
                        p.unlink()
                return int(totals[0])
            time.sleep(0.1)
        raise RuntimeError(f"{self.variant.name}: no callgrind dump appeared")

    def stop(self) -> None:
        for connection in self.connections:
            connection.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@contextlib.contextmanager
def _upstream() -> Iterator[int]:
    """The fixed-response upstream of loadgen.py, in its own (uncounted) process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "upstream", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the upstream did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def count_variants(
    variants: Sequence[Variant],
    work: Path,
    *,
    requests: int = 200,
    rounds: int = 3,
    warmup: int = 60,
    connections: int = 8,
    idle_seconds: float = 0.0,
    keep_dumps: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Instructions per request of each variant: ``rounds`` rounds of ``requests`` each, in turn.

    All variants start together (loading under valgrind is slow) and are counted one after
    the other, the order rotated each round. The figure of a variant is the median of its
    rounds; ``spread`` is (max - min) / median over the rounds.

    With ``idle_seconds``, each variant is also counted that long without requests, and what
    its timers and threads run per second (mitmproxy's script watcher: once a second;
    KnoxCall's config watcher: a check every 2 s) is taken off each round for the time the
    round took. Under valgrind a request takes ~50 times as long as without, so work done
    per second would otherwise be charged to requests ~50 times over.
    """
    problem = available()
    if problem:
        return {"available": False, "note": problem}
    result: dict[str, Any] = {"requests_per_round": requests, "rounds": rounds, "warmup": warmup,
                              "connections": connections, "idle_seconds": idle_seconds,
                              "mitmdump_flags": " ".join(MITM_FLAGS)}  # fmt: skip
    counted_rounds: dict[str, list[tuple[int, float]]] = {v.name: [] for v in variants}
    failures: dict[str, int] = {v.name: 0 for v in variants}
    idle: dict[str, float] = {}
    with _upstream() as up, contextlib.ExitStack() as stack:
        running: list[Counted] = []
        for variant in variants:
            counted = Counted(variant, up, work, connections, keep_dumps)
            stack.callback(counted.stop)
            running.append(counted)
        deadline = time.monotonic() + START_TIMEOUT
        for counted in running:
            counted.wait_ready(deadline)
        # first-use costs (imports, caches, connections, the first full garbage collections) out
        # of the way, all variants at once: under valgrind this is the slow part
        with concurrent.futures.ThreadPoolExecutor(len(running)) as pool:
            list(pool.map(lambda counted: counted.requests(warmup), running))
        for i in range(rounds):
            order = running[i % len(running) :] + running[: i % len(running)]
            for counted in order:
                instructions, ok, seconds = counted.count(requests)
                counted_rounds[counted.variant.name].append((instructions, seconds))
                failures[counted.variant.name] += requests - ok
                if progress:
                    progress(f"round {i + 1}/{rounds} {counted.variant.name}: {instructions / requests:,.0f}")
        if idle_seconds > 0:
            for counted in running:
                idle[counted.variant.name] = counted.idle(idle_seconds) / idle_seconds
    variants_out: dict[str, Any] = {}
    for variant in variants:
        rate = idle.get(variant.name, 0.0)
        raw = [instructions / requests for instructions, _ in counted_rounds[variant.name]]
        values = [(instructions - rate * seconds) / requests for instructions, seconds in counted_rounds[variant.name]]
        median = statistics.median(values)
        variants_out[variant.name] = {
            "instructions_per_request": round(median),
            "per_round": [round(v) for v in values],
            "spread": round((max(values) - min(values)) / median, 4),
            "unexpected_status": failures[variant.name],
        }
        if variant.name in idle:
            variants_out[variant.name]["counted_per_request"] = round(statistics.median(raw))
            variants_out[variant.name]["idle_instructions_per_s"] = round(rate)
            seconds = statistics.median(s for _, s in counted_rounds[variant.name])
            variants_out[variant.name]["seconds_per_round"] = round(seconds, 1)
    result["variants"] = variants_out
    return result


def ratios(result: dict[str, Any], base: str = "bare") -> dict[str, Any]:
    """Per variant: instructions over ``base``'s, and base / variant (a throughput ratio if CPU bound)."""
    variants = result.get("variants", {})
    if base not in variants:
        return {}
    reference = variants[base]["instructions_per_request"]
    out = {}
    for name, v in variants.items():
        if name == base:
            continue
        value = v["instructions_per_request"]
        out[name] = {"extra_per_request": value - reference, "ratio": round(reference / value, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description="A/B: instructions per request of mitmdump with each of the given scripts, and bare.",
    )
    parser.add_argument("variants", nargs="*", metavar="NAME=ARGS",
                        help="a variant: a name, '=', then mitmdump arguments (split on spaces), "
                             "e.g. addon='-s knoxcall_addon/addon.py --set knoxcall_config=config'")  # fmt: skip
    parser.add_argument("--header", action="append", default=[], help="an extra request header, 'Name: value'")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections, each one request in flight")
    parser.add_argument("--idle", type=float, default=0.0, help="also count N seconds without requests")
    parser.add_argument("--no-bare", action="store_true", help="do not add the bare mitmdump variant")
    parser.add_argument("--keep", type=Path, help="keep the callgrind output and logs here")
    args = parser.parse_args(argv)
    headers = dict((k.strip(), v.strip()) for k, v in (h.split(":", 1) for h in args.header))
    variants = [] if args.no_bare else [Variant("bare", [], headers)]
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        variants.append(Variant(name, rest.split(), headers))
    work = args.keep or Path(tempfile.mkdtemp(prefix="knoxcall-instructions-"))
    try:
        result = count_variants(
            variants, work, requests=min(args.requests, 5000), rounds=min(args.rounds, 20),
            connections=min(args.connections, 64), idle_seconds=min(args.idle, 60), keep_dumps=args.keep is not None,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["ratios"] = ratios(result)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    # SIGTERM as an exception: the mitmdumps and servers started are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.chdir(ROOT)
    sys.exit(main())
