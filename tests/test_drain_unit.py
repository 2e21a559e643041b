"""The drain's parts alone: its options, the Connection: close it adds while draining, /healthz's answer.

The drain itself (SIGTERM, listening stopped, requests in flight answered) runs against real
processes in tests/test_cluster_e2e.py and tests/test_deploy.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from knoxcall_addon import drain as drain_module
from knoxcall_addon.drain import Drain, _Closing
from knoxcall_addon.metrics import Metrics, MetricsServer, State


@pytest.mark.parametrize("name", ["knoxcall_drain_seconds", "knoxcall_drain_timeout"])
def test_a_negative_drain_option_is_an_options_error_and_zero_is_fine(name):
    drain = Drain(lambda: 0)
    with taddons.context(drain) as tctx:
        assert (drain.seconds, drain.timeout) == (drain_module.DEFAULT_SECONDS, drain_module.DEFAULT_TIMEOUT)
        with pytest.raises(exceptions.OptionsError, match=name):
            tctx.configure(drain, **{name: -1})
        tctx.configure(drain, **{name: 0})
        assert getattr(drain, "seconds" if name.endswith("seconds") else "timeout") == 0


def _flow(http2: bool = False, status: int = 200) -> Any:
    flow = tflow.tflow(resp=tutils.tresp(status_code=status))
    if http2:
        flow.request.http_version = flow.response.http_version = "HTTP/2.0"
    return flow


def test_while_draining_http1_responses_close_their_connection_and_are_waited_for():
    closing = _Closing()
    flow = _flow()
    closing.responseheaders(flow)
    assert flow.response.headers["connection"] == "close"
    assert closing.connections == {flow.client_conn.id}
    closing.client_disconnected(flow.client_conn)
    assert closing.connections == set()


@pytest.mark.parametrize(("http2", "status"), [(True, 200), (False, 101)])
def test_http2_and_protocol_switches_keep_their_connection_headers(http2, status):
    closing = _Closing()
    flow = _flow(http2, status)
    before = flow.response.headers.get("connection")
    closing.responseheaders(flow)
    assert flow.response.headers.get("connection") == before
    assert closing.connections == set()


def _healthz(state: State) -> tuple[str, dict[str, Any]]:
    server = MetricsServer(Metrics(), lambda: state, "127.0.0.1", 0)  # never started: the app alone
    seen: list[str] = []
    body = server._app({"PATH_INFO": "/healthz", "REQUEST_METHOD": "GET"}, lambda status, headers: seen.append(status))
    return seen[0], json.loads(b"".join(body))


def test_healthz_says_draining_once_sigterm_came():
    assert _healthz(State(version="abc", ready=True)) == ("200 OK", {"status": "ready", "config_version": "abc"})
    status, body = _healthz(State(version="abc", ready=False, draining=True))
    assert status == "503 Service Unavailable"
    assert body == {"status": "not ready", "reason": "draining: this proxy is stopping (SIGTERM)"}


def test_the_wait_ends_at_the_timeout_while_a_request_stays_in_flight():
    drain = Drain(lambda: 1)  # one request never answered
    drain.timeout = 0
    assert asyncio.run(drain._wait_until_idle()) is False


def test_the_wait_ends_at_once_when_nothing_is_open_or_in_flight():
    drain = Drain(lambda: 0)
    drain.timeout = 30
    assert asyncio.run(asyncio.wait_for(drain._wait_until_idle(), 5)) is True
