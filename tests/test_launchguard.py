"""The launch guard with mitmproxy's own master, options and test flows (no mitmdump process).

What the end-to-end tests in test_launch_e2e.py cannot easily reach: each kind of flow the
guard refuses, ``knoxcall.status`` while the hooks are gone, the checks' messages, and the
guard's place in the hook chain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import addonmanager, hooks
from mitmproxy.addons import proxyserver
from mitmproxy.flow import Error, Flow
from mitmproxy.net.dns import response_codes
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from knoxcall_addon import launchguard
from knoxcall_addon.connectivity import ConnectivityMonitor
from knoxcall_addon.proxy_addon import KnoxCall

CONFIG = """\
environments: [{name: production}]
clients: [{name: office, ip_address: 127.0.0.8/29}]
routes: [{name: api}]
assignments: {api: {production: [office]}}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(CONFIG)
    return folder


@pytest.fixture
def active(config_dir: Path) -> Iterator[tuple[KnoxCall, taddons.context]]:
    addon = KnoxCall()
    with taddons.context(addon) as context:
        context.configure(addon, knoxcall_config=str(config_dir), knoxcall_reload=False)
        yield addon, context
    addon.done()


def guard_in(context: taddons.context) -> launchguard.LaunchGuard:
    guard = context.master.addons.get(launchguard.GUARD_NAME)
    assert isinstance(guard, launchguard.LaunchGuard)
    return guard


def in_chain(context: taddons.context, addon: object) -> bool:
    return any(a is addon for a in addonmanager.traverse(context.master.addons.chain))


def test_guard_leaves_the_chain_while_knoxcall_decides_and_returns_when_it_is_removed(active) -> None:
    addon, context = active
    guard = guard_in(context)
    assert guard.active and guard.keeper is addon
    assert not in_chain(context, guard)  # costs nothing per flow while KnoxCall decides
    context.master.addons.remove(addon)  # what a script reload does first
    assert not guard.active
    assert context.master.addons.chain[-1] is guard
    assert addon.current is not None
    addon.install(addon.current.policy)  # an addon out of the chain cannot make the guard step aside
    assert not guard.active and in_chain(context, guard)


def test_status_says_so_when_the_hooks_are_not_active(active) -> None:
    addon, context = active
    assert "NOT ACTIVE" not in context.command(addon.status_command)
    context.master.addons.remove(addon)
    # mitmproxy keeps a removed addon's commands: knoxcall.status still answers
    status = context.command(addon.status_command).splitlines()
    assert status[0] == (
        "knoxcall: NOT ACTIVE, every request is refused: KnoxCall stopped: its script was reloaded and "
        "failed to load, was removed, or mitmproxy exits"
    )


def test_bad_launch_options_are_reported_removed_and_keep_the_guard_refusing(config_dir, caplog) -> None:
    with taddons.context() as context:
        context.options.set(
            f"knoxcall_config={config_dir}",
            "knoxcall_reload=no",
            "knoxcall_access_log=a.jsonl",
            "knoxcall_access_log=b.jsonl",
            "knoxcall_ping_interval=1m",
            "knoxcall_confg=elsewhere",
            "unrelated_option=1",
            defer=True,
        )
        addon, monitor = KnoxCall(), ConnectivityMonitor()
        context.master.addons.add(addon, monitor)  # mitmproxy would raise here, and drop both
        assert context.options.knoxcall_config == str(config_dir)  # the valid one is applied
        context.master.addons.invoke_addon_sync(addon, hooks.ConfigureHook({"knoxcall_config"}))
        guard = guard_in(context)
        assert addon.current is not None and not guard.active and in_chain(context, guard)
        assert guard.launch_errors == [
            '--set knoxcall_reload=no: boolean must be "true", "false", or have the value omitted '
            '(a synonym for "true")',
            "knoxcall_access_log is given 2 times (--set knoxcall_access_log=a.jsonl, "
            "--set knoxcall_access_log=b.jsonl); give it once",
            "--set knoxcall_ping_interval=1m: not an integer: 1m",
            "unknown option knoxcall_confg (did you mean knoxcall_config?); the options are knoxcall_access_log, "
            "knoxcall_config, knoxcall_drain_seconds, knoxcall_drain_timeout, knoxcall_metrics, "
            "knoxcall_ping_interval, knoxcall_reload",
        ]
        assert list(context.options.deferred) == ["unrelated_option"]  # not ours to judge
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors[0] == (
            'knoxcall: --set knoxcall_reload=no: boolean must be "true", "false", or have the value omitted '
            '(a synonym for "true"); refusing every request until restarted with valid knoxcall options'
        )
        assert len(errors) == 4
        status = context.command(addon.status_command)
        assert status.startswith("knoxcall: NOT ACTIVE, every request is refused: invalid options at launch: ")


def test_typed_values_from_mitmproxys_config_file_are_checked(config_dir) -> None:
    with taddons.context() as context:
        context.options.update_defer(knoxcall_reload="no", knoxcall_config=str(config_dir))
        context.master.addons.add(KnoxCall())
        guard = guard_in(context)
        assert guard.launch_errors == ["option knoxcall_reload: Expected <class 'bool'> for knoxcall_reload, but got "
                                       "<class 'str'>."]  # fmt: skip


def killed(flow: Flow) -> bool:
    return flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE


def test_guard_refuses_http_with_503_json_and_marks_the_flow() -> None:
    with taddons.context(proxyserver.Proxyserver()) as context:
        guard = launchguard.guard_of(context.master)
        flow = tflow.tflow()
        flow.metadata["knoxcall"] = {"decision": "allowed", "reason": "client", "status": 0}  # KnoxCall was first
        guard.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert json.loads(flow.response.content or b"") == {"error": "Access control inactive", "status": 503}
        assert flow.response.headers["content-type"] == "application/json"
        assert flow.metadata["knoxcall"] == {"decision": "denied", "reason": "knoxcall_inactive", "status": 503}
        assert flow.marked == ":no_entry:"

        head = tflow.tflow()
        head.request.method = "HEAD"
        guard.requestheaders(head)
        assert head.response is not None and head.response.status_code == 503 and head.response.content == b""

        answered = tflow.tflow(resp=True)  # someone answered already: nothing goes upstream anyway
        before = answered.response
        guard.requestheaders(answered)
        assert answered.response is before

        connect = tflow.tflow()
        connect.request.method = "CONNECT"
        guard.http_connect(connect)
        assert connect.response is not None and connect.response.status_code == 503

        context.options.update(stream_large_bodies="1m")  # a streamed body cannot be answered: killed
        streamed = tflow.tflow()
        guard.requestheaders(streamed)
        assert streamed.response is None and killed(streamed)


def test_guard_removes_the_api_key_of_a_refused_request() -> None:
    """mitmweb and saved flows would show the key of a request the guard refused."""
    with taddons.context(proxyserver.Proxyserver()) as context:
        guard = launchguard.guard_of(context.master)
        flow = tflow.tflow()
        flow.request.headers["x-knoxcall-key"] = "guard-unit-secret"
        guard.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert "x-knoxcall-key" not in flow.request.headers


def test_guard_logs_the_callers_path_escaped(caplog) -> None:
    """A control character in the path reaches the operator's terminal as \\x1b, not as itself."""
    with taddons.context(proxyserver.Proxyserver()) as context:
        guard = launchguard.guard_of(context.master)
        flow = tflow.tflow()
        flow.request.path = "/a\x1b[2Jb"
        guard.requestheaders(flow)
    lines = [r.getMessage() for r in caplog.records if "refused GET" in r.getMessage()]
    assert lines and "\x1b" not in lines[-1] and "/a\\x1b[2Jb" in lines[-1]


def test_guard_refuses_raw_flows_dns_connections_and_upstreams() -> None:
    with taddons.context() as context:
        guard = launchguard.guard_of(context.master)
        tcp = tflow.ttcpflow()
        guard.tcp_start(tcp)
        assert killed(tcp) and tcp.metadata["knoxcall"]["reason"] == "knoxcall_inactive"
        udp = tflow.tudpflow()
        guard.udp_start(udp)
        assert killed(udp)

        query = tflow.tdnsflow(resp=True)  # mitmproxy's resolver ran before the guard
        guard.dns_request(query)
        assert query.response is not None and query.response.response_code == response_codes.REFUSED

        raw = tflow.tclient_conn()
        raw.proxy_mode = ProxyMode.parse("reverse:tcp://127.0.0.1:9")
        guard.client_connected(raw)
        assert raw.error == "knoxcall: connection refused (knoxcall_inactive)"
        web = tflow.tclient_conn()
        web.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
        guard.client_connected(web)  # HTTP is answered per request, with a 503
        assert web.error is None

        data = server_hooks.ServerConnectionHookData(tflow.tserver_conn(), tflow.tclient_conn())
        guard.server_connect(data)
        assert data.server.error == "knoxcall: upstream connection refused (knoxcall_inactive)"
        assert guard.refused == 5
