"""scripts/bench --sections scaleout: throughput through nginx to one and to two workers, and how long a
config edit takes to reach every worker.

Two mitmdump workers with the large config and two real nginx (deploy/nginx/knoxcall.conf, one
worker process each, tests/cluster.py): one sends to the first worker only, the other to both.
Rounds alternate between them in one run, so that both see the same machine. The CPU each
process spends per request is measured too: on a machine where the balancer and the load
generator share the cores with the workers, those figures, not requests/s, say what N cores
would carry. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.configgen import Generated, bench_file
from tests.cluster import Nginx, find_nginx


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _nginx_cpu(helpers: Any, master: int) -> float:
    """CPU seconds of nginx: its master and its worker processes (the master's children)."""
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        children = []
    return sum(helpers.cpu_seconds(pid) for pid in [master, *map(int, children)])


def _version(metrics_port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=2).json().get("config_version")
    except (httpx.HTTPError, ValueError):
        return None


def bench_scaleout(large: Generated, work: Path, quick: bool, connections: int, helpers: Any) -> dict[str, Any]:
    """``helpers`` is benchmarks.bench (its upstream, mitmdump, load and CPU helpers: one way to measure)."""
    if find_nginx() is None:
        return {"note": "nginx is not installed (apt-get install nginx-light): not measured"}
    rounds = 3 if quick else 6
    duration = 2.0 if quick else 4.0
    folder = work / "scaleout-config"  # its own copy: the edits below must not touch the other sections' config
    shutil.copytree(large.folder, folder, symlinks=True)
    result: dict[str, Any] = {"connections": connections, "rounds": rounds, "seconds_per_round": duration}
    with helpers.upstream_process() as up, contextlib.ExitStack() as stack:
        metrics_ports = [helpers.free_port(), helpers.free_port()]
        workers = []
        for i, metrics_port in enumerate(metrics_ports):
            extra = ["--set", f"knoxcall_metrics={metrics_port}", "--set", "knoxcall_drain_seconds=0"]
            workers.append(stack.enter_context(helpers.mitmdump(up, folder, work / f"worker-{i + 1}.log", extra)))
        balancers = {
            "1 worker": stack.enter_context(Nginx(work / "nginx-1", [f"127.0.0.1:{workers[0][0]}"])),
            "2 workers": stack.enter_context(Nginx(work / "nginx-2", [f"127.0.0.1:{p}" for p, _ in workers])),
        }
        nginx_pids = {name: n.process.pid for name, n in balancers.items() if n.process}
        for balancer in balancers.values():
            helpers.run_load(balancer.port, connections, 1.0)  # first-use costs out of the way
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in balancers}
        names = list(balancers)
        for i in range(rounds):
            for name in names[i % 2 :] + names[: i % 2]:
                cpu = {pid: helpers.cpu_seconds(pid) for _, pid in workers}
                nginx_cpu = _nginx_cpu(helpers, nginx_pids[name])
                loadgen_cpu = _children_cpu()
                run = helpers.run_load(balancers[name].port, connections, duration)
                total = max(1, run["total_requests"])
                run["loadgen_cpu_us_per_request"] = (_children_cpu() - loadgen_cpu) * 1e6 / total
                run["workers_cpu_us_per_request"] = sum(
                    (helpers.cpu_seconds(pid) - before) * 1e6 / total for pid, before in cpu.items()
                )
                run["nginx_cpu_us_per_request"] = (_nginx_cpu(helpers, nginx_pids[name]) - nginx_cpu) * 1e6 / total
                runs[name].append(run)
        result.update(_summaries(helpers, runs))
        result["edit_to_every_worker_s"] = _edit_propagation(folder, metrics_ports, 3 if quick else 6)
        # the same with a small config: what is left is the watcher's debounce and the scrape
        small = work / "scaleout-small"
        small.mkdir()
        (small / "knoxcall.yaml").write_text(bench_file(allowed=True))
        small_ports = [helpers.free_port(), helpers.free_port()]
        for i, metrics_port in enumerate(small_ports):
            extra = ["--set", f"knoxcall_metrics={metrics_port}", "--set", "knoxcall_drain_seconds=0"]
            stack.enter_context(helpers.mitmdump(up, small, work / f"small-{i + 1}.log", extra))
        result["small_edit_to_every_worker_s"] = _edit_propagation(small, small_ports, 3 if quick else 6)
    return result


def _summaries(helpers: Any, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {
            **helpers.load_summary(rs),
            "workers_cpu_us_per_request": round(statistics.median(r["workers_cpu_us_per_request"] for r in rs), 1),
            "nginx_cpu_us_per_request": round(statistics.median(r["nginx_cpu_us_per_request"] for r in rs), 1),
            "loadgen_cpu_us_per_request": round(statistics.median(r["loadgen_cpu_us_per_request"] for r in rs), 1),
        }
    ratios = [b["rps"] / a["rps"] for a, b in zip(runs["1 worker"], runs["2 workers"], strict=True) if a["rps"]]
    out["ratio_per_round"] = [round(r, 2) for r in ratios]
    out["ratio"] = round(statistics.median(ratios), 2) if ratios else None
    per_request = out["2 workers"]
    # on paper: cores / CPU seconds per request, with a worker's share on its own cores
    out["per_request_cpu_us"] = {
        "worker": per_request["workers_cpu_us_per_request"],
        "nginx": per_request["nginx_cpu_us_per_request"],
        "load generator": per_request["loadgen_cpu_us_per_request"],
    }
    return out


def _edit_propagation(folder: Path, metrics_ports: list[int], edits: int) -> dict[str, Any]:
    """Seconds from a config write until both workers' /healthz report its version (polled every 10 ms)."""
    from knoxcall_addon.policy import load_policy

    path = folder / "knoxcall.yaml"
    seconds: list[float] = []
    timeouts = 0
    for i in range(edits):
        text = bench_file(allowed=True) + f"# edit {i}\n"  # a new version, the same decisions
        path.write_text(text)
        written = time.perf_counter()
        expected = load_policy(folder).version
        deadline = written + 30
        while time.perf_counter() < deadline:
            if all(_version(p) == expected for p in metrics_ports):
                seconds.append(round(time.perf_counter() - written, 3))
                break
            time.sleep(0.01)
        else:
            timeouts += 1
        time.sleep(0.5)  # the next edit is a new burst for the watcher
    return {
        "seconds": seconds,
        "median_s": round(statistics.median(seconds), 3) if seconds else None,
        "max_s": max(seconds, default=None),
        "timeouts": timeouts,
    }


def print_scaleout(r: dict[str, Any]) -> None:
    print("\n6. scale-out: nginx (deploy/nginx/knoxcall.conf) in front of 1 and of 2 workers, the large config")
    if "note" in r:
        print(r["note"])
        return
    print(f"({r['connections']} keep-alive connections to nginx, {r['rounds']} alternated rounds of "
          f"{r['seconds_per_round']} s; nginx keeps idle connections to the workers)")  # fmt: skip
    for name in ("1 worker", "2 workers"):
        v = r[name]
        print(f"{name:<10} {v['rps']:>7} req/s  p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  "
              f"rounds {v['rps_per_round']}  errors {v['errors']}  CPU µs/req: workers "
              f"{v['workers_cpu_us_per_request']}, nginx {v['nginx_cpu_us_per_request']}, "
              f"load generator {v['loadgen_cpu_us_per_request']}")  # fmt: skip
    print(f"2 workers / 1 worker: {r['ratio']} (per round {r['ratio_per_round']})")
    for key, what in (("edit_to_every_worker_s", "the large config"), ("small_edit_to_every_worker_s", "a small one")):
        e = r[key]
        print(f"config edit -> both workers report the new version on /healthz, {what}: median {e['median_s']} s, "
              f"max {e['max_s']} s over {e['seconds']} (timeouts {e['timeouts']})")  # fmt: skip
