"""deploy/'s examples run as written: the systemd unit's command, the Kubernetes Deployment's container
with its ConfigMap and Secret projected into one folder, and the example configs. (The nginx file is
run by the cluster e2e tests.) Only the install paths are pointed at this checkout, and the ports at
free loopback ones; nothing is sent anywhere but loopback.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from knoxcall_addon.lint import lint
from knoxcall_addon.policy import load_policy
from tests.harness import BIN, ROOT, free_port, port_free
from tests.redisserver import RedisServer

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "knoxcall@.service"
KUBERNETES = DEPLOY / "kubernetes"


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> dict[str, Any]:
    """/healthz's 200 body, once the worker answers it; the worker's output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout}s:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def sets(args: list[str]) -> dict[str, str]:
    """The --set NAME=VALUE options of a command line."""
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args[:-1]) if a == "--set")


# -- the example configs ----------------------------------------------------------------------------


def test_the_cluster_example_config_trusts_only_the_balancer_and_shares_limits():
    policy = load_policy(DEPLOY / "config")
    settings = policy.config.settings
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32"]
    assert settings.rate_limit_store.startswith("redis://127.0.0.1:")
    assert not [f for f in lint(policy.config) if f.severity == "error"]


# -- systemd ------------------------------------------------------------------------------------------


def unit_command(port: int, replacements: dict[str, str]) -> list[str]:
    """The unit's ExecStart for instance ``port``, as systemd would run it (continuations, %i, $$)."""
    text = re.sub(r"\\\n", " ", UNIT.read_text(encoding="utf-8"))
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    command = line.removeprefix("ExecStart=").replace("%i", str(port)).replace("$$", "$")
    for old, new in replacements.items():
        command = command.replace(old, new)
    return shlex.split(command)


def unit_value(key: str) -> str:
    return next(x.split("=", 1)[1] for x in UNIT.read_text().splitlines() if x.startswith(f"{key}="))


def test_the_systemd_unit_starts_a_worker_that_is_ready_and_drains_on_sigterm(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    text = (DEPLOY / "config" / "knoxcall.yaml").read_text()
    (config / "knoxcall.yaml").write_text(re.sub(r"rate_limit_store: \S+", "rate_limit_store: memory", text))
    # the unit puts the metrics port at the port + 1000: that one must be free too
    port = next(p for p in (free_port() for _ in range(50)) if p < 64000 and port_free(p + 1000))
    command = unit_command(
        port,
        {
            "/opt/knoxcall/.venv/bin/": f"{BIN}/",
            "/opt/knoxcall/": f"{ROOT}/",
            "/etc/knoxcall/config": str(config),
            "/var/log/knoxcall": str(tmp_path),
            "/var/lib/knoxcall": str(tmp_path / "state"),
        },
    )
    assert command[:2] == ["/bin/sh", "-c"]
    inner = shlex.split(command[2])
    options = sets(inner)
    assert f"knoxcall_metrics=127.0.0.1:$(({port} + 1000))" in command[2]  # the shell adds: probed below
    assert int(unit_value("TimeoutStopSec")) > int(options["knoxcall_drain_seconds"]) + int(
        options["knoxcall_drain_timeout"]
    )
    assert unit_value("KillSignal") == "SIGTERM"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        body = wait_ready(f"http://127.0.0.1:{port + 1000}/healthz", process, log)
        assert body == {"status": "ready", "config_version": load_policy(config).version}
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.9")) as client:
            assert client.get(f"http://127.0.0.1:{port}/v2/nothing").status_code == 404  # decided by KnoxCall
        process.send_signal(signal.SIGTERM)  # systemctl stop
        draining = httpx.get(f"http://127.0.0.1:{port + 1000}/healthz", timeout=5)
        assert draining.status_code == 503 and draining.json()["reason"].startswith("draining")
        assert process.wait(int(unit_value("TimeoutStopSec"))) == 0
    finally:
        stop(process, signal.SIGINT, 10)
    assert (tmp_path / f"access-{port}.jsonl").read_text().count('"route_not_found"') == 1


# -- Kubernetes ---------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the manifest, from the files the kustomization lists."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    found: dict[str, dict[str, Any]] = {}
    for name in listed:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert document["kind"] not in found
            found[document["kind"]] = document
    return found


def test_the_kubernetes_manifests_fit_together():
    found = manifests()
    deployment, service = found["Deployment"], found["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    options = sets(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert deployment["spec"]["replicas"] >= 2
    assert options["knoxcall_metrics"] == f"0.0.0.0:{ports['metrics']}"
    assert container["args"][container["args"].index("-p") + 1] == str(ports["proxy"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > int(options["knoxcall_drain_seconds"])
    assert container["readinessProbe"]["periodSeconds"] < int(options["knoxcall_drain_seconds"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(options["knoxcall_drain_seconds"]) + int(
        options["knoxcall_drain_timeout"]
    )
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == options["knoxcall_config"])
    assert "subPath" not in mount  # a subPath mount is never updated: no hot reload
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    sources = volume["projected"]["sources"]
    assert sources == [
        {"configMap": {"name": found["ConfigMap"]["metadata"]["name"]}},
        {"secret": {"name": found["Secret"]["metadata"]["name"]}},
    ]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert "CHANGE-ME" not in found["ConfigMap"]["data"]["knoxcall.yaml"]  # the password is in the Secret only


def test_the_kubernetes_container_runs_on_its_projected_config_and_is_ready(tmp_path):
    found = manifests()
    container = found["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    with RedisServer(tmp_path, password="s3cret-for-test") as redis:
        # the kubelet's layout: each key a symlink into ..data, which points at a timestamped folder
        folder = tmp_path / "config"
        data = folder / "..2026_11_30"
        data.mkdir(parents=True)
        files = {**found["ConfigMap"]["data"], **found["Secret"]["stringData"]}
        for name, text in files.items():
            text = re.sub(r"redis://\S+", redis.url, text)  # the cluster's Redis, here a loopback one
            text = text.replace("api.default.svc.cluster.local:8080", "127.0.0.1:9")  # nothing leaves loopback
            (data / name).write_text(text)
        (folder / "..data").symlink_to(data.name)
        for name in files:
            (folder / name).symlink_to(f"..data/{name}")
        policy = load_policy(folder)
        assert policy.config.settings.rate_limit_store == redis.url  # from the Secret, merged
        assert not [f for f in lint(policy.config) if f.severity == "error"]
        proxy_port, metrics_port = free_port(), free_port()
        # the container's command line, word by word, with its paths and addresses made local
        exact = {
            "/usr/local/bin/mitmdump": str(BIN / "mitmdump"),
            "/opt/knoxcall/knoxcall_addon/addon.py": str(ROOT / "knoxcall_addon" / "addon.py"),
            "0.0.0.0": "127.0.0.1",
            "8080": str(proxy_port),
            "reverse:http://api.default.svc.cluster.local:8080": "reverse:http://127.0.0.1:9",
            "knoxcall_config=/etc/knoxcall/config": f"knoxcall_config={folder}",
            "knoxcall_metrics=0.0.0.0:9464": f"knoxcall_metrics=127.0.0.1:{metrics_port}",
            "confdir=/tmp/mitmproxy": f"confdir={tmp_path / 'mitmproxy'}",
            "termlog_verbosity=warn": "termlog_verbosity=info",  # to read that Redis was reached
        }
        command = [exact.get(word, word) for word in [*container["command"], *container["args"]]]
        assert not [w for w in command if "cluster.local" in w or w.startswith("/opt/") or "0.0.0.0" in w]
        log = tmp_path / "pod.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            probe = container["readinessProbe"]["httpGet"]["path"]
            body = wait_ready(f"http://127.0.0.1:{metrics_port}{probe}", process, log)
            assert body == {"status": "ready", "config_version": policy.version}
            # readiness does not wait for the store's first ping: wait for the line it logs
            deadline = time.monotonic() + 10
            while "reachable: limits are shared" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stop(process, signal.SIGINT, 20) == 0
        finally:
            stop(process, signal.SIGINT, 10)
        output = log.read_text()
        assert "reachable: limits are shared" in output
        assert "s3cret-for-test" not in output


@pytest.mark.parametrize("path", ["nginx/knoxcall.conf", "systemd/knoxcall@.service"])
def test_the_examples_name_the_ports_the_others_use(path):
    """nginx's upstream lines are the systemd instances' ports (8081, 8082), behind listen 8080."""
    text = (DEPLOY / path).read_text()
    assert "8081" in text and "8082" in text
