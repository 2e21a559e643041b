"""Connectivity checks of clients' single addresses with ICMP echo (icmplib).

Shared by `knoxcall ping` and the in-proxy monitor (`ConnectivityMonitor`). The pinger
is a parameter everywhere, so tests can simulate any result without sending a packet.
Hosts that block ICMP show Down although they may be online: ICMP is not the API.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from knoxcall_addon.model import Config

logger = logging.getLogger("knoxcall")

ICMP_CAVEAT = "Hosts that block ICMP show Down although they may be online."
NO_PERMISSION = (
    "knoxcall: ICMP is not permitted for this user. Run as root (or with CAP_NET_RAW), or allow "
    "unprivileged ICMP sockets for your group: sysctl -w net.ipv4.ping_group_range='0 2147483647'"
)


class PingNotPermitted(Exception):
    """The OS refuses ICMP sockets to this process (neither raw nor unprivileged ones)."""


@dataclass(frozen=True)
class PingTarget:
    client: str
    address: str


@dataclass(frozen=True)
class PingResult:
    address: str
    sent: int
    received: int
    avg_rtt_ms: float = 0.0
    error: str = ""  # why the host could not be pinged at all (e.g. network unreachable)

    @property
    def loss(self) -> float:
        """Packet loss as a fraction, 1.0 when nothing was sent."""
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def status(self) -> str:
        """Healthy = no loss, Degraded = some loss, Down = all lost."""
        if self.sent and self.received >= self.sent:
            return "Healthy"
        if self.received > 0:
            return "Degraded"
        return "Down"


@dataclass(frozen=True)
class PingSettings:
    count: int = 3
    interval: float = 0.2
    timeout: float = 1.0


Pinger = Callable[[Sequence[str], PingSettings], Awaitable[dict[str, PingResult]]]


def targets(config: Config, include_all: bool = False) -> list[PingTarget]:
    """The addresses to ping: enabled server clients' single-address networks (/32, /128).

    ``include_all`` adds user clients and disabled clients. Ranges are never pinged: a
    range has no one address that stands for it.
    """
    result: list[PingTarget] = []
    for client in config.clients.values():
        if not include_all and (client.type != "server" or not client.enabled):
            continue
        for version, start, end in client.networks.intervals():  # no network objects for ranges
            if end - start == 1:
                address = ipaddress.IPv4Address(start) if version == 4 else ipaddress.IPv6Address(start)
                result.append(PingTarget(client.name, str(address)))
    return result


_privileged: bool | None = None


def _socket_mode() -> bool:
    """Whether to use raw (privileged) sockets: unprivileged ICMP first, raw when that fails.

    Raises PingNotPermitted when neither is allowed (not root, no CAP_NET_RAW, and
    net.ipv4.ping_group_range excludes the user's group).
    """
    global _privileged
    if _privileged is not None:
        return _privileged
    from icmplib.exceptions import SocketPermissionError
    from icmplib.sockets import ICMPv4Socket

    for privileged in (False, True):
        try:
            ICMPv4Socket(privileged=privileged).close()
        except SocketPermissionError:
            continue
        _privileged = privileged
        return privileged
    raise PingNotPermitted(NO_PERMISSION)


async def icmp_pinger(addresses: Sequence[str], settings: PingSettings) -> dict[str, PingResult]:
    """Ping every address concurrently with icmplib's async API; never blocks the event loop.

    Each host is pinged on its own (``async_ping`` under ``gather``, like ``async_multiping``
    does) so that one unreachable network makes that host Down instead of failing them all.
    """
    from icmplib import async_ping
    from icmplib.exceptions import ICMPLibError, SocketPermissionError

    privileged = _socket_mode()
    limit = asyncio.Semaphore(50)

    async def one(address: str) -> PingResult:
        async with limit:
            try:
                host: Any = await async_ping(
                    address,
                    count=settings.count,
                    interval=settings.interval,
                    timeout=settings.timeout,
                    privileged=privileged,
                )
            except SocketPermissionError as e:
                raise PingNotPermitted(NO_PERMISSION) from e
            except (ICMPLibError, OSError) as e:
                return PingResult(address, settings.count, 0, error=str(e) or type(e).__name__)
        return PingResult(address, host.packets_sent, host.packets_received, host.avg_rtt if host.is_alive else 0.0)

    results = await asyncio.gather(*(one(a) for a in dict.fromkeys(addresses)))
    return {r.address: r for r in results}


async def ping_targets(
    items: Sequence[PingTarget], settings: PingSettings, pinger: Pinger = icmp_pinger
) -> list[tuple[PingTarget, PingResult]]:
    """Ping each target once (addresses shared by clients once) and pair the results."""
    if not items:
        return []
    results = await pinger([t.address for t in items], settings)
    return [(t, results.get(t.address) or PingResult(t.address, 0, 0, error="no result")) for t in items]


def format_table(rows: Sequence[tuple[PingTarget, PingResult]]) -> str:
    """client, address, status, loss, average round trip: one line each, aligned."""
    header = ("CLIENT", "ADDRESS", "STATUS", "LOSS", "AVG RTT")
    table = [header]
    for target, result in rows:
        rtt = f"{result.avg_rtt_ms:.2f} ms" if result.received else "-"
        status = result.status + (f" ({result.error})" if result.error else "")
        table.append((target.client, target.address, status, f"{result.loss * 100:.0f}%", rtt))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)


class ConnectivityMonitor:
    """Pings server clients' single addresses of the policy in force every few seconds.

    Option ``knoxcall_ping_interval`` (seconds, 0 = off). Runs as an asyncio task, logs
    status changes, and stops in ``done``. ICMP that the OS refuses is logged once as a
    warning (an ERROR at startup would make mitmdump exit) and monitoring stops.
    """

    def __init__(self, pinger: Pinger = icmp_pinger, settings: PingSettings | None = None) -> None:
        self.pinger = pinger
        self.settings = settings or PingSettings(count=3, interval=0.2, timeout=1.0)
        self.interval = 0.0
        self.last: dict[tuple[str, str], PingResult] = {}
        self._task: asyncio.Task | None = None
        self._running = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "knoxcall_ping_interval",
            int,  # mitmproxy cannot parse float options from --set
            0,
            "Seconds between ICMP checks of server clients' single IPs; 0 turns monitoring off.",
        )
        from knoxcall_addon.launchguard import check_options

        check_options(loader)  # before mitmproxy applies a bad --set value, which would drop the whole script

    def configure(self, updated: set[str]) -> None:
        if "knoxcall_ping_interval" not in updated:
            return
        from mitmproxy import ctx, exceptions

        interval = float(ctx.options.knoxcall_ping_interval)
        if interval < 0:
            raise exceptions.OptionsError("knoxcall_ping_interval must be 0 (off) or a number of seconds")
        self.interval = interval
        if self._running:
            self._restart()

    def running(self) -> None:
        self._running = True
        self._restart()

    def done(self) -> None:
        self._running = False
        self._stop()

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _restart(self) -> None:
        self._stop()
        if self.interval > 0:
            from mitmproxy.utils import asyncio_utils

            self._task = asyncio_utils.create_task(self._loop(), name="knoxcall connectivity", keep_ref=True)

    def current_config(self) -> Config | None:
        """The config of the policy the KnoxCall addon has in force now (read each round)."""
        from mitmproxy import ctx

        addon = ctx.master.addons.get("knoxcall")
        current = getattr(addon, "current", None)
        policy = getattr(current, "policy", None)
        return getattr(policy, "config", None)

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except PingNotPermitted as e:
                logger.warning(f"{e}; connectivity monitoring is off")
                return
            except Exception:
                # WARNING, not ERROR: an ERROR right after start would make mitmdump exit.
                logger.warning("knoxcall: connectivity check failed; will retry", exc_info=True)
            await asyncio.sleep(self.interval)

    async def check_once(self, config: Config | None = None) -> list[tuple[PingTarget, PingResult]]:
        """One round: ping, remember, log what changed since the last round."""
        config = config if config is not None else self.current_config()
        if config is None:
            return []
        rows = await ping_targets(targets(config), self.settings, self.pinger)
        seen: dict[tuple[str, str], PingResult] = {}
        for target, result in rows:
            key = (target.client, target.address)
            seen[key] = result
            before = self.last.get(key)
            if before is None or before.status != result.status:
                line = (
                    f"knoxcall: client {target.client} is {result.status}: {result.loss * 100:.0f}% loss"
                    + (f", {result.avg_rtt_ms:.2f} ms" if result.received else "")
                    + f" ({target.address})"
                )
                if result.status == "Healthy":
                    logger.info(line)
                else:
                    logger.warning(line)
        self.last = seen
        return rows

    def status_lines(self) -> list[str]:
        """Each monitored client's last status, for `knoxcall.status`."""
        if self.interval <= 0:
            return ["connectivity monitoring is off (knoxcall_ping_interval=0)"]
        if not self.last:
            return ["connectivity: no results yet"]
        return [
            f"{client} {address}: {r.status}, {r.loss * 100:.0f}% loss"
            + (f", {r.avg_rtt_ms:.2f} ms" if r.received else "")
            for (client, address), r in sorted(self.last.items())
        ]
