"""scripts/bench: how fast KnoxCall decides, and what it costs mitmdump, at large config sizes.

Sections (``--sections``, default all):

- ``micro``: ``decision.decide`` on prebuilt ``RequestFacts`` (allowed and denied mixed),
  per-decision time at 100, 10,000 and 100,000 ranges, against a naive linear scan.
- ``e2e``: requests/s and latency through bare mitmdump and mitmdump with the addon and
  the large config, alternated round by round in one run; plus the load generator alone.
- ``load``: load+compile time of the large config, and the resident memory of mitmdump
  with it against bare mitmdump.
- ``reload``: time from a config file write to the new policy deciding a request.
- ``ratelimit``: what rate limiting costs: mitmdump with the large config and a client limit
  that never refuses, counted in memory and in Redis (a redis-server on a free loopback port),
  against the same config without limits, alternated round by round in one run.
- ``scaleout``: requests/s through a real nginx to one and to two workers, alternated, with
  each process's CPU per request; and a config edit's time to reach both workers (scaleout.py).
- ``secrets``: what header injection and signature verification cost: POSTs with 1 KB bodies
  through mitmdump with the large config whose route injects a secret header, or requires
  signed requests (the load generator sends a valid signature), or both, against the same
  config and requests without them, alternated round by round in one run.
- ``instructions``: instructions per request counted by callgrind (repeatable to ~0.1%, where
  timings vary by ±10%): bare mitmdump, a do-nothing script shaped like KnoxCall's, the addon
  with the large config, and the addon with the wave-2 features configured but not tripping
  (``FEATURES``; each alone too when there are several). Needs valgrind.

Everything runs on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import instructions
from benchmarks.configgen import (
    BENCH_ROUTE,
    BIG_FILE_CLIENT,
    ENVIRONMENTS,
    Generated,
    bench_file,
    big_file_client,
    generate,
)
from benchmarks.scaleout import bench_scaleout, print_scaleout
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.policy import Policy, forget_previous_load, load_policy
from tests.harness import accepts, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "knoxcall_addon" / "addon.py"
NOOP_ADDON = ROOT / "benchmarks" / "noop_addon.py"
BIN = Path(sys.executable).parent
SECTIONS = ("micro", "e2e", "load", "reload", "ratelimit", "scaleout", "secrets", "instructions")
# the same for bare and addon runs: reverse mode, lazy upstream connections, quiet terminal
MITM_FLAGS = ["--set", "connection_strategy=lazy", "--set", "keep_host_header=true",
              "--set", "termlog_verbosity=warn", "--set", "flow_detail=0"]  # fmt: skip


@dataclass
class Sizes:
    clients: int = 10_000
    ranges: int = 100_000
    routes: int = 1_000


# -- helpers ---------------------------------------------------------------------------


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        if accepts("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def wait_answer(port: int, process: subprocess.Popen, timeout: float, ready: int = 200) -> None:
    """Until a request through mitmdump is answered ``ready`` (bare: the upstream; addon: allowed;
    401 on a route that requires signed requests: decided, so loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mitmdump exited with {process.returncode}")
        try:
            if status_of(port) == ready:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"mitmdump on {port} did not answer {ready} within {timeout}s")


def status_of(port: int, path: str = "/ready") -> int:
    """The status of one request through the proxy, on a fresh connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-knoxcall-route: {BENCH_ROUTE}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        head = s.recv(64)
    return int(head[9:12])


@contextmanager
def upstream_process() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen", "upstream", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop_process(proc)


@contextmanager
def mitmdump(
    upstream_port: int,
    config: Path | None,
    log: Path,
    extra: list[str] = (),
    script: Path = ADDON,
    env: dict[str, str] | None = None,
    ready: int = 200,
) -> Iterator[tuple[int, int]]:
    """(port, pid) of a mitmdump in reverse mode; with ``script`` when ``config`` is given."""
    port = free_port()
    flags = [*MITM_FLAGS, *extra]
    if "termlog_verbosity=info" in extra:  # mitmdump refuses an option set twice
        i = flags.index("termlog_verbosity=warn")
        del flags[i - 1 : i + 1]
    args = [str(BIN / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
            "--listen-host", "127.0.0.1", "-p", str(port), *flags]  # fmt: skip
    if config is not None:
        args += ["-s", str(script)]
        if script == ADDON:
            args += ["--set", f"knoxcall_config={config}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            wait_port(port, proc, timeout=120)
            wait_answer(port, proc, timeout=120, ready=ready)  # the addon may still be loading its config
            yield port, proc.pid
        finally:
            stop_process(proc)


def run_load(
    port: int, connections: int, duration: float, warmup: float = 0.5, headers: str = "", body_bytes: int = 0
) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", "load", "--port", str(port), "--connections", str(connections),
         "--duration", str(duration), "--warmup", str(warmup),
         "--headers", "|".join(filter(None, (f"x-knoxcall-route: {BENCH_ROUTE}", headers))),
         "--body-bytes", str(body_bytes)],
        cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def measured_run(
    port: int, pid: int, connections: int, duration: float, headers: str = "", body_bytes: int = 0
) -> dict[str, Any]:
    """run_load, plus the CPU time mitmdump spent per request.

    CPU time per request is far less sensitive to other load on the machine than
    requests/s: it counts what mitmdump spent, not what it got.
    """
    cpu = cpu_seconds(pid)
    run = run_load(port, connections, duration, headers=headers, body_bytes=body_bytes)
    run["cpu_us_per_request"] = (cpu_seconds(pid) - cpu) * 1e6 / max(1, run["total_requests"])
    return run


def load_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one variant as run_load measured them: medians, and requests/s per round."""
    return {
        "rps_per_round": [round(r["rps"]) for r in runs],
        "rps": round(statistics.median(r["rps"] for r in runs)),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "errors": sum(r["error_count"] for r in runs),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one variant (measured_run): load_summary, and mitmdump's median CPU per request."""
    return {
        **load_summary(runs),
        "cpu_us_per_request": round(statistics.median(r["cpu_us_per_request"] for r in runs), 1),
    }


# -- 1. decision microbenchmark ----------------------------------------------------------


def _address_in(network: str, rng: random.Random) -> str:
    net = ipaddress.ip_network(network)
    return str(net.network_address + rng.randrange(net.num_addresses))


def _random_address(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    return str(ipaddress.IPv6Address(0x2000 << 112 | rng.getrandbits(125)))


def make_facts(gen: Generated, count: int, seed: int = 7) -> list[RequestFacts]:
    """Half aimed at a client assigned to the route (mostly allowed), half anywhere (mostly denied)."""
    rng = random.Random(seed)
    networks = dict(gen.clients)
    facts = []
    for i in range(count):
        route = rng.choice(gen.routes)
        env = rng.choice(ENVIRONMENTS)
        if i % 2 == 0:
            client = rng.choice(gen.assignments[(route, env)])
            peer = _address_in(rng.choice(networks[client]), rng)
        elif i % 6 == 1:
            # inside some client, usually not assigned here: client_not_assigned
            peer = _address_in(rng.choice(rng.choice(gen.clients)[1]), rng)
        else:
            peer = _random_address(rng)
        n = int(route.rsplit("-", 1)[1])  # fits the route's match (see configgen)
        facts.append(
            RequestFacts(
                peer=peer,
                method="GET",
                host=f"api{n % 50}.example.com",
                path=f"/r{n}/{i}",
                route=route,
                environment=None if env == "production" else env,
            )
        )
    return facts


def naive_decider(policy: Policy) -> Callable[[RequestFacts], bool]:
    """The reference: parse the peer with ipaddress and scan every network of every client."""
    clients = [(c.name, c.enabled, list(c.networks)) for c in policy.config.clients.values()]
    assigned = {(a.route, a.environment): set(a.clients) for a in policy.config.assignments}
    default = policy.settings.default_environment

    def allowed(facts: RequestFacts) -> bool:
        ip = ipaddress.ip_address(facts.peer)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        here = assigned.get((facts.route, facts.environment or default), set())
        for name, enabled, networks in clients:
            for network in networks:
                if ip in network and enabled and name in here:
                    return True
        return False

    return allowed


def time_each(fn: Callable[[Any], Any], inputs: list[Any]) -> list[int]:
    perf = time.perf_counter_ns
    result = []
    append = result.append
    for item in inputs:
        start = perf()
        fn(item)
        append(perf() - start)
    return result


def bench_micro(sizes: Sizes, large: Generated, work: Path, quick: bool) -> dict[str, Any]:
    count = 4_000 if quick else 20_000
    results = []
    steps = [100, 10_000, sizes.ranges] if sizes.ranges > 10_000 else sorted({100, sizes.ranges})
    for ranges in steps:
        if ranges == sizes.ranges:
            gen = large
        else:
            clients = max(1, round(sizes.clients * ranges / sizes.ranges))
            gen = generate(work / f"micro-{ranges}", clients=clients, ranges=ranges, routes=sizes.routes)
        policy = load_policy(gen.folder)
        facts = make_facts(gen, count)
        decide_one = lambda f, p=policy: decide(p, f)  # noqa: E731
        time_each(decide_one, facts[: count // 4])  # warm up
        # several passes; the median pass's percentiles, so that one burst of other
        # load on the machine does not decide the figure
        passes = []
        for _ in range(1 if quick else 3):
            gc.collect()
            passes.append(sorted(time_each(decide_one, facts)))
        p50s = sorted(percentile(t, 0.5) for t in passes)
        p99s = sorted(percentile(t, 0.99) for t in passes)
        start = time.perf_counter_ns()
        for f in facts:
            decide(policy, f)
        loop_ns = time.perf_counter_ns() - start
        decisions = [decide(policy, f) for f in facts]
        allowed_share = sum(d.allowed for d in decisions) / len(decisions)
        # naive: on fewer inputs at large sizes so that it finishes (~0.5 s budget per size)
        naive = naive_decider(policy)
        sample = facts[: max(20, min(count, 2_000_000 // max(1, len(policy.clients_by_ip))))]
        gc.collect()
        naive_timed = time_each(naive, sample)
        mismatches = sum(naive(f) != d.allowed for f, d in zip(sample, decisions, strict=False))
        naive_timed.sort()
        results.append(
            {
                "ranges": len(policy.clients_by_ip),
                "clients": len(policy.config.clients),
                "decisions": len(facts),
                "allowed_share": round(allowed_share, 3),
                "decisions_per_s": round(len(facts) / (loop_ns / 1e9)),
                "passes": len(passes),
                "p50_us": p50s[len(p50s) // 2] / 1000,
                "p99_us": p99s[len(p99s) // 2] / 1000,
                "p99_us_per_pass": [round(p / 1000, 1) for p in p99s],
                "naive_samples": len(sample),
                "naive_p50_us": percentile(naive_timed, 0.5) / 1000,
                "naive_p99_us": percentile(naive_timed, 0.99) / 1000,
                "speedup_p50": round(percentile(naive_timed, 0.5) / max(1, p50s[len(p50s) // 2]), 1),
                "naive_mismatches": mismatches,
            }
        )
    flat = results[-1]["p99_us"] / results[0]["p99_us"] if results[0]["p99_us"] else None
    return {
        "gc": "enabled (as in mitmdump), gc.collect() before each timed pass; timer: perf_counter_ns per decision; "
        "median of the passes",
        "sizes": results,
        "p99_growth_smallest_to_largest": round(flat, 2) if flat else None,
    }


# -- 2. end to end -----------------------------------------------------------------------


def bench_e2e(large: Generated, work: Path, quick: bool, connections: int, rss: dict[str, Any]) -> dict[str, Any]:
    rounds = 3 if quick else 6  # a multiple of 3: each variant goes first equally often
    duration = 2.0 if quick else 3.0
    result: dict[str, Any] = {"connections": connections, "rounds": rounds, "seconds_per_round": duration,
                              "mitmdump_flags": " ".join(MITM_FLAGS)}  # fmt: skip
    with upstream_process() as up:
        result["generator_direct"] = run_load(up, connections, duration)
        with (
            mitmdump(up, None, work / "bare.log") as (bare_port, bare_pid),
            mitmdump(up, large.folder, work / "noop.log", script=NOOP_ADDON) as (noop_port, noop_pid),
            mitmdump(up, large.folder, work / "addon.log") as (addon_port, addon_pid),
        ):
            rss["bare_start_kib"] = vm_rss_kib(bare_pid)
            rss["addon_start_kib"] = vm_rss_kib(addon_pid)
            variants = {"bare": (bare_port, bare_pid), "noop": (noop_port, noop_pid), "addon": (addon_port, addon_pid)}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for port, _ in variants.values():
                run_load(port, connections, 1.0)  # an unmeasured round each: first-use costs out of the way
            for i in range(rounds):
                names = list(variants)
                order = names[i % 3 :] + names[: i % 3]  # rotate, so that no variant always goes first
                for name in order:
                    runs[name].append(measured_run(*variants[name], connections, duration))
            rss["bare_after_load_kib"] = vm_rss_kib(bare_pid)
            rss["addon_after_load_kib"] = vm_rss_kib(addon_pid)
    for name, rs in runs.items():
        result[name] = summary(rs)
    # each round's pair is measured back to back: the median of the per-round ratios
    # cancels most of the drift caused by other load on the machine
    ratios = [a["rps"] / b["rps"] for a, b in zip(runs["addon"], runs["bare"], strict=True) if b["rps"]]
    result["throughput_ratio_per_round"] = [round(r, 3) for r in ratios]
    result["throughput_ratio"] = round(statistics.median(ratios), 3) if ratios else None
    noop_ratios = [a["rps"] / b["rps"] for a, b in zip(runs["noop"], runs["bare"], strict=True) if b["rps"]]
    result["noop_throughput_ratio"] = round(statistics.median(noop_ratios), 3) if noop_ratios else None
    bare_cpu, addon_cpu = result["bare"]["cpu_us_per_request"], result["addon"]["cpu_us_per_request"]
    result["cpu_ratio"] = round(bare_cpu / addon_cpu, 3) if addon_cpu else None
    result["addon_cpu_us_per_request"] = round(addon_cpu - bare_cpu, 1)
    result["noop_script_cpu_us_per_request"] = round(result["noop"]["cpu_us_per_request"] - bare_cpu, 1)
    return result


# -- 3. load + compile, memory -----------------------------------------------------------


def bench_load(large: Generated, work: Path, quick: bool, rss: dict[str, Any]) -> dict[str, Any]:
    times = []
    for _ in range(1 if quick else 3):
        forget_previous_load()  # as in a fresh process
        gc.collect()
        start = time.perf_counter()
        load_policy(large.folder)
        times.append(time.perf_counter() - start)
    # a reload after an edit of one small file: unchanged files and clients are reused
    (large.folder / "knoxcall.yaml").write_text(bench_file(allowed=False))
    start = time.perf_counter()
    load_policy(large.folder)
    reload_s = time.perf_counter() - start
    (large.folder / "knoxcall.yaml").write_text(bench_file(allowed=True))
    result: dict[str, Any] = {
        "load_compile_s": [round(t, 3) for t in times],
        "best_s": round(min(times), 3),
        "reload_small_edit_s": round(reload_s, 3),
    }
    if "addon_start_kib" not in rss:
        with (
            upstream_process() as up,
            mitmdump(up, None, work / "bare-rss.log") as (_, bare_pid),
            mitmdump(up, large.folder, work / "addon-rss.log") as (_, addon_pid),
        ):
            rss["bare_start_kib"] = vm_rss_kib(bare_pid)
            rss["addon_start_kib"] = vm_rss_kib(addon_pid)
    result["rss"] = rss
    bare, addon = rss.get("bare_start_kib"), rss.get("addon_start_kib")
    if bare and addon:
        result["rss_bare_mb"] = round(bare / 1024, 1)
        result["rss_addon_mb"] = round(addon / 1024, 1)
        result["rss_addon_minus_bare_mb"] = round((addon - bare) / 1024, 1)
    return result


# -- 4. reload latency -------------------------------------------------------------------


def reload_available() -> bool:
    source = (ROOT / "knoxcall_addon" / "proxy_addon.py").read_text()
    return "knoxcall_reload" in source


def bench_reload(large: Generated, work: Path, quick: bool) -> dict[str, Any]:
    """Two kinds of edit: of the small bench file, and of the 3.5 MB clients file."""
    if not reload_available():
        return {"available": False, "note": "not available (hot reload not on this main)"}
    folder = work / "reload-config"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(large.folder, folder)
    clients_text = (folder / "clients.yaml").read_text()
    (folder / "clients.yaml").write_text(clients_text + big_file_client(allowed=False))
    latencies: dict[str, list[float]] = {"small": [], "big": []}
    timeouts = 0

    def write_small(allowed: bool) -> None:
        (folder / "knoxcall.yaml").write_text(bench_file(allowed=allowed))

    def write_big(allowed: bool) -> None:
        (folder / "clients.yaml").write_text(clients_text + big_file_client(allowed=allowed))

    with upstream_process() as up:
        write_small(True)
        # info: the addon's "reloaded in N ms" lines say how much of the latency was loading
        flags = ["--set", "knoxcall_reload=true", "--set", "termlog_verbosity=info"]
        with mitmdump(up, folder, work / "reload.log", flags) as (port, pid):
            if status_of(port, "/reload") != 200:
                return {"available": True, "error": "expected 200 before the first reload"}
            edits = [("small", write_small, i % 2 == 1) for i in range(2 if quick else 4)]
            # the big file: first assign the route to its client (small file), then flip the client
            edits.append(("", lambda _: (folder / "knoxcall.yaml").write_text(
                bench_file(allowed=True, client=BIG_FILE_CLIENT)), False))  # fmt: skip
            edits += [("big", write_big, i % 2 == 0) for i in range(2 if quick else 4)]
            for kind, write, allowed in edits:
                expected = 200 if allowed else 403
                time.sleep(1.0)  # let the watcher settle (its debounce, the last reload)
                start = time.perf_counter()
                write(allowed)
                deadline = start + 20
                while time.perf_counter() < deadline:
                    if status_of(port, "/reload") == expected:
                        if kind:
                            latencies[kind].append(time.perf_counter() - start)
                        break
                    time.sleep(0.02)  # gently: polling competes with the reload for the GIL
                else:
                    timeouts += 1
            rss_after = vm_rss_kib(pid)  # two policies coexist during each reload
    log = (work / "reload.log").read_text("utf-8", "replace")
    load_ms = [int(m) for m in re.findall(r"reloaded in (\d+) ms", log)]
    small, big = latencies["small"], latencies["big"]
    return {
        "available": True,
        "ranges": large.ranges,
        "load_ms_in_reloader": load_ms,
        "latency_s": [round(t, 3) for t in small],
        "median_s": round(statistics.median(small), 3) if small else None,
        "max_s": round(max(small), 3) if small else None,
        "big_file_latency_s": [round(t, 3) for t in big],
        "big_file_median_s": round(statistics.median(big), 3) if big else None,
        "big_file_max_s": round(max(big), 3) if big else None,
        "timeouts": timeouts,
        "rss_after_reloads_mb": round(rss_after / 1024, 1) if rss_after else None,
    }


# -- 5. rate limiting ----------------------------------------------------------------------


@contextmanager
def redis_process(work: Path) -> Iterator[str | None]:
    """A redis-server on a free loopback port (no persistence); None when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


def limited_copy(large: Generated, folder: Path, store: str) -> Path:
    """The large config with the loopback client limited (never tripping), counted in ``store``."""
    return variant_copy(large, folder, bench_file(allowed=True, rate_limit_store=store))


def variant_copy(large: Generated, folder: Path, bench_text: str) -> Path:
    """The large config with another small bench file. The big files are symlinks: the same
    config, only knoxcall.yaml differs."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in large.folder.iterdir():
        if path.name != "knoxcall.yaml" and path.suffix == ".yaml":
            (folder / path.name).symlink_to(path.resolve())
    (folder / "knoxcall.yaml").write_text(bench_text)
    return folder


def bench_ratelimit(large: Generated, work: Path, quick: bool, connections: int) -> dict[str, Any]:
    rounds = 3 if quick else 6
    duration = 2.0 if quick else 3.0
    result: dict[str, Any] = {"connections": connections, "rounds": rounds, "seconds_per_round": duration}
    with upstream_process() as up, redis_process(work) as redis_url, contextlib.ExitStack() as stack:
        folders = {"no limits": large.folder, "memory": limited_copy(large, work / "rl-memory", "memory")}
        if redis_url:
            folders["redis"] = limited_copy(large, work / "rl-redis", redis_url)
        else:
            result["redis_note"] = "redis-server is not installed (apt-get install redis-server): not measured"
        variants = {
            name: stack.enter_context(mitmdump(up, folder, work / f"rl-{name.replace(' ', '-')}.log"))
            for name, folder in folders.items()
        }
        for port, _ in variants.values():
            run_load(port, connections, 1.0)  # first-use costs out of the way
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for i in range(rounds):
            names = list(variants)
            for name in names[i % len(names) :] + names[: i % len(names)]:
                runs[name].append(measured_run(*variants[name], connections, duration))
        logs = {name: (work / f"rl-{name.replace(' ', '-')}.log").read_text("utf-8", "replace") for name in variants}
    for name, rs in runs.items():
        result[name] = summary(rs)
    base = runs["no limits"]
    for name in variants:
        if name == "no limits":
            continue
        ratios = [a["rps"] / b["rps"] for a, b in zip(runs[name], base, strict=True) if b["rps"]]
        result[name]["throughput_ratio_per_round"] = [round(r, 3) for r in ratios]
        result[name]["throughput_ratio"] = round(statistics.median(ratios), 3) if ratios else None
        result[name]["extra_cpu_us_per_request"] = round(
            result[name]["cpu_us_per_request"] - result["no limits"]["cpu_us_per_request"], 1
        )
        # the limit never trips: a 429 or a fallback to local buckets would make the figures meaningless
        result[name]["store_warnings"] = logs[name].count("unreachable")
    return result


BODY_BYTES = 1024
SECRET_VARIANTS = ("plain", "inject", "signed", "both")


def secrets_bench_file(variant: str) -> str:
    """The bench file, its route injecting a secret header (``inject``), requiring signed
    requests (``signed``), both, or neither (``plain``); the secrets come from variables."""
    text = bench_file(allowed=True)
    secrets = "secrets:\n  - name: bench_token\n    env: KC_BENCH_TOKEN\n  - name: bench_sign\n    env: KC_BENCH_SIGN\n"
    route = f"  - name: {BENCH_ROUTE}\n"
    extra = ""
    if variant in ("inject", "both"):
        extra += '    inject_headers: {Authorization: "Bearer {{secret:bench_token}}"}\n'
    if variant in ("signed", "both"):
        extra += "    signature: {required: true, tolerance_sec: 3600}\n"
    address = '    ip_address: [127.0.0.0/8, "::1"]\n'
    signing = '    signing_secrets: ["{{secret:bench_sign}}"]\n'
    text = text.replace(route, route + extra).replace(address, address + signing)
    return secrets + text


def bench_secrets(large: Generated, work: Path, quick: bool, connections: int) -> dict[str, Any]:
    """Header injection and signature verification against the same config without them (1 KB POSTs)."""
    from knoxcall_addon.signing import sign

    rounds = 3 if quick else 6
    duration = 2.0 if quick else 3.0
    env = {"KC_BENCH_TOKEN": os.urandom(16).hex(), "KC_BENCH_SIGN": os.urandom(16).hex()}
    timestamp = str(int(time.time()))
    signature = sign(env["KC_BENCH_SIGN"], timestamp, "POST", "/bench", b"a" * BODY_BYTES)
    # every variant gets the same request, signature headers included (only "signed" checks them)
    headers = f"X-Timestamp: {timestamp}|X-Signature: {signature}|Authorization: Bearer the-callers-own"
    result: dict[str, Any] = {"connections": connections, "rounds": rounds, "seconds_per_round": duration,
                              "body_bytes": BODY_BYTES}  # fmt: skip
    with upstream_process() as up, contextlib.ExitStack() as stack:
        variants = {}
        for name in SECRET_VARIANTS:
            folder = variant_copy(large, work / f"sec-{name}", secrets_bench_file(name))
            ready = 401 if name in ("signed", "both") else 200  # an unsigned GET is refused there
            variants[name] = stack.enter_context(mitmdump(up, folder, work / f"sec-{name}.log", env=env, ready=ready))
        for port, _ in variants.values():
            first = run_load(port, connections, 1.0, headers=headers, body_bytes=BODY_BYTES)  # first-use costs
            if first["error_count"]:
                raise RuntimeError(f"the secrets bench's requests are refused: {first['errors']}")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for i in range(rounds):
            names = list(variants)
            for name in names[i % len(names) :] + names[: i % len(names)]:
                runs[name].append(measured_run(*variants[name], connections, duration, headers, BODY_BYTES))
    for name, rs in runs.items():
        result[name] = summary(rs)
    base = runs["plain"]
    for name in SECRET_VARIANTS[1:]:
        ratios = [a["rps"] / b["rps"] for a, b in zip(runs[name], base, strict=True) if b["rps"]]
        result[name]["throughput_ratio_per_round"] = [round(r, 3) for r in ratios]
        result[name]["throughput_ratio"] = round(statistics.median(ratios), 3) if ratios else None
        result[name]["extra_cpu_us_per_request"] = round(
            result[name]["cpu_us_per_request"] - result["plain"]["cpu_us_per_request"], 1
        )


# -- 6. instructions per request -------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """A per-request feature, configured so that it works on every request but never trips.

    ``missing`` says why it cannot be measured here (None: it can); ``configure`` edits the
    copy of the large config that the ``features`` variant uses and returns extra mitmdump
    arguments. A feature still on another branch has a ``missing`` that says so: when it
    lands, fill in its ``configure`` (and the check) and the bench measures it.
    """

    name: str
    missing: Callable[[], str | None]
    configure: Callable[[Path], list[str]]


def _addon_source() -> str:
    return "".join(p.read_text() for p in (ROOT / "knoxcall_addon").glob("*.py"))


def _rate_limit(folder: Path) -> list[str]:
    # the loopback client limited to 10^9 requests per second: counted on every request, never refused
    (folder / "knoxcall.yaml").write_text(bench_file(allowed=True, rate_limit_store="memory"))
    return []


def _metrics(folder: Path) -> list[str]:
    return ["--set", f"knoxcall_metrics=127.0.0.1:{free_port()}"]  # served on loopback, never scraped


def _headers(folder: Path) -> list[str]:
    # BENCH_ROUTE injects a header from a file secret (added to what the other features wrote)
    (folder / "bench_token").write_text(os.urandom(16).hex() + "\n")
    config = folder / "knoxcall.yaml"
    route = f"  - name: {BENCH_ROUTE}\n"
    text = config.read_text().replace(
        route, route + '    inject_headers: {Authorization: "Bearer {{secret:bench_token}}"}\n', 1
    )
    config.write_text("secrets:\n  - name: bench_token\n    file: bench_token\n" + text)
    return []


FEATURES = (
    Feature("rate_limit", lambda: None, _rate_limit),
    Feature(
        "metrics",
        lambda: None if "knoxcall_metrics" in _addon_source() else "not on this branch (knoxcall_metrics)",
        _metrics,
    ),
    Feature(
        "header_injection",
        lambda: None if "inject_headers" in _addon_source() else "not on this branch (inject_headers)",
        _headers,
    ),
)


def features_copy(large: Generated, folder: Path, features: list[Feature]) -> tuple[Path, list[str]]:
    """The large config (big files as symlinks) with ``features`` configured; and their mitmdump arguments."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in large.folder.iterdir():
        if path.suffix == ".yaml":
            (folder / path.name).symlink_to(path.resolve())
    (folder / "knoxcall.yaml").unlink()
    (folder / "knoxcall.yaml").write_text(bench_file(allowed=True))
    args: list[str] = []
    for feature in features:
        args += feature.configure(folder)
    return folder, args


def bench_instructions(large: Generated, work: Path, quick: bool, wanted: list[str] | None = None) -> dict[str, Any]:
    """Instructions per request of bare mitmdump, the do-nothing script, the addon, and the addon with features."""
    missing = instructions.available()
    if missing:
        return {"available": False, "note": missing}
    features = [f for f in FEATURES if wanted is None or f.name in wanted]
    result: dict[str, Any] = {"available": True, "features": {}}
    usable = []
    for feature in features:
        why = feature.missing()
        result["features"][feature.name] = why or "configured"
        if why is None:
            usable.append(feature)
    headers = {"x-knoxcall-route": BENCH_ROUTE}
    # Hot reload off: the config watcher's check every 2 s is work per second, not per request,
    # and under valgrind a request takes ~50 times as long, so in a round it stood for 10-40k
    # instructions per request, ±8k from round to round. The request path is the same.
    addon = ["-s", str(ADDON), "--set", "knoxcall_reload=false"]
    variants = [
        instructions.Variant("bare", [], headers),
        instructions.Variant("noop", ["-s", str(NOOP_ADDON)], headers),
        instructions.Variant("addon", [*addon, "--set", f"knoxcall_config={large.folder}"], headers),
    ]
    groups = [("features", usable)] if usable else []
    if len(usable) > 1:
        groups += [(f"addon+{f.name}", [f]) for f in usable]
    for name, group in groups:
        folder, args = features_copy(large, work / f"instructions-{name}", group)
        variants.append(instructions.Variant(name, [*addon, "--set", f"knoxcall_config={folder}", *args], headers))
    counted = instructions.count_variants(
        variants, work, requests=64 if quick else 240, rounds=3 if quick else 5, warmup=96 if quick else 320,
        idle_seconds=6 if quick else 20,
    )
    result.update(counted)
    result["ratios"] = instructions.ratios(counted)
    return result


# -- report ------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    print(f"KnoxCall bench  {report['date']}  cores={report['cores']}  load average at start={report['loadavg']}")
    print(f"config: {report['config']}")
    if "micro" in report:
        m = report["micro"]
        print("\n1. decision microbenchmark (decision.decide, prebuilt RequestFacts; GC " + m["gc"] + ")")
        print(f"{'ranges':>8} {'dec/s':>9} {'p50 µs':>7} {'p99 µs':>7} {'allowed':>7} | "
              f"{'naive p50 µs':>12} {'naive n':>7} {'speedup':>8} {'mismatch':>8}")  # fmt: skip
        for s in m["sizes"]:
            print(f"{s['ranges']:>8} {s['decisions_per_s']:>9} {s['p50_us']:>7.1f} {s['p99_us']:>7.1f} "
                  f"{s['allowed_share']:>7.2f} | {s['naive_p50_us']:>12.1f} {s['naive_samples']:>7} "
                  f"{s['speedup_p50']:>7}x {s['naive_mismatches']:>8}")  # fmt: skip
        print(f"p99 growth from the smallest to the largest config: {m['p99_growth_smallest_to_largest']}x")
    if "e2e" in report:
        e = report["e2e"]
        print(f"\n2. end to end ({e['connections']} keep-alive connections, {e['rounds']} alternated rounds of "
              f"{e['seconds_per_round']} s; mitmdump {e['mitmdump_flags']})")  # fmt: skip
        g = e["generator_direct"]
        print(
            f"{'generator -> upstream':<24} {g['rps']:>9.0f} req/s  p50 {g['p50_ms']:.3f} ms  p99 {g['p99_ms']:.3f} ms"
        )
        for name in ("bare", "noop", "addon"):
            r = e[name]
            print(
                f"{'mitmdump ' + name:<24} {r['rps']:>9} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
                f"  CPU {r['cpu_us_per_request']} µs/req  rounds {r['rps_per_round']}  errors {r['errors']}"
            )
        print(f"addon/bare throughput: {e['throughput_ratio']} (per round {e['throughput_ratio_per_round']})")
        print(
            f"bare/addon CPU per request: {e['cpu_ratio']} (the addon costs {e['addon_cpu_us_per_request']} µs "
            f"of mitmdump CPU per request; a script with the same hooks doing nothing costs "
            f"{e['noop_script_cpu_us_per_request']} µs, noop/bare throughput {e['noop_throughput_ratio']})"
        )
    if "load" in report:
        ld = report["load"]
        print(f"\n3. load+compile of the large config: best {ld['best_s']} s (runs {ld['load_compile_s']}); "
              f"again after an edit of one small file: {ld['reload_small_edit_s']} s")  # fmt: skip
        if "rss_addon_mb" in ld:
            print(f"RSS: bare mitmdump {ld['rss_bare_mb']} MB, with addon and config {ld['rss_addon_mb']} MB "
                  f"(+{ld['rss_addon_minus_bare_mb']} MB)")  # fmt: skip
    if "reload" in report:
        r = report["reload"]
        print("\n4. reload latency (file write -> new decision)")
        if not r.get("available"):
            print(r["note"])
        elif "error" in r:
            print(r["error"])
        else:
            print(f"edit of the small bench file: median {r['median_s']} s, max {r['max_s']} s over {r['latency_s']}")
            print(f"edit of the 3.5 MB clients file: median {r['big_file_median_s']} s, max {r['big_file_max_s']} s "
                  f"over {r['big_file_latency_s']} (timeouts {r['timeouts']})")  # fmt: skip
            print(f"of which loading and compiling, as the reloader logged it: {r['load_ms_in_reloader']} ms")
            reloads = len(r["load_ms_in_reloader"])
            print(f"RSS of that mitmdump after these {reloads} reloads: {r['rss_after_reloads_mb']} MB")
    if "ratelimit" in report:
        r = report["ratelimit"]
        rounds = f"{r['rounds']} alternated rounds of {r['seconds_per_round']} s"
        print(f"\n5. rate limiting: a client limit that never trips, against the same config without limits "
              f"({r['connections']} connections, {rounds})")  # fmt: skip
        for name in ("no limits", "memory", "redis"):
            if name not in r:
                continue
            v = r[name]
            line = (f"{name:<10} {v['rps']:>7} req/s  p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  "
                    f"CPU {v['cpu_us_per_request']} µs/req  rounds {v['rps_per_round']}")  # fmt: skip
            line += f"  errors {v['errors']}"
            if "throughput_ratio" in v:
                line += (f"\n{'':<10} throughput ratio {v['throughput_ratio']} (per round "
                         f"{v['throughput_ratio_per_round']}), +{v['extra_cpu_us_per_request']} µs CPU per request, "
                         f"store warnings {v['store_warnings']}")  # fmt: skip
            print(line)
        if "redis_note" in r:
            print(r["redis_note"])
    if "scaleout" in report:
        print_scaleout(report["scaleout"])
    if "secrets" in report:
        r = report["secrets"]
        rounds = f"{r['rounds']} alternated rounds of {r['seconds_per_round']} s"
        print(f"\n6. injected headers and signed requests: POSTs of {r['body_bytes']} bytes, against the same "
              f"config without them ({r['connections']} connections, {rounds})")  # fmt: skip
        for name in SECRET_VARIANTS:
            v = r[name]
            line = (f"{name:<10} {v['rps']:>7} req/s  p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  "
                    f"CPU {v['cpu_us_per_request']} µs/req  rounds {v['rps_per_round']}")  # fmt: skip
            line += f"  errors {v['errors']}"
            if "throughput_ratio" in v:
                per_round = v["throughput_ratio_per_round"]
                line += (f"\n{'':<10} throughput ratio {v['throughput_ratio']} (per round {per_round}), "
                         f"+{v['extra_cpu_us_per_request']} µs CPU per request")  # fmt: skip
            print(line)
    if "instructions" in report:
        r = report["instructions"]
        print("\n6. instructions per request (callgrind; the large config, hot reload off; bare/variant is the "
              "throughput ratio if mitmdump is CPU bound)")
        if not r.get("available"):
            print(r["note"])
        else:
            print(f"{r['rounds']} rounds of {r['requests_per_round']} requests on {r['connections']} keep-alive "
                  f"connections after {r['warmup']} unmeasured ones; median of the rounds; what timers and threads "
                  f"ran per second ({r['idle_seconds']} s counted without requests) taken off")
            for name, v in r["variants"].items():
                line = f"{name:<24} {v['instructions_per_request']:>12,}"
                ratio = r["ratios"].get(name)
                if ratio:
                    line += f"  +{ratio['extra_per_request']:>9,} over bare  bare/{name} {ratio['ratio']:.4f}"
                line += (f"  (spread {v['spread']:.2%}, timers {v.get('idle_instructions_per_s', 0):,}/s, "
                         f"unexpected statuses {v['unexpected_status']})")  # fmt: skip
                print(line)
            print("features: " + ", ".join(f"{k}: {v}" for k, v in r["features"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--ranges", type=int, default=100_000)
    parser.add_argument("--routes", type=int, default=1_000)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="fewer inputs, rounds and seconds (~30 s)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections of the load generator")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--features", help=f"instructions: the features to configure, of "
                        f"{[f.name for f in FEATURES]} (default: every one on this branch)")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="write the generated configs here and keep them")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sizes = Sizes(args.clients, args.ranges, args.routes)
    work = args.keep or Path(tempfile.mkdtemp(prefix="knoxcall-bench-"))
    try:
        large = generate(work / "large", clients=sizes.clients, ranges=sizes.ranges, routes=sizes.routes)
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": os.cpu_count(),
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0],
            "config": f"{len(large.clients)} clients, {large.ranges} ranges, {len(large.routes)} routes, "
            f"{len(ENVIRONMENTS)} environments",
        }
        rss: dict[str, Any] = {}
        if "micro" in sections:
            report["micro"] = bench_micro(sizes, large, work, args.quick)
        if "e2e" in sections:
            report["e2e"] = bench_e2e(large, work, args.quick, args.connections, rss)
        if "load" in sections:
            report["load"] = bench_load(large, work, args.quick, rss)
        if "reload" in sections:
            report["reload"] = bench_reload(large, work, args.quick)
        if "ratelimit" in sections:
            report["ratelimit"] = bench_ratelimit(large, work, args.quick, args.connections)
        if "scaleout" in sections:
            report["scaleout"] = bench_scaleout(large, work, args.quick, args.connections, sys.modules[__name__])
        if "secrets" in sections:
            report["secrets"] = bench_secrets(large, work, args.quick, args.connections)
        if "instructions" in sections:
            wanted = args.features.split(",") if args.features else None
            report["instructions"] = bench_instructions(large, work, args.quick, wanted)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    # SIGTERM as an exception: the mitmdumps and servers started are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
