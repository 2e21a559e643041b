"""scripts/bench still runs: the config generator, the decision microbenchmark and the scale-out section at a tiny size.

No timing assertions (timing belongs to scripts/bench itself); what is asserted is that the
generated config loads, and that the compiled index decides exactly like the naive
linear scan with ipaddress on every sampled request.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from benchmarks.configgen import BENCH_ROUTE, generate
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.policy import load_policy
from tests.cluster import NGINX_HINT, find_nginx


def test_generated_config_loads_with_the_sizes_asked(tmp_path):
    gen = generate(tmp_path / "cfg", clients=30, ranges=300, routes=20)
    policy = load_policy(gen.folder)
    assert len(policy.config.clients) == 31  # + the loopback client of the e2e section
    assert len(policy.clients_by_ip) == gen.ranges + 2
    assert {n.version for c in policy.config.clients.values() for n in c.networks} == {4, 6}
    assert len(policy.config.routes) == 21
    allowed = decide(policy, RequestFacts(peer="127.0.0.1", route=BENCH_ROUTE))
    assert allowed.allowed and allowed.reason == "client"


def test_microbenchmark_runs_and_agrees_with_the_naive_scan(capsys):
    assert bench.main(["--sections", "micro", "--quick", "--json", "--clients", "20", "--ranges", "200",
                       "--routes", "10"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    sizes = report["micro"]["sizes"]
    assert [s["ranges"] for s in sizes] == [102, 202]
    for s in sizes:
        assert s["decisions"] > 0
        assert 0 < s["allowed_share"] < 1  # allowed and denied mixed
        assert s["naive_samples"] > 0
        assert s["naive_mismatches"] == 0


@pytest.mark.skipif(find_nginx() is None, reason=NGINX_HINT)
def test_scaleout_section_runs_through_nginx_to_one_and_two_workers(capsys):
    assert bench.main(["--sections", "scaleout", "--quick", "--json", "--clients", "20", "--ranges", "200",
                       "--routes", "10"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)["scaleout"]
    for name in ("1 worker", "2 workers"):
        assert report[name]["errors"] == 0
        assert len(report[name]["rps_per_round"]) == report["rounds"]
        assert report[name]["workers_cpu_us_per_request"] > 0 and report[name]["nginx_cpu_us_per_request"] > 0
    assert report["ratio"] > 0
    for key in ("edit_to_every_worker_s", "small_edit_to_every_worker_s"):
        assert report[key]["timeouts"] == 0 and len(report[key]["seconds"]) == 3


def test_the_secrets_section_configs_load_and_do_what_they_say(tmp_path, monkeypatch):
    monkeypatch.setenv("KC_BENCH_TOKEN", "t")
    monkeypatch.setenv("KC_BENCH_SIGN", "s")
    for variant in bench.SECRET_VARIANTS:
        folder = tmp_path / variant
        folder.mkdir()
        (folder / "knoxcall.yaml").write_text(bench.secrets_bench_file(variant))
        policy = load_policy(folder)
        injects = any(route == BENCH_ROUTE for route, _ in policy.injections)
        assert injects == (variant in ("inject", "both"))
        assert (BENCH_ROUTE in policy.signatures) == (variant in ("signed", "both"))
