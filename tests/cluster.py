"""A local scale-out on loopback: a real nginx in front of N mitmdump workers, and Redis if the config names one.

`scripts/run cluster [--workers N]` runs it until Ctrl-C (`main`); the e2e tests and
`scripts/bench` start the same `Cluster` with their own config and ports. nginx runs
``deploy/nginx/knoxcall.conf`` itself, with its worker lines and listen port replaced
(`render_site`), inside a main config of its own (a temp folder, foreground, no system
paths), so the example that operators copy is the one that is tested.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from tests.harness import BIN, ROOT, MitmDump, accepts, free_port, stop_process

SITE = ROOT / "deploy" / "nginx" / "knoxcall.conf"
EXAMPLE_CONFIG = ROOT / "deploy" / "config"
NGINX_HINT = "nginx is not installed: apt-get install nginx-light"
REDIS_HINT = "redis-server is not installed: apt-get install redis-server"
UPSTREAM_SERVER = re.compile(r"^([ \t]*)server[ \t]+[^\s;{]+([ \t][^;\n]*)?;[ \t]*$", re.M)
LISTEN = re.compile(r"^([ \t]*)listen[ \t]+8080;[ \t]*$", re.M)


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def render_site(workers: Sequence[str], listen: str) -> str:
    """deploy/nginx/knoxcall.conf with its upstream's servers replaced by ``workers`` (host:port)
    and its ``listen 8080`` by ``listen``; the servers' parameters (max_fails...) are kept."""
    text = SITE.read_text(encoding="utf-8")
    servers = list(UPSTREAM_SERVER.finditer(text))
    listens = list(LISTEN.finditer(text))
    if not servers or len(listens) != 1:
        raise ValueError(f"{SITE}: expected 'server HOST:PORT ...;' lines and one 'listen 8080;'")
    indent, params = servers[0].group(1), servers[0].group(2) or ""
    lines = "\n".join(f"{indent}server {w}{params};" for w in workers)
    first, last = servers[0].start(), servers[-1].end()
    text = text[:first] + lines + text[last:]
    return LISTEN.sub(lambda m: f"{m.group(1)}listen {listen};", text, count=1)


def main_conf(folder: Path, site: Path) -> str:
    """A main nginx.conf of its own: foreground, every path in ``folder``, one worker process."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # else its workers would be nobody, locked out of folder
    temps = "".join(
        f"    {name}_temp_path {folder / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
        f"pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    log_format knoxcall '$remote_addr \"$request\" $status upstream=$upstream_addr "
        "upstream_status=$upstream_status';\n"
        f"    access_log {folder / 'access.log'} knoxcall;\n{temps}"
        f"    include {site};\n"
        "}\n"
    )


class Nginx:
    """A real nginx running the example site in front of ``workers``; a context manager."""

    def __init__(self, folder: Path, workers: Sequence[str], port: int | None = None, host: str = "127.0.0.1") -> None:
        binary = find_nginx()
        if binary is None:
            raise FileNotFoundError(NGINX_HINT)
        self.binary = binary
        self.folder = folder
        self.host = host
        self.port = port or free_port(host)
        folder.mkdir(parents=True, exist_ok=True)
        self.site = folder / "knoxcall.conf"
        self.site.write_text(render_site(workers, f"{host}:{self.port}"), encoding="utf-8")
        self.conf = folder / "nginx.conf"
        self.conf.write_text(main_conf(folder, self.site), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15) -> Nginx:
        args = [self.binary, "-p", str(self.folder), "-c", str(self.conf), "-e", str(self.folder / "error.log")]
        log = (self.folder / "nginx.out").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.errors()}")
            if accepts(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self.errors()}")

    def errors(self) -> str:
        path = self.folder / "error.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def access_lines(self) -> list[str]:
        path = self.folder / "access.log"
        return path.read_text("utf-8", "replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        stop_process(self.process)  # SIGTERM: nginx's fast shutdown

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Cluster:
    """nginx in front of ``workers`` mitmdump workers reading one config folder; a context manager.

    Worker i listens on its own loopback port, serves metrics and /healthz on another
    (``metrics_urls``) and writes its own access log. ``extra`` goes to every worker.
    """

    def __init__(
        self,
        config: Path,
        folder: Path,
        workers: int = 2,
        *,
        upstream: str = "http://127.0.0.1:9000",
        extra: Sequence[str] = (),
        port: int | None = None,
        worker_ports: Sequence[int] = (),
    ) -> None:
        self.config = config
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.workers: list[MitmDump] = []
        self.metrics_urls: list[str] = []
        for i in range(workers):
            metrics_port = free_port()
            args = ["--set", f"knoxcall_metrics=127.0.0.1:{metrics_port}", *extra]
            worker_port = worker_ports[i] if i < len(worker_ports) else None
            self.workers.append(
                MitmDump(
                    config,
                    mode=f"reverse:{upstream}",
                    port=worker_port,
                    access_log=folder / f"access-{i + 1}.jsonl",
                    log_path=folder / f"worker-{i + 1}.log",
                    extra=args,
                )
            )
            self.metrics_urls.append(f"http://127.0.0.1:{metrics_port}")
        self.nginx = Nginx(folder / "nginx", [f"127.0.0.1:{w.port}" for w in self.workers], port=port)

    @property
    def url(self) -> str:
        return self.nginx.url

    def start(self) -> Cluster:
        try:
            with ThreadPoolExecutor(len(self.workers)) as pool:
                list(pool.map(lambda w: w.start(60), self.workers))
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Everything at once: workers with SIGINT (no drain), then nginx."""
        for worker in self.workers:
            if worker.process and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGINT)
        for worker in self.workers:
            worker.stop(signal.SIGINT)
        self.nginx.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- scripts/run cluster ------------------------------------------------------------------------


def loopback_redis(config: Path) -> tuple[str, int, str | None] | None:
    """(host, port, password) of the Redis the config names, when it is on loopback; else None."""
    from knoxcall_addon.policy import load_policy

    store = load_policy(config).settings.rate_limit_store
    if not store.startswith("redis://"):
        return None
    parts = urlsplit(store)
    host = parts.hostname or "127.0.0.1"
    try:
        if not (host == "localhost" or ipaddress.ip_address(host).is_loopback):
            return None
    except ValueError:
        return None
    return host, parts.port or 6379, parts.password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run cluster",
        description="nginx in front of N KnoxCall workers on loopback (deploy/nginx, deploy/config); Ctrl-C stops all.",
    )
    parser.add_argument("--workers", type=int, default=2, help="mitmdump workers (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port on 127.0.0.1 (default 8080)")
    parser.add_argument("--config", type=Path, default=EXAMPLE_CONFIG, help="config folder (default deploy/config)")
    parser.add_argument(
        "--upstream", default="http://127.0.0.1:9000", help="mitmdump's reverse target (routes' target_base_url win)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if find_nginx() is None:
        print(f"knoxcall: {NGINX_HINT}", file=sys.stderr)
        return 1
    from tests.redisserver import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="knoxcall-cluster-"))
    started: list[object] = []
    try:
        redis = loopback_redis(args.config)
        if redis is not None and not accepts(redis[0], redis[1]):
            if shutil.which("redis-server") is None:
                print(f"knoxcall: the config names a Redis on {redis[0]}:{redis[1]}; {REDIS_HINT}", file=sys.stderr)
                return 1
            server = RedisServer(folder, password=redis[2], port=redis[1]).start()
            started.append(server)
            print(f"redis-server on 127.0.0.1:{redis[1]} (rate limits shared by the workers)")
        echo = None
        if args.config == EXAMPLE_CONFIG and not accepts("127.0.0.1", 9000):
            echo = subprocess.Popen([str(BIN / "knoxcall"), "echo", "--port", "9000"], stdout=subprocess.DEVNULL)
            started.append(echo)
            print("knoxcall echo on 127.0.0.1:9000 (the example routes' target)")
        cluster = Cluster(args.config, folder, args.workers, upstream=args.upstream, port=args.port)
        cluster.start()
        started.append(cluster)
        for worker, metrics in zip(cluster.workers, cluster.metrics_urls, strict=True):
            print(f"worker {worker.url}  metrics {metrics}/metrics  readiness {metrics}/healthz  log {worker.log_path}")
        print(f"nginx {cluster.url} in front of {args.workers} workers (logs in {folder})")
        print(f"Send requests to {cluster.url}, e.g.\n  curl --interface 127.0.0.9 {cluster.url}/v1/users")
        print("Ctrl-C stops everything.")
        while all(w.process and w.process.poll() is None for w in cluster.workers):
            time.sleep(0.5)
        print("knoxcall: a worker stopped; stopping the cluster", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for thing in reversed(started):
            if isinstance(thing, subprocess.Popen):
                thing.terminate()
                thing.wait(10)
            else:
                thing.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
