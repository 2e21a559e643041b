"""A synthetic config of a given size, written as YAML into a folder.

Deterministic (seeded), so that two runs measure the same config. The ranges mix
IPv4 and IPv6 and many prefix lengths, overlap now and then, and are spread over the
clients; every route has clients assigned in every environment. Addresses are config
data only: nothing ever connects to them.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from pathlib import Path

ENVIRONMENTS = ("production", "staging", "development")
BENCH_CLIENT = "bench-loopback"  # 127.0.0.0/8, assigned to BENCH_ROUTE everywhere: the load generator
BENCH_ROUTE = "bench-route"

# prefix lengths and their weights, per family
V4_PREFIXES = ((32, 40), (31, 3), (30, 4), (29, 5), (28, 8), (27, 5), (26, 5), (25, 4), (24, 14), (22, 4), (20, 4),
               (16, 3), (12, 1))  # fmt: skip
V6_PREFIXES = ((128, 30), (127, 2), (124, 6), (120, 8), (112, 6), (96, 5), (64, 25), (56, 8), (48, 8), (40, 2))


@dataclass
class Generated:
    """What was written, and what the benchmark needs to build requests against it."""

    folder: Path
    clients: list[tuple[str, list[str]]]  # (name, networks) in declaration order
    routes: list[str]
    assignments: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (route, env) -> clients
    ranges: int = 0


def _random_network(rng: random.Random) -> str:
    if rng.random() < 0.7:
        prefix = rng.choices([p for p, _ in V4_PREFIXES], [w for _, w in V4_PREFIXES])[0]
        value = rng.getrandbits(32) & ~((1 << (32 - prefix)) - 1)
        # keep clear of loopback: 127/8 belongs to the load generator's client
        if value >> 24 == 127:
            value ^= 1 << 30
        return str(ipaddress.IPv4Network((value, prefix)))
    prefix = rng.choices([p for p, _ in V6_PREFIXES], [w for _, w in V6_PREFIXES])[0]
    value = (0x2000 << 112 | rng.getrandbits(125)) & ~((1 << (128 - prefix)) - 1)
    return str(ipaddress.IPv6Network((value, prefix)))


def generate(
    folder: Path,
    *,
    clients: int = 10_000,
    ranges: int = 100_000,
    routes: int = 1_000,
    per_assignment: int = 10,
    seed: int = 5,
    upstream: str = "http://127.0.0.1:9",
) -> Generated:
    """Write clients.yaml, routes.yaml, assignments.yaml and knoxcall.yaml into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    clients = max(1, min(clients, ranges))
    per_client = [ranges // clients + (1 if i < ranges % clients else 0) for i in range(clients)]
    client_list: list[tuple[str, list[str]]] = []
    lines = ["clients:"]
    for i, count in enumerate(per_client):
        name = f"client-{i:05d}"
        networks = list(dict.fromkeys(_random_network(rng) for _ in range(count)))
        client_list.append((name, networks))
        lines.append(f"  - name: {name}")
        lines.append(f"    type: {'user' if i % 7 == 0 else 'server'}")
        if i % 50 == 49:
            lines.append("    enabled: false")
        lines.append("    ip_address:")
        lines.extend(f"      - {n}" for n in networks)
    (folder / "clients.yaml").write_text("\n".join(lines) + "\n")

    route_names = [f"route-{i:04d}" for i in range(routes)]
    lines = ["routes:"]
    for i, name in enumerate(route_names):
        lines.append(f"  - name: {name}")
        lines.append(f"    target_base_url: {upstream}")
        if i % 3 == 0:
            lines.append("    allowed_methods: [GET, POST, PUT, DELETE]")
        lines.append(f"    match: {{hosts: [api{i % 50}.example.com], path_prefix: /r{i}}}")
    (folder / "routes.yaml").write_text("\n".join(lines) + "\n")

    names = [c for c, _ in client_list]
    assignments: dict[tuple[str, str], list[str]] = {}
    lines = ["assignments:"]
    for route in route_names:
        lines.append(f"  {route}:")
        for env in ENVIRONMENTS:
            chosen = rng.sample(names, min(per_assignment, len(names)))
            assignments[(route, env)] = chosen
            lines.append(f"    {env}: [{', '.join(chosen)}]")
    (folder / "assignments.yaml").write_text("\n".join(lines) + "\n")

    (folder / "knoxcall.yaml").write_text(bench_file(allowed=True))
    total = sum(len(n) for _, n in client_list)
    return Generated(folder, client_list, route_names, assignments, total)


def bench_file(*, allowed: bool, client: str = BENCH_CLIENT, rate_limit_store: str | None = None) -> str:
    """The small file the end-to-end and reload sections use: the loopback client and its route
    (no target: requests go to mitmdump's reverse-mode upstream, as without the addon).

    ``allowed=False`` assigns the route to nobody, so that a reload flips loopback callers to 403.
    ``client`` names another client to assign (defined elsewhere, e.g. by big_file_client).
    ``rate_limit_store`` (memory or a Redis URL) gives the loopback client a rate limit high
    enough never to refuse anything, counted in that store.
    """
    assigned = f"[{client}]" if allowed else "[]"
    envs = "\n".join(f"  - name: {e}" for e in ENVIRONMENTS)
    per_env = "\n".join(f"    {e}: {assigned}" for e in ENVIRONMENTS)
    store = f'  rate_limit_store: "{rate_limit_store}"\n' if rate_limit_store else ""
    limit = "    rate_limit: {requests: 1000000000, window_sec: 1}\n" if rate_limit_store else ""
    return (
        f"settings:\n  default_environment: production\n{store}"
        f"environments:\n{envs}\n"
        f'clients:\n  - name: {BENCH_CLIENT}\n    ip_address: [127.0.0.0/8, "::1"]\n{limit}'
        f"routes:\n  - name: {BENCH_ROUTE}\n"
        f"assignments:\n  {BENCH_ROUTE}:\n{per_env}\n"
    )


BIG_FILE_CLIENT = "bench-loopback-big"


def big_file_client(*, allowed: bool) -> str:
    """An entry to append to clients.yaml: a loopback client, or (``allowed=False``) the same
    client with another address (config data only, never a destination), so that an edit of
    the big file flips loopback callers between 200 and 403."""
    addresses = '[127.0.0.0/8, "::1"]' if allowed else '["10.255.255.254"]'
    return f"  - name: {BIG_FILE_CLIENT}\n    ip_address: {addresses}\n"
