"""The mitmproxy adapter: options, hooks and flow annotations around the pure decision.

Fail closed everywhere: a hook that raises would let mitmproxy forward the request,
so every hook catches its own errors and denies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import command, connection, ctx, dns, exceptions, http, tcp, udp
from mitmproxy.net.dns import response_codes as dns_response_codes
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs, server_hooks

from knoxcall_addon.accesslog import AccessLog, utc_timestamp
from knoxcall_addon.configdiff import diff_configs
from knoxcall_addon.decision import (
    ENVIRONMENT_HEADER,
    HEADER_PREFIX,
    KEY_HEADER,
    REQUEST_ID_HEADER,
    ROUTE_HEADER,
    Decision,
    RequestFacts,
    decide,
    decide_connection,
    internal_error,
)
from knoxcall_addon.explain import explain_text
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.reloader import HotReload

logger = logging.getLogger("knoxcall")

METADATA_KEY = "knoxcall"
DENIED_MARKER = ":no_entry:"
# Reverse modes whose connections can only carry raw traffic, decided at connect time.
RAW_REVERSE_SCHEMES = frozenset({"tcp", "tls", "udp", "dtls", "dns"})


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy and when it came into force; replaced by one assignment on reload."""

    policy: Policy
    loaded_at: float


class KnoxCall:
    """Client IP authorization per route and environment."""

    def __init__(self) -> None:
        self.current: LoadedPolicy | None = None
        self.access_log: AccessLog | None = None
        self._pending: set[str] = set()  # ids of HTTP flows decided but not yet access-logged
        self.reload = HotReload(self.install, lambda: self.current.policy if self.current else None)
        self._reload_enabled = True
        self._running = False
        self.uninspected_tunnels = False  # ignore_hosts/allow_hosts: some tunnels are never inspected
        self._refused: set[str] = set()  # ids of client connections whose raw flows were refused
        self.streaming_bodies = False  # stream_large_bodies is set: denied bodies may be streamed

    # -- options -----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "knoxcall_config",
            str,
            "config",
            "Folder of KnoxCall YAML files (clients, routes, environments, assignments).",
        )
        loader.add_option(
            "knoxcall_access_log",
            str,
            "",
            "File to append one JSON line per request to; empty for none.",
        )
        loader.add_option(
            "knoxcall_reload",
            bool,
            True,
            "Watch the config folder and put valid edits in force without a restart.",
        )

    def configure(self, updated: set[str]) -> None:
        repoint = False
        if "knoxcall_config" in updated:
            folder = ctx.options.knoxcall_config
            # Unchanged folder (e.g. mitmproxy rolling back a failed change): keep the
            # policy in force; the watcher and knoxcall.reload handle its edits.
            if self.current is None or str(Path(folder)) != self.current.policy.config.folder:
                try:
                    policy = load_policy(folder)
                except ConfigError as e:
                    # At start this makes mitmproxy log an error and exit; later it rolls
                    # the option back, so the previous policy stays in force.
                    raise exceptions.OptionsError(f"knoxcall: invalid config in {folder}:\n{e}") from None
                previous = self.current.policy.config if self.current else None
                note = f"was {previous.version}: {diff_configs(previous, policy.config).summary()}" if previous else ""
                self.install(policy, note)
                self.reload.set_folder(folder, policy)
                repoint = True
        if "knoxcall_reload" in updated:
            self._reload_enabled = ctx.options.knoxcall_reload
            repoint = True
        if repoint and self._running:
            self._start_watcher()
        if "ignore_hosts" in updated or "allow_hosts" in updated:
            # Ignored hosts' tunnels carry raw TCP that no addon hook ever sees, so a
            # CONNECT can no longer count on the requests inside being decided.
            self.uninspected_tunnels = bool(ctx.options.ignore_hosts or ctx.options.allow_hosts)
        if "stream_large_bodies" in updated:
            self.streaming_bodies = bool(ctx.options.stream_large_bodies)
        if "knoxcall_access_log" in updated:
            if self.access_log:
                self.access_log.close()
                self.access_log = None
            if ctx.options.knoxcall_access_log:
                try:
                    self.access_log = AccessLog(ctx.options.knoxcall_access_log)
                except OSError as e:
                    raise exceptions.OptionsError(f"knoxcall: cannot open access log: {e}") from None

    def install(self, policy: Policy, note: str = "") -> None:
        """Put a compiled policy in force: one reference assignment (on the event loop).

        ``note`` (what changed, from the reload) is appended to the log line, which
        stays one line: the event log is the audit trail of policy changes.
        """
        self.current = LoadedPolicy(policy, time.time())
        config = policy.config
        logger.info(
            f"knoxcall: config {policy.version} loaded from {config.folder}: "
            f"{len(config.clients)} clients, {len(policy.clients_by_ip)} ranges, "
            f"{len(config.routes)} routes, {len(config.environments)} environments, "
            f"{len(config.assignments)} assignments" + (f"; {note}" if note else "")
        )

    def running(self) -> None:
        """Only now start watching: an error logged during startup would make mitmproxy exit."""
        self._running = True
        self._start_watcher()

    def _start_watcher(self) -> None:
        try:
            self.reload.stop()
            if self._reload_enabled:
                self.reload.start(asyncio.get_running_loop())
        except Exception:
            # WARNING, not ERROR: at startup an ERROR makes mitmproxy exit; the policy
            # in force is fine, only edits need knoxcall.reload now.
            logger.warning("knoxcall: cannot watch the config folder; use knoxcall.reload after edits", exc_info=True)
            self.reload.stop()

    @command.command("knoxcall.reload")
    def reload_command(self) -> str:
        """Reload the config folder now; says what changed, or why nothing did."""
        try:
            message = self.reload.reload_now()
        except Exception as e:
            logger.exception("knoxcall: reload failed; the config in force is unchanged")
            message = f"reload failed, config in force unchanged: {type(e).__name__}: {e}"
        return f"knoxcall: {message}"

    @command.command("knoxcall.status")
    def status_command(self) -> str:
        """Config folder, version, counts, hot reload state and the last reload error."""
        lines = status_lines(self.current, self.reload, self._reload_enabled)
        monitor = ctx.master.addons.get("connectivitymonitor")
        monitor_lines = getattr(monitor, "status_lines", None)
        if callable(monitor_lines):
            try:
                lines.extend(monitor_lines())
            except Exception as e:
                lines.append(f"connectivity monitor: status unavailable ({type(e).__name__}: {e})")
        return "\n".join(lines)

    def done(self) -> None:
        self._running = False
        try:
            self.reload.stop()
        except Exception:
            logger.warning("knoxcall: stopping the config watcher failed", exc_info=True)
        if self.access_log:
            self.access_log.close()
            self.access_log = None

    @command.command("knoxcall.explain")
    def explain(self, ip: str, route: str, env: str = "") -> str:
        """The decision for a caller IP on a route (and environment), and why; as `knoxcall explain`."""
        if self.current is None:
            return "no policy loaded: every request is denied"
        return explain_text(self.current.policy, ip, route, env or None)

    # -- HTTP --------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Decide as soon as the headers are in, before any body is read or forwarded."""
        if flow.response or flow.error:
            return
        # A replayed flow (mitmweb's "replay") passes here again and is decided again.
        request_id = uuid.uuid4().hex
        request = flow.request
        seen = {
            "method": request.method,
            "host": request.pretty_host,
            "path": request.path,
            "user_agent": request.headers.get("user-agent"),
        }
        try:
            current = self.current
            if current is None:
                raise RuntimeError("no policy loaded")
            decision = decide(current.policy, request_facts(flow, current.policy))
            if decision.allowed:
                forward(flow, decision)
        except Exception as e:
            logger.exception(f"knoxcall: error while deciding request {request_id}; denying it")
            peer = peer_host(flow)
            decision = internal_error(peer, peer, f"{type(e).__name__}: {e}", self._version())
        meta = {"request_id": request_id, **seen, **decision.fields()}
        self._log_decision(decision, request_id)
        self._annotate(flow, decision, meta)
        self._pending.add(flow.id)
        if not decision.allowed:
            may_stream = flow.request.stream or (self.streaming_bodies and _body_size_unknown(request))
            if may_stream and flow.killable:
                # stream_large_bodies: mitmproxy streams this body (or will, once a chunked
                # body of unknown size grows past the limit) and cannot also answer the
                # request: it raises, and the caller hangs with no answer at all. Close
                # the connection instead; nothing goes upstream either way.
                flow.kill()
            else:
                flow.response = denial_response(decision, request_id, request.method)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT in forward mode: refuse tunnels from peers that nothing could allow."""
        if flow.response or flow.error:
            return
        decision, meta = self._decide_connection(
            peer_host(flow), flow.request.pretty_host, "CONNECT", tunnel=not self.uninspected_tunnels
        )
        meta["status"] = 200 if decision.allowed else decision.status
        self._annotate(flow, decision, meta)
        self._write_access_log(meta)
        if not decision.allowed:
            flow.response = denial_response(decision, meta["request_id"])

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Every response we make or forward carries the request id (also when streamed)."""
        meta = flow.metadata.get(METADATA_KEY)
        if meta and flow.response is not None:
            flow.response.headers[REQUEST_ID_HEADER] = meta["request_id"]

    def response(self, flow: http.HTTPFlow) -> None:
        self._complete(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._complete(flow)

    # -- raw connections: TCP, UDP, DNS ------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        """In modes that carry only raw traffic (reverse:tcp, :udp, :dns...), decide at once.

        Setting ``client.error`` here is how mitmproxy's own block addon closes a
        connection before any layer runs.
        """
        if not _decided_at_connect(client):
            return
        mode = client.proxy_mode
        assert isinstance(mode, mode_specs.ReverseMode)
        decision, meta = self._decide_connection(str(client.peername[0]), mode.address[0], None, tunnel=False)
        self._write_access_log(meta)
        if not decision.allowed:
            client.error = f"knoxcall: connection refused ({decision.reason})"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._start_raw_flow(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
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

    def dns_request(self, flow: dns.DNSFlow) -> None:
        if flow.response or flow.error or _decided_at_connect(flow.client_conn):
            return
        decision, meta = self._decide_connection(peer_host(flow), None, "DNS", tunnel=False)
        self._annotate(flow, decision, meta)
        self._write_access_log(meta)
        if not decision.allowed:
            flow.response = flow.request.fail(dns_response_codes.REFUSED)

    def _start_raw_flow(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        """Decide a TCP/UDP flow by its peer; a refused one is cut off from its server."""
        if flow.client_conn.id in self._refused or _decided_at_connect(flow.client_conn):
            return
        host = str(flow.server_conn.address[0]) if flow.server_conn.address else None
        decision, meta = self._decide_connection(peer_host(flow), host, None, tunnel=False)
        self._annotate(flow, decision, meta)
        self._write_access_log(meta)
        if not decision.allowed:
            self._refused.add(flow.client_conn.id)
            if flow.killable:
                flow.kill()

    # -- internals ---------------------------------------------------------------------

    def _version(self) -> str:
        return self.current.policy.version if self.current else ""

    def _decide_connection(
        self, peer: str, host: str | None, method: str | None, *, tunnel: bool
    ) -> tuple[Decision, dict[str, Any]]:
        """Decide a connection that carries no request we can read; log the decision."""
        request_id = uuid.uuid4().hex
        try:
            current = self.current
            if current is None:
                raise RuntimeError("no policy loaded")
            decision = decide_connection(current.policy, peer, tunnel=tunnel)
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
        self._log_decision(decision, request_id)
        return decision, meta

    def _log_decision(self, decision: Decision, request_id: str) -> None:
        line = f"{decision.summary()} id={request_id}"
        if decision.allowed:
            logger.info(line)
        elif decision.reason == "internal_error":
            logger.error(line)
        else:
            logger.warning(line)

    def _annotate(self, flow: Any, decision: Decision, meta: dict[str, Any]) -> None:
        """What mitmweb shows: the comment, a mark on denials, and the metadata."""
        flow.metadata[METADATA_KEY] = meta
        flow.comment = f"{decision.summary()} id={meta['request_id']}"
        if not decision.allowed:
            flow.marked = DENIED_MARKER

    def _complete(self, flow: http.HTTPFlow) -> None:
        """Write the access log line once, when the request is answered or fails."""
        if flow.id not in self._pending:
            return
        self._pending.discard(flow.id)
        meta = dict(flow.metadata[METADATA_KEY])
        meta["status"] = flow.response.status_code if flow.response else None
        meta["latency_ms"] = round((time.time() - flow.request.timestamp_start) * 1000, 3)
        meta["ts"] = utc_timestamp(flow.request.timestamp_start)
        self._write_access_log(meta)

    def _write_access_log(self, record: dict[str, Any]) -> None:
        if self.access_log is None:
            return
        try:
            self.access_log.write(record)
        except Exception:
            logger.exception("knoxcall: cannot write the access log")


def status_lines(current: LoadedPolicy | None, reload: HotReload, enabled: bool = True) -> list[str]:
    """What ``knoxcall.status`` says about the config, one fact per line."""
    if current is None:
        return ["knoxcall: no config loaded (every request is denied)"]
    policy, config = current.policy, current.policy.config
    age = max(0, round(time.time() - current.loaded_at))
    if reload.watching and reload.watcher is not None and reload.watcher.watched:
        watching = "on, watching " + ", ".join(str(p) for p in reload.watcher.watched)
    elif reload.watching:
        watching = "on, but the folder cannot be watched (see the event log); use knoxcall.reload after edits"
    elif enabled:
        watching = "off: the watcher could not start (see the event log); use knoxcall.reload after edits"
    else:
        watching = "off (knoxcall_reload=false); use knoxcall.reload after edits"
    lines = [
        f"knoxcall: config folder {config.folder} ({len(config.files)} files)",
        f"version: {policy.version}, loaded {utc_timestamp(current.loaded_at)} ({age} s ago)",
        f"counts: {len(config.clients)} clients, {len(policy.clients_by_ip)} ranges, {len(config.routes)} routes, "
        f"{len(config.environments)} environments, {len(config.assignments)} assignments, "
        f"{len(config.api_keys)} api keys",
        f"hot reload: {watching}; {reload.reloads} reloads since start",
    ]
    if reload.last_error:
        when = utc_timestamp(reload.last_error_at) if reload.last_error_at else "?"
        lines.append(f"last reload error ({when}, still serving {policy.version}): {reload.last_error}")
    else:
        lines.append("last reload error: none")
    return lines


def _decided_at_connect(client: connection.Client) -> bool:
    mode = client.proxy_mode
    return isinstance(mode, mode_specs.ReverseMode) and mode.scheme in RAW_REVERSE_SCHEMES


def _body_size_unknown(request: http.Request) -> bool:
    """May this request carry a body whose size mitmproxy learns only while reading it?"""
    if "transfer-encoding" in request.headers:
        return True
    # HTTP/2 and 3 bodies need no content-length; methods without a body usually end the
    # stream with the headers (which this hook cannot see).
    return (
        (request.is_http2 or request.is_http3)
        and "content-length" not in request.headers
        and request.method not in ("GET", "HEAD", "OPTIONS", "DELETE", "TRACE")
    )


def peer_host(flow: Any) -> str:
    """The TCP peer's host as mitmproxy reports it (peername may be a 4-tuple)."""
    peername = flow.client_conn.peername
    return str(peername[0]) if peername else ""


def request_facts(flow: http.HTTPFlow, policy: Policy) -> RequestFacts:
    """Read what the decision needs from the flow; the header names come from the policy."""
    request = flow.request
    headers = request.headers
    mode = flow.client_conn.proxy_mode
    others: list[str] = []
    if isinstance(mode, mode_specs.ReverseMode):
        # In reverse mode the destination is fixed by the proxy or the route, so the
        # Host the client asked for is what selects the route.
        host = request.pretty_host
        if request.authority and not (request.is_http2 or request.is_http3):
            # HTTP/1 absolute-form: an upstream takes the URL's host over Host.
            others.append(request.authority)
    else:
        # Elsewhere the request goes where request.host says: match that, never a
        # Host header that could name another (open) route.
        host = request.host
        if isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode):
            # The client chose request.host (URL or CONNECT); the Host header and the TLS
            # SNI it sends on are what a virtual-hosting upstream serves: they must agree.
            if request.host_header:
                others.append(request.host_header)
            if flow.client_conn.tls and flow.client_conn.sni:
                others.append(flow.client_conn.sni)
    return RequestFacts(
        peer=peer_host(flow),
        method=request.method,
        host=host.lower().rstrip("."),
        path=request.path,
        route=headers.get(ROUTE_HEADER),
        environment=headers.get(ENVIRONMENT_HEADER),
        api_key=headers.get(KEY_HEADER),
        forwarded_for=tuple(headers.get_all(policy.settings.client_ip_header)),
        other_hosts=tuple(_authority_host(name) for name in others),
    )


def _authority_host(authority: str) -> str:
    """The host of a Host header or authority (port removed); as it is when unparsable."""
    try:
        return url.parse_authority(authority, check=False)[0]
    except ValueError:
        return authority


def forward(flow: http.HTTPFlow, decision: Decision) -> None:
    """Prepare an allowed request for upstream: strip our headers, extend XFF, re-target."""
    request = flow.request
    for name in [n for n in request.headers if n.lower().startswith(HEADER_PREFIX)]:
        del request.headers[name]
    peer = decision.peer_ip or peer_host(flow)
    existing = request.headers.get_all("X-Forwarded-For")
    request.headers["X-Forwarded-For"] = ", ".join([*existing, peer]) if existing else peer
    if decision.target_url:
        target = urlsplit(decision.target_url)
        request.scheme = target.scheme
        request.host = target.hostname or ""
        request.port = target.port or (443 if target.scheme == "https" else 80)
        base = target.path.rstrip("/")
        if base:
            request.path = base + (request.path if request.path.startswith("/") else "/" + request.path)
        request.host_header = _authority(target.scheme, request.host, request.port)


def _authority(scheme: str, host: str, port: int) -> str:
    default = 443 if scheme == "https" else 80
    host_text = f"[{host}]" if ":" in host else host
    return host_text if port == default else f"{host_text}:{port}"


def denial_response(decision: Decision, request_id: str, method: str = "GET") -> http.Response:
    body = {**decision.body, "request_id": request_id}
    headers = {
        "Content-Type": "application/json",
        REQUEST_ID_HEADER: request_id,
        "Cache-Control": "no-store",
    }
    if decision.allow_methods:
        headers["Allow"] = ", ".join(decision.allow_methods)
    # A response to HEAD has no body, and mitmproxy sends whatever content a response made
    # by an addon has: the body's bytes would be read as the start of the next response
    # on a keep-alive connection.
    content = b"" if method.upper() == "HEAD" else json.dumps(body).encode()
    return http.Response.make(decision.status, content, headers)
