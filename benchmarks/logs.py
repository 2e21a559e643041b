"""How long `knoxcall logs` takes on a large access log, and how much memory it needs.

    .venv/bin/python -m benchmarks.logs [--lines 1000000] [--keep DIR]

Writes a log like a busy proxy's (mostly allowed requests, refusals from a few hundred
addresses that come back, and a flood of addresses seen once, which the bounded tallies
must absorb), plain and gzipped, then runs ``knoxcall logs --format json`` on each in a
child process and reports the wall time and the child's peak resident memory (ru_maxrss).
No network; nothing but files in a temporary folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knoxcall_addon.accesslog import ACCESS_LOG_FIELDS, utc_timestamp

CONFIG = """\
environments: [{name: production}, {name: staging}]
clients:
  - {name: partner-acme, ip_address: 198.51.100.0/28}
  - {name: office, ip_address: 203.0.113.0/24}
  - {name: laptops, ip_address: 192.0.2.0/24}
routes: [{name: payments}, {name: reports}]
assignments:
  payments: {production: [partner-acme, office], staging: [laptops]}
  reports: {production: [office]}
"""


def generate(path: Path, lines: int, seed: int = 13) -> None:
    """``lines`` access-log lines, one hour of them, as the proxy writes them."""
    rng = random.Random(seed)
    start = time.time() - 3600
    regulars = [f"198.51.100.{rng.randrange(16, 250)}" for _ in range(300)]
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            ts = utc_timestamp(start + 3600 * i / lines)
            roll = rng.random()
            route, env = ("payments", "production") if roll < 0.8 else ("reports", "production")
            if roll < 0.85:
                record = {"decision": "allowed", "reason": "client", "status": 200, "client": "office",
                          "client_ip": f"203.0.113.{rng.randrange(256)}"}  # fmt: skip
            elif roll < 0.95:
                record = {"decision": "denied", "reason": "ip_not_whitelisted", "status": 403,
                          "client_ip": rng.choice(regulars)}  # fmt: skip
            elif roll < 0.97:
                record = {"decision": "denied", "reason": "client_not_assigned", "status": 403, "client": "laptops",
                          "client_ip": f"192.0.2.{rng.randrange(256)}"}  # fmt: skip
            else:  # a scan: every address once
                record = {"decision": "denied", "reason": "ip_not_whitelisted", "status": 403,
                          "client_ip": f"2001:db8::{i:x}"}  # fmt: skip
            record.update(ts=ts, request_id=f"{i:032x}", method="GET", host="api.example.com", path="/v1/pay",
                          route=route, environment=env, peer_ip=record["client_ip"], user_agent="bench/1",
                          latency_ms=1.234, config_version="0123456789ab")  # fmt: skip
            f.write(json.dumps({name: record.get(name) for name in ACCESS_LOG_FIELDS}, separators=(",", ":")) + "\n")


def measure(log: Path, config: Path, *extra: str) -> dict[str, float]:
    """Run ``knoxcall logs`` on ``log`` in a fresh child; its wall time and peak RSS (its own, by wait4)."""
    command = [sys.executable, "-m", "knoxcall_addon.cli", "logs", str(log), "--config", str(config), *extra]
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{command} exited with {child.returncode}")
        output.seek(0)
        summary = json.loads(output.read())
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "lines": summary["lines"],
        "requests_counted": summary["requests"]["total"],
        "counts_may_be_low_by": summary["counts_may_be_low_by"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the files here and keep them")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="knoxcall-logs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = work / "config"
        config.mkdir(exist_ok=True)
        (config / "k.yaml").write_text(CONFIG, encoding="utf-8")
        log = work / "access.jsonl"
        generate(log, args.lines)
        packed = work / "packed" / "access.jsonl.1.gz"
        packed.parent.mkdir(exist_ok=True)
        with log.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        results = {
            "lines": args.lines,
            "log_mib": round(log.stat().st_size / 2**20, 1),
            "gzip_mib": round(packed.stat().st_size / 2**20, 1),
            "plain": measure(log, config, "--format", "json", "--no-rotated"),
            "gzip": measure(packed, config, "--format", "json", "--no-rotated"),
            "since_10m": measure(log, config, "--format", "json", "--no-rotated", "--since", "10m"),
        }
        print(json.dumps(results, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
