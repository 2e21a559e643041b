"""`knoxcall ping` and the in-proxy ConnectivityMonitor.

Real ICMP goes to 127.0.0.1 and ::1 only; every other result is simulated with an
injected pinger, so no packet ever leaves this machine.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence

import pytest
from mitmproxy.test import taddons

from knoxcall_addon import connectivity
from knoxcall_addon.cli import EXIT_FINDINGS, EXIT_NO_ICMP, EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.connectivity import (
    ConnectivityMonitor,
    PingNotPermitted,
    PingResult,
    PingSettings,
    PingTarget,
    icmp_pinger,
    targets,
)
from knoxcall_addon.loader import load_config
from knoxcall_addon.proxy_addon import KnoxCall
from tests.harness import MitmDump

CLIENTS = {
    "environments": [{"name": "production"}],
    "clients": [
        {"name": "web-1", "ip_address": "127.0.0.1", "description": "x"},
        {"name": "web-2", "ip_address": "127.0.0.2, 127.0.0.0/30", "description": "x"},
        {"name": "db-1", "ip_address": "127.0.0.3", "description": "x"},
        {"name": "laptop", "type": "user", "ip_address": "::1", "description": "x"},
        {"name": "old", "ip_address": "127.0.0.4", "enabled": False, "description": "x"},
        {"name": "office", "ip_address": "127.0.1.0/24", "description": "x"},
    ],
}


def fake_pinger(table: dict[str, tuple[int, int, float]], calls: list | None = None):
    """A pinger that answers from a table of address -> (sent, received, avg rtt)."""

    async def pinger(addresses: Sequence[str], settings: PingSettings) -> dict[str, PingResult]:
        if calls is not None:
            calls.append((list(addresses), settings))
        return {a: PingResult(a, *table.get(a, (settings.count, 0, 0.0))) for a in addresses}

    return pinger


def ping(config_dir, *args, pinger=icmp_pinger) -> tuple[int, str]:
    out = io.StringIO()
    return main(["ping", str(config_dir), *args], pinger=pinger, out=out), out.getvalue()


def icmp_permitted() -> bool:
    try:
        connectivity._socket_mode()
    except PingNotPermitted:
        return False
    return True


def test_targets_are_single_addresses_of_enabled_server_clients(make_config):
    config = load_config(make_config(**{"k.yaml": CLIENTS}))
    assert targets(config) == [
        PingTarget("web-1", "127.0.0.1"),
        PingTarget("web-2", "127.0.0.2"),
        PingTarget("db-1", "127.0.0.3"),
    ]
    everything = targets(config, include_all=True)
    assert PingTarget("laptop", "::1") in everything
    assert PingTarget("old", "127.0.0.4") in everything
    assert not any(t.client == "office" for t in everything)  # ranges are never pinged


def test_status_from_loss():
    assert PingResult("a", 3, 3, 1.0).status == "Healthy"
    assert PingResult("a", 3, 1, 1.0).status == "Degraded"
    assert PingResult("a", 3, 0).status == "Down"
    assert PingResult("a", 0, 0, error="x").status == "Down"


def test_table_with_simulated_down_and_degraded(make_config):
    config_dir = make_config(**{"k.yaml": CLIENTS})
    calls: list = []
    pinger = fake_pinger({"127.0.0.1": (4, 4, 0.5), "127.0.0.2": (4, 1, 2.25), "127.0.0.3": (4, 0, 0.0)}, calls)
    code, out = ping(config_dir, "--count", "4", "--timeout", "2", "--interval", "0.5", pinger=pinger)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["CLIENT", "ADDRESS", "STATUS", "LOSS", "AVG", "RTT"]
    assert lines[1].split() == ["web-1", "127.0.0.1", "Healthy", "0%", "0.50", "ms"]
    assert lines[2].split() == ["web-2", "127.0.0.2", "Degraded", "75%", "2.25", "ms"]
    assert lines[3].split() == ["db-1", "127.0.0.3", "Down", "100%", "-"]
    assert "Hosts that block ICMP show Down although they may be online" in out
    assert calls == [(["127.0.0.1", "127.0.0.2", "127.0.0.3"], PingSettings(count=4, interval=0.5, timeout=2.0))]


def test_no_permission_gives_one_clear_message_and_exit_3(make_config, capsys):
    async def refused(addresses, settings):
        raise PingNotPermitted(connectivity.NO_PERMISSION)

    code, out = ping(make_config(**{"k.yaml": CLIENTS}), pinger=refused)
    assert code == EXIT_NO_ICMP
    err = capsys.readouterr().err
    assert "ICMP is not permitted for this user" in err
    assert "ping_group_range" in err
    assert "Traceback" not in err and out == ""


def test_no_permission_from_icmplib_sockets_is_detected(make_config, capsys, monkeypatch):
    """icmplib raising SocketPermissionError for both socket kinds becomes PingNotPermitted."""
    from icmplib import sockets
    from icmplib.exceptions import SocketPermissionError

    class Refused:
        def __init__(self, privileged: bool = True) -> None:
            raise SocketPermissionError(privileged)

    monkeypatch.setattr(sockets, "ICMPv4Socket", Refused)
    monkeypatch.setattr(connectivity, "_privileged", None)
    code, _ = ping(make_config(**{"k.yaml": CLIENTS}))
    assert code == EXIT_NO_ICMP
    assert "ICMP is not permitted" in capsys.readouterr().err


def test_ping_usage_and_config_errors(make_config, tmp_path):
    assert ping(tmp_path / "missing", pinger=fake_pinger({}))[0] == EXIT_FINDINGS
    assert ping(make_config(**{"k.yaml": CLIENTS}), "--count", "0", pinger=fake_pinger({}))[0] == EXIT_USAGE
    only_ranges = {"environments": [{"name": "production"}], "clients": [{"name": "n", "ip_address": "127.0.1.0/24"}]}
    code, out = ping(make_config("ranges", **{"k.yaml": only_ranges}), pinger=fake_pinger({}))
    assert code == EXIT_OK and "ranges are never pinged" in out


def test_real_ping_of_loopback(make_config):
    if not icmp_permitted():
        pytest.skip("ICMP sockets are not permitted here (not root, and net.ipv4.ping_group_range excludes us)")
    config_dir = make_config(
        **{
            "k.yaml": {
                "environments": [{"name": "production"}],
                "clients": [
                    {"name": "lo4", "ip_address": "127.0.0.1", "description": "x"},
                    {"name": "lo6", "ip_address": "::1", "description": "x"},
                ],
            }
        }
    )
    code, out = ping(config_dir, "--count", "2", "--interval", "0.1", "--timeout", "2")
    assert code == EXIT_OK
    rows = [line.split()[:4] for line in out.splitlines()[1:3]]
    assert rows == [["lo4", "127.0.0.1", "Healthy", "0%"], ["lo6", "::1", "Healthy", "0%"]]


# -- the monitor -------------------------------------------------------------------------


def test_monitor_logs_status_changes(make_config, caplog):
    config = load_config(make_config(**{"k.yaml": CLIENTS}))
    table = {"127.0.0.1": (3, 3, 0.2), "127.0.0.2": (3, 3, 0.2), "127.0.0.3": (3, 3, 0.2)}
    monitor = ConnectivityMonitor(pinger=fake_pinger(table))
    monitor.interval = 5
    caplog.set_level(logging.INFO, logger="knoxcall")
    asyncio.run(monitor.check_once(config))
    assert "knoxcall: client web-1 is Healthy: 0% loss" in caplog.text
    caplog.clear()
    asyncio.run(monitor.check_once(config))
    assert caplog.text == ""  # nothing changed, nothing logged
    table["127.0.0.1"] = (3, 0, 0.0)
    table["127.0.0.2"] = (3, 2, 0.3)
    asyncio.run(monitor.check_once(config))
    down = [r for r in caplog.records if "web-1" in r.message]
    assert down[0].message == "knoxcall: client web-1 is Down: 100% loss (127.0.0.1)"
    assert down[0].levelno == logging.WARNING
    assert "knoxcall: client web-2 is Degraded: 33% loss" in caplog.text
    assert "db-1" not in caplog.text
    assert monitor.status_lines() == [
        "db-1 127.0.0.3: Healthy, 0% loss, 0.20 ms",
        "web-1 127.0.0.1: Down, 100% loss",
        "web-2 127.0.0.2: Degraded, 33% loss, 0.30 ms",
    ]


def test_monitor_runs_in_the_proxy_on_the_current_policy_and_stops(make_config, caplog):
    """Started by `running`, reads the KnoxCall addon's policy, never blocks, stops in `done`."""
    config_dir = make_config(**{"k.yaml": CLIENTS})
    calls: list = []
    caplog.set_level(logging.INFO, logger="knoxcall")

    async def scenario() -> None:
        knoxcall = KnoxCall()
        monitor = ConnectivityMonitor(pinger=fake_pinger({"127.0.0.1": (3, 3, 0.1)}, calls))
        with taddons.context(knoxcall, monitor) as tctx:
            tctx.configure(knoxcall, knoxcall_config=str(config_dir))
            assert tctx.master.addons.get("connectivitymonitor") is monitor
            assert monitor.status_lines() == ["connectivity monitoring is off (knoxcall_ping_interval=0)"]
            tctx.configure(monitor, knoxcall_ping_interval=1)
            monitor.running()
            for _ in range(100):
                if len(calls) >= 1 and monitor.last:
                    break
                await asyncio.sleep(0.02)
            task = monitor._task
            assert task is not None and not task.done()
            monitor.done()
            await asyncio.sleep(0)
            assert task.cancelled() or task.done()
        assert calls[0][0] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        assert "knoxcall: client web-2 is Down: 100% loss" in caplog.text

    asyncio.run(scenario())


def test_monitor_permission_error_is_one_warning_and_stops(make_config, caplog):
    config_dir = make_config(**{"k.yaml": CLIENTS})
    attempts: list = []

    async def refused(addresses, settings):
        attempts.append(addresses)
        raise PingNotPermitted(connectivity.NO_PERMISSION)

    async def scenario() -> None:
        knoxcall = KnoxCall()
        monitor = ConnectivityMonitor(pinger=refused)
        with taddons.context(knoxcall, monitor) as tctx:
            tctx.configure(knoxcall, knoxcall_config=str(config_dir))
            tctx.configure(monitor, knoxcall_ping_interval=1)
            monitor.running()
            for _ in range(100):
                if monitor._task is not None and monitor._task.done():
                    break
                await asyncio.sleep(0.02)
            assert monitor._task.done()
            monitor.done()

    caplog.set_level(logging.INFO, logger="knoxcall")
    asyncio.run(scenario())
    assert len(attempts) == 1
    warnings = [r for r in caplog.records if "ICMP is not permitted" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "connectivity monitoring is off" in warnings[0].message
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def test_negative_interval_is_refused(make_config):
    from mitmproxy import exceptions

    monitor = ConnectivityMonitor(pinger=fake_pinger({}))
    with taddons.context(monitor) as tctx, pytest.raises(exceptions.OptionsError):
        tctx.configure(monitor, knoxcall_ping_interval=-1)


def test_mitmdump_monitors_loopback(make_config, tmp_path):
    """A real mitmdump with knoxcall_ping_interval pings 127.0.0.1 and logs its status."""
    if not icmp_permitted():
        pytest.skip("ICMP sockets are not permitted here (not root, and net.ipv4.ping_group_range excludes us)")
    config_dir = make_config(
        **{
            "k.yaml": {
                "environments": [{"name": "production"}],
                "clients": [{"name": "lo-server", "ip_address": "127.0.0.1", "description": "x"}],
            }
        }
    )
    with MitmDump(config_dir, extra=["--set", "knoxcall_ping_interval=1"]) as proxy:
        proxy.wait_for_log("knoxcall: client lo-server is Healthy: 0% loss", timeout=20)


def test_monitor_survives_a_failing_round(make_config, caplog):
    """An unexpected error in one round is a warning (never an ERROR) and the next round runs."""
    config_dir = make_config(**{"k.yaml": CLIENTS})
    rounds: list = []

    async def flaky(addresses, settings):
        rounds.append(addresses)
        if len(rounds) == 1:
            raise RuntimeError("boom")
        return {a: PingResult(a, 1, 1, 0.1) for a in addresses}

    async def scenario() -> ConnectivityMonitor:
        knoxcall = KnoxCall()
        monitor = ConnectivityMonitor(pinger=flaky)
        with taddons.context(knoxcall, monitor) as tctx:
            tctx.configure(knoxcall, knoxcall_config=str(config_dir))
            tctx.configure(monitor, knoxcall_ping_interval=1)
            monitor.running()
            for _ in range(500):  # the second round comes after the 1 s interval
                if monitor.last:
                    break
                await asyncio.sleep(0.02)
            monitor.done()
        return monitor

    caplog.set_level(logging.INFO, logger="knoxcall")
    monitor = asyncio.run(scenario())
    assert len(rounds) == 2
    assert "connectivity check failed; will retry" in caplog.text
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert "web-1 127.0.0.1: Healthy, 0% loss, 0.10 ms" in monitor.status_lines()
