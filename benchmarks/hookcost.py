"""Instructions of each step of KnoxCall's request path, in process, counted by callgrind.

The end-to-end counts (instructions.py) say what a request costs mitmdump in all; this
says which of KnoxCall's own steps it goes to. Each step runs over the same prepared
requests (the bench's request in reverse mode: Host, x-knoxcall-route, allowed) inside
one ``functools.reduce`` call; callgrind collects only inside reduce
(``--toggle-collect``) and dumps after each (``--dump-after``), so each dump holds one
step's instructions. A reduce over a do-nothing function is taken off as the loop's own.
mitmproxy's dispatch of the hooks and what mitmproxy does later with more headers are
not in these figures (see the instructions section of scripts/bench for those).

    python -m benchmarks.hookcost [--rate-limit] [--requests 2000]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("requestheaders", "responseheaders", "response", "new_request_id", "read_request", "decide",
         "rate_limit", "forward", "settle", "log_decision")  # fmt: skip


def _prepare(rate_limit: bool, count: int) -> tuple[Any, list[tuple[str, Callable[[Any], Any], list[Any]]]]:
    """A KnoxCall with the bench's small config, and per step (name, function, inputs)."""
    from mitmproxy.http import Headers
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import tflow, tutils

    from benchmarks.configgen import bench_file, generate
    from knoxcall_addon import gate, proxy_addon
    from knoxcall_addon.decision import decide
    from knoxcall_addon.eventlog import SKIP_LEGACY
    from knoxcall_addon.policy import load_policy
    from knoxcall_addon.proxy_addon import KnoxCall

    # logging as in mitmdump --set termlog_verbosity=warn: the root logger at DEBUG, the
    # terminal's handler at WARNING, the legacy add_log events' (which KnoxCall filters) at 0,
    # the error check's at ERROR: an allowed request's INFO line is looked at, not made
    logging.getLogger().setLevel(logging.DEBUG)
    for level in (logging.WARNING, 0, logging.ERROR):
        handler = logging.NullHandler()
        handler.setLevel(level)
        if level == 0:
            handler.addFilter(SKIP_LEGACY)
        logging.getLogger().addHandler(handler)
    folder = Path(tempfile.mkdtemp(prefix="knoxcall-hookcost-"))
    generate(folder, clients=50, ranges=500, routes=50)
    (folder / "knoxcall.yaml").write_text(bench_file(allowed=True, rate_limit_store="memory" if rate_limit else None))
    addon = KnoxCall()
    addon.install(load_policy(folder))
    policy = addon.current.policy
    mode = ProxyMode.parse("reverse:http://127.0.0.1:9000")

    def flow() -> Any:
        headers = Headers([(b"Host", b"127.0.0.1:8080"), (b"x-knoxcall-route", b"bench-route")])
        request = tutils.treq(host="127.0.0.1", port=9000, method=b"GET", path=b"/bench", authority=b"",
                              headers=headers, content=b"")  # fmt: skip
        f = tflow.tflow(req=request)
        f.client_conn.peername = ("127.0.0.1", 50000)
        f.client_conn.proxy_mode = mode
        return f

    def response() -> Any:
        return tutils.tresp(headers=Headers([(b"Content-Type", b"text/plain"), (b"Content-Length", b"2")]),
                            content=b"ok")  # fmt: skip

    decided = [flow() for _ in range(count)]
    for f in decided:  # for the response steps: decided, answered by the upstream
        addon.requestheaders(f)
        assert f.metadata["knoxcall"]["decision"] == "allowed" and f.response is None
        f.response = response()
    answered = [flow() for _ in range(count)]
    for f in answered:
        addon.requestheaders(f)
        f.response = response()
        addon.responseheaders(f)
    read = [gate.read_request(f, policy, "GET", "/bench") for f in (flow() for _ in range(count))]
    facts = [r[0] for r in read]
    decisions = [decide(policy, fact) for fact in facts]
    checked = [addon.limiter.check(policy.rate_limits, d) for d in decisions]
    steps: list[tuple[str, Callable[[Any], Any], list[Any]]] = [
        ("nothing", lambda item: None, [None] * count),
        ("requestheaders", addon.requestheaders, [flow() for _ in range(count)]),
        ("responseheaders", addon.responseheaders, decided),
        ("response", addon.response, answered),
        ("new_request_id", lambda _: gate.new_request_id(), [None] * count),
        ("read_request", lambda f: gate.read_request(f, policy, "GET", "/bench"), [flow() for _ in range(count)]),
        ("decide", lambda fact: decide(policy, fact), facts),
        ("rate_limit", lambda d: addon.limiter.check(policy.rate_limits, d), decisions),
        ("forward", lambda pair: gate.forward(pair[0], pair[1], policy),
         [(flow(), d) for d in decisions]),
        ("settle", lambda item: addon._settle(item[0], item[1][0], item[1][1], "0" * 32, "GET", "127.0.0.1", "/bench",
                                              None), [(flow(), c) for c in checked]),
        ("log_decision", lambda d: proxy_addon.log_decision(d, "0" * 32), decisions),
    ]
    return addon, steps


def _run_steps(rate_limit: bool, count: int) -> None:
    """Under callgrind: one reduce per step, in STEPS order after "nothing"."""
    _, steps = _prepare(rate_limit, count)
    for _, function, items in steps:
        functools.reduce(lambda _, item, f=function: f(item), items, None)


def _callgrind(work: Path, rate_limit: bool, count: int, perf: bool) -> list[Path]:
    """Run the steps under callgrind; the dump of each step, "nothing" first; and the perf map's path."""
    out = work / "cg.out"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    python = [sys.executable, *(["-X", "perf"] if perf else [])]
    process = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce",
                              "--dump-after=functools_reduce", f"--callgrind-out-file={out}",
                              *(["--smc-check=all-non-file"] if perf else []), *python, "-m", "benchmarks.hookcost",
                              "--inside", *(["--rate-limit"] if rate_limit else []), "--requests", str(count)],
                             cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             timeout=900)  # fmt: skip
    dumps = sorted(work.glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    names = ["nothing", *STEPS]
    if len(dumps) < len(names):
        raise RuntimeError(f"expected {len(names)} dumps, got {len(dumps)}")
    pid = re.search(rb"==(\d+)==", process.stderr)
    return [*dumps[-len(names) :], Path(f"/tmp/perf-{pid.group(1).decode() if pid else 0}.map")]


def measure(rate_limit: bool, count: int) -> dict[str, float]:
    """Instructions per request of each step (the loop's own taken off)."""
    with tempfile.TemporaryDirectory(prefix="knoxcall-hookcost-") as work:
        *dumps, _ = _callgrind(Path(work), rate_limit, count, perf=False)
        totals = [int(re.search(rb"^totals:\s+(\d+)", p.read_bytes(), re.MULTILINE).group(1)) for p in dumps]
    loop = totals[0] / count
    return {name: round(total / count - loop) for name, total in zip(STEPS, totals[1:], strict=True)}


def profile(rate_limit: bool, count: int, step: str) -> list[tuple[str, float]]:
    """The Python functions run in ``step``: (function, inclusive instructions per request), costliest first."""
    from benchmarks.pyprofile import perf_map, python_costs

    with tempfile.TemporaryDirectory(prefix="knoxcall-hookcost-") as work:
        *dumps, map_path = _callgrind(Path(work), rate_limit, count, perf=True)
        try:
            costs = python_costs(dumps[1 + STEPS.index(step)], perf_map(map_path))
        finally:
            map_path.unlink(missing_ok=True)
    return sorted(((name, total / count) for name, total in costs.items()), key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hookcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-limit", action="store_true", help="the loopback client limited (never tripping)")
    parser.add_argument("--profile", metavar="STEP", help="instead: that step's Python functions (python -X perf)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = max(10, min(args.requests, 20_000))
    if args.inside:
        _run_steps(args.rate_limit, count)
        return 0
    if args.profile:
        if args.profile not in STEPS:
            parser.error(f"--profile: one of {STEPS}")
        for name, value in profile(args.rate_limit, count, args.profile):
            print(f"{value:>10,.0f}  {name}")
        return 0
    for name, value in measure(args.rate_limit, count).items():
        print(f"{name:<16} {value:>8,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
