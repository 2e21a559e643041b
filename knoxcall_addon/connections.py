"""Connections that carry no request KnoxCall can read: CONNECT, raw TCP/UDP, DNS, raw reverse modes.

`ConnectionHooks` holds their mitmproxy hooks; the `KnoxCall` addon composes it with the
HTTP request path (`proxy_addon.py`), whose policy, log and annotations it shares.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from mitmproxy import connection, ctx, dns, http, tcp, udp
from mitmproxy.net.dns import response_codes as dns_response_codes
from mitmproxy.proxy import mode_specs, server_hooks

from knoxcall_addon import metrics
from knoxcall_addon.accesslog import utc_timestamp
from knoxcall_addon.decision import Decision, decide_connection, decide_raw_flow, internal_error
from knoxcall_addon.gate import denial_response, internal_error_response, new_request_id, peer_host

logger = logging.getLogger("knoxcall")

# Reverse modes whose connections can only carry raw traffic, decided at connect time.
RAW_REVERSE_SCHEMES = frozenset({"tcp", "tls", "udp", "dtls", "dns"})


def refused_dns(flow: dns.DNSFlow) -> dns.DNSMessage:
    return flow.request.fail(dns_response_codes.REFUSED)


def decided_at_connect(client: connection.Client) -> bool:
    mode = client.proxy_mode
    return isinstance(mode, mode_specs.ReverseMode) and mode.scheme in RAW_REVERSE_SCHEMES


def close_client_socket(client: connection.Client) -> None:
    """Close the socket of a client whose flow we killed, if mitmproxy left it open.

    mitmproxy 12 race: the kill closes the client connection by cancelling its reader
    task; when that task is waiting for the connection's event lock (the client's next
    body bytes arrived while our hook ran), the cancellation skips the socket's close.
    The caller then waits for an answer until its own timeout. Nothing is forwarded
    either way; this only spares the caller the wait. Internal API, hence the guard.
    """
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        transport = handler.transports.get(client) if handler is not None else None
        writer = transport.writer if transport is not None else None
        if writer is not None and not writer.is_closing():
            writer.close()
            logger.debug(f"knoxcall: closed the socket of killed client {client.id}")
    except Exception:  # the proxy's internals changed: the connection ends at the client's timeout
        logger.debug("knoxcall: could not close a killed client's socket", exc_info=True)


@contextlib.contextmanager
def refusing_on_error(what: str, refuse: Callable[[], None]) -> Iterator[None]:
    """Fail closed: any error while deciding (or logging, or annotating) refuses the flow.

    mitmproxy logs an exception from a hook and then carries on as if the hook had
    allowed the flow; this turns every such error into a refusal.
    """
    try:
        yield
    except Exception:
        logger.exception(f"knoxcall: unexpected error while deciding {what}; refusing it")
        refuse()


class ConnectionHooks:
    """The hooks of connections decided by their peer (CONNECT, raw reverse modes, DNS) or
    refused outright (raw TCP/UDP elsewhere: `decide_raw_flow`). A mixin of `KnoxCall`,
    whose `_policy`, `_version`, `_annotate`, `_write_access_log`, `_log_decision`,
    `_refuse_request`, `metrics`, `_refused` and `_killed` it uses."""

    _policy: Callable[[], Any]
    _version: Callable[[], str]
    _annotate: Callable[..., None]
    _write_access_log: Callable[[dict[str, Any]], None]
    _log_decision: Callable[[Decision, str], str]
    _refuse_request: Callable[[http.HTTPFlow, http.Response], None]
    metrics: Any
    _refused: set[str]
    _killed: set[str]

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT in forward mode: refuse tunnels from peers that nothing could allow."""
        if flow.response or flow.error:
            return
        with refusing_on_error("a CONNECT", lambda: self._refuse_request(flow, internal_error_response(flow))):
            self._decide_connect(flow)

    def _decide_connect(self, flow: http.HTTPFlow) -> None:
        decision, meta, line = self._decide_connection(
            peer_host(flow), flow.request.pretty_host, "CONNECT", tunnel=True
        )
        meta["status"] = 200 if decision.allowed else decision.status
        self._annotate(flow, decision, meta, line)
        self._write_access_log(meta)
        if not decision.allowed:
            flow.response = denial_response(decision, meta["request_id"])

    def client_connected(self, client: connection.Client) -> None:
        """In modes that carry only raw traffic (reverse:tcp, :udp, :dns...), decide at once.

        Setting ``client.error`` here is how mitmproxy's own block addon closes a
        connection before any layer runs.
        """
        if not decided_at_connect(client):
            return
        with refusing_on_error("a connection", lambda: setattr(client, "error", "knoxcall: internal error")):
            self._decide_client(client)

    def _decide_client(self, client: connection.Client) -> None:
        mode = client.proxy_mode
        assert isinstance(mode, mode_specs.ReverseMode)
        decision, meta, _ = self._decide_connection(str(client.peername[0]), mode.address[0], None, tunnel=False)
        self._write_access_log(meta)
        if not decision.allowed:
            client.error = f"knoxcall: connection refused ({decision.reason})"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        with refusing_on_error("a TCP flow", lambda: self._refuse_raw(flow)):
            self._start_raw_flow(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        with refusing_on_error("a UDP flow", lambda: self._refuse_raw(flow)):
            self._start_raw_flow(flow)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A refused raw flow never reaches its server (mitmproxy ignores kill() at tcp_start)."""
        if data.client.id in self._refused:
            data.server.error = "knoxcall: connection refused"

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Belt and braces: nothing of a refused flow is relayed, even if a server was connected."""
        if flow.client_conn.id in self._refused and flow.messages:
            flow.messages[-1].content = b""

    def udp_message(self, flow: udp.UDPFlow) -> None:
        if flow.client_conn.id in self._refused and flow.messages:
            flow.messages[-1].content = b""

    def client_disconnected(self, client: connection.Client) -> None:
        self._refused.discard(client.id)
        if client.id in self._killed:
            self._killed.discard(client.id)
            close_client_socket(client)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        if flow.response or flow.error or decided_at_connect(flow.client_conn):
            return
        with refusing_on_error("a DNS request", lambda: setattr(flow, "response", refused_dns(flow))):
            self._decide_dns(flow)

    def _decide_dns(self, flow: dns.DNSFlow) -> None:
        decision, meta, line = self._decide_connection(peer_host(flow), None, "DNS", tunnel=False)
        self._annotate(flow, decision, meta, line)
        self._write_access_log(meta)
        if not decision.allowed:
            flow.response = refused_dns(flow)

    def _start_raw_flow(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        """Refuse a TCP/UDP flow (see decide_raw_flow): it is cut off from its server.

        Only the raw reverse modes carry raw traffic, decided when the client connects.
        """
        if flow.client_conn.id in self._refused or decided_at_connect(flow.client_conn):
            return
        host = str(flow.server_conn.address[0]) if flow.server_conn.address else None
        decision, meta, line = self._decide_connection(peer_host(flow), host, None, tunnel=False, raw=True)
        self._annotate(flow, decision, meta, line)
        self._write_access_log(meta)
        if not decision.allowed:
            self._refuse_raw(flow)

    def _refuse_raw(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        """Cut a raw flow off its server: no connection, nothing relayed (see server_connect)."""
        self._refused.add(flow.client_conn.id)
        if flow.killable:
            flow.kill()

    def _decide_connection(
        self, peer: str, host: str | None, method: str | None, *, tunnel: bool, raw: bool = False
    ) -> tuple[Decision, dict[str, Any], str]:
        """Decide a connection that carries no request we can read; log the decision.

        Returns the decision, the flow's metadata and the log line (the flow's comment too)."""
        request_id = new_request_id()
        try:
            policy = self._policy()
            decision = decide_raw_flow(policy, peer) if raw else decide_connection(policy, peer, tunnel=tunnel)
        except Exception as e:
            logger.exception(f"knoxcall: error while deciding connection {request_id}; denying it")
            decision = internal_error(peer, peer, f"{type(e).__name__}: {e}", self._version())
        meta: dict[str, Any] = {
            "request_id": request_id,
            "method": method,
            "host": host,
            "path": None,
            **decision.fields(),
            "status": None,  # a raw connection has no status; "decision" says it all
            "ts": utc_timestamp(time.time()),
        }
        line = self._log_decision(decision, request_id)
        if self.metrics is not None:
            self.metrics.connection_decided(decision, metrics.connection_kind(tunnel, raw, method))
        return decision, meta, line

