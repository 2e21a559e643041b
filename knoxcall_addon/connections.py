"""Connections that carry no request KnoxCall can read: raw TCP/UDP, DNS, raw reverse modes."""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx, dns
from mitmproxy.net.dns import response_codes as dns_response_codes
from mitmproxy.proxy import mode_specs

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
