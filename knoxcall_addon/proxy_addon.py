"""The mitmproxy adapter: options, hooks and flow annotations around the pure decision.

Fail closed everywhere: a hook that raises would let mitmproxy forward the request,
so every hook catches its own errors and denies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import command, connection, ctx, dns, exceptions, http, tcp, udp
from mitmproxy import log as mitmproxy_log
from mitmproxy.net.dns import response_codes as dns_response_codes
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs, server_hooks

from knoxcall_addon import launchguard
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
    request_facts_of,
)
from knoxcall_addon.explain import explain_text
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.reloader import HotReload, release_free_memory

logger = logging.getLogger("knoxcall")

METADATA_KEY = "knoxcall"
DENIED_MARKER = ":no_entry:"
# Reverse modes whose connections can only carry raw traffic, decided at connect time.
RAW_REVERSE_SCHEMES = frozenset({"tcp", "tls", "udp", "dtls", "dns"})

_PREFIX_BYTES = HEADER_PREFIX.encode()
_XFF_BYTES = b"x-forwarded-for"
# Marks the per-decision log lines, see _SkipLegacyLogEvents.
_DECISION_LINE = {"knoxcall_decision_line": True}


class _SkipLegacyLogEvents(logging.Filter):
    """Keeps per-decision lines out of mitmproxy's deprecated ``add_log`` events.

    mitmproxy turns every log record into an ``add_log`` event dispatched to every
    addon (for pre-9 addons; none of mitmproxy's own use it). One line per request
    made that a second full addon dispatch per request, ~7% of mitmdump's throughput.
    The lines still reach every logging handler: the terminal, mitmweb's event log, and
    any handler on the "knoxcall" logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "knoxcall_decision_line", False)


_SKIP_LEGACY = _SkipLegacyLogEvents()


def _emit(level: int, line: str) -> None:
    """``logger.log(level, line)`` without ``findCaller``'s stack walk (a third of its cost).

    Same record to the same handlers and filters, only without a source file and line,
    which a decision line does not need. One per request, so it counts. No record is made
    when no handler would take it (see `_taken`).
    """
    if logger.isEnabledFor(level) and _taken(level):
        logger.handle(logger.makeRecord(logger.name, level, "", 0, line, (), None, extra=_DECISION_LINE))


def _taken(level: int) -> bool:
    """Would any handler see a decision line of this level? What ``Logger.callHandlers`` checks first.

    In mitmdump with ``termlog_verbosity=warn`` every handler drops an allowed request's
    INFO line (the terminal by its level, mitmproxy's error check below ERROR, the legacy
    ``add_log`` events by our filter), and the record was made for nobody: about a fifth of
    what KnoxCall costs mitmdump per request. Looked up on every call, so a handler added or
    a level changed at any time (``:set termlog_verbosity=info``) gets the next line. A
    filter on the "knoxcall" logger itself, or no handler at all (logging's last resort),
    counts as taking it: the record is then made as before.
    """
    if logger.filters:
        return True
    node: logging.Logger | None = logger
    found = False
    while node is not None:
        for handler in node.handlers:
            found = True
            if level >= handler.level and _SKIP_LEGACY not in handler.filters:
                return True
        if not node.propagate:
            break
        node = node.parent  # type: ignore[assignment]
    return not found


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
        self._killed: set[str] = set()  # ids of client connections whose HTTP flow we killed

    # -- options -----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, mitmproxy_log.LegacyLogEvents):
                handler.addFilter(_SKIP_LEGACY)
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
        launchguard.check_options(loader)  # before mitmproxy applies --set values: a bad one drops the script

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
                del previous
                release_free_memory()  # what loading needed beyond what the policy keeps
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
        launchguard.activate(self)  # a policy in force: our hooks decide; until then the guard refuses all
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
        lines = [*launchguard.status_lines(self), *status_lines(self.current, self.reload, self._reload_enabled)]
        monitor = ctx.master.addons.get("connectivitymonitor")
        monitor_lines = getattr(monitor, "status_lines", None)
        if callable(monitor_lines):
            try:
                lines.extend(monitor_lines())
            except Exception as e:
                lines.append(f"connectivity monitor: status unavailable ({type(e).__name__}: {e})")
        return "\n".join(lines)

    def done(self) -> None:
        launchguard.deactivate(self)  # first: from here on our hooks are gone
        for handler in logging.getLogger().handlers:
            handler.removeFilter(_SKIP_LEGACY)
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
        # refusing_on_error spelled out: this runs once per request, the context manager
        # cost a microsecond each time
        try:
            self._decide_request(flow)
        except Exception:
            logger.exception("knoxcall: unexpected error while deciding a request; refusing it")
            self._refuse_request(flow, _internal_error_response(flow))

    def _decide_request(self, flow: http.HTTPFlow) -> None:
        # A replayed flow (mitmweb's "replay") passes here again and is decided again.
        request_id = new_request_id()
        request = flow.request
        # what the caller sent, before forward() re-targets the request
        method = request.method
        path = request.path
        try:
            policy = self._policy()
            facts, caller_host, user_agent = read_request(flow, policy, method, path)
            decision = decide(policy, facts)
            if decision.allowed:
                forward(flow, decision)
        except Exception as e:
            logger.exception(f"knoxcall: error while deciding request {request_id}; denying it")
            peer = peer_host(flow)
            decision = internal_error(peer, peer, f"{type(e).__name__}: {e}", self._version())
            caller_host = requested_host(request)
            user_agent = request.headers.get("user-agent")
        meta = {
            "request_id": request_id,
            "method": method,
            "host": caller_host,
            "path": path,
            "user_agent": user_agent,
            **decision.fields(),
        }
        line = self._log_decision(decision, request_id)
        self._annotate(flow, decision, meta, line)
        self._pending.add(flow.id)
        if not decision.allowed:
            self._refuse_request(flow, denial_response(decision, request_id, request.method))

    def _refuse_request(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Answer a refused request with ``response``, or close it when that cannot be done.

        stream_large_bodies: mitmproxy streams this body (or will, once a chunked body of
        unknown size grows past the limit) and cannot also answer the request: it raises,
        and the caller hangs with no answer at all. Close the connection instead; nothing
        goes upstream either way.
        """
        flow.marked = DENIED_MARKER
        may_stream = flow.request.stream or (self.streaming_bodies and _body_size_unknown(flow.request))
        if may_stream and flow.killable:
            flow.kill()
            self._killed.add(flow.client_conn.id)
        else:
            flow.response = response

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT in forward mode: refuse tunnels from peers that nothing could allow."""
        if flow.response or flow.error:
            return
        with refusing_on_error("a CONNECT", lambda: self._refuse_request(flow, _internal_error_response(flow))):
            self._decide_connect(flow)

    def _decide_connect(self, flow: http.HTTPFlow) -> None:
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
            headers = flow.response.headers
            fields = headers.fields
            for name, _ in fields:
                if name.lower() == _REQUEST_ID_BYTES:  # an upstream sent one: ours replaces it
                    headers[REQUEST_ID_HEADER] = meta["request_id"]
                    return
            # headers[REQUEST_ID_HEADER] = ... for a name not there yet, without its second scan
            headers.fields = (*fields, (_REQUEST_ID_BYTES, meta["request_id"].encode()))

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
        with refusing_on_error("a connection", lambda: setattr(client, "error", "knoxcall: internal error")):
            self._decide_client(client)

    def _decide_client(self, client: connection.Client) -> None:
        mode = client.proxy_mode
        assert isinstance(mode, mode_specs.ReverseMode)
        decision, meta = self._decide_connection(str(client.peername[0]), mode.address[0], None, tunnel=False)
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
            _close_client_socket(client)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        if flow.response or flow.error or _decided_at_connect(flow.client_conn):
            return
        with refusing_on_error("a DNS request", lambda: setattr(flow, "response", _refused_dns(flow))):
            self._decide_dns(flow)

    def _decide_dns(self, flow: dns.DNSFlow) -> None:
        decision, meta = self._decide_connection(peer_host(flow), None, "DNS", tunnel=False)
        self._annotate(flow, decision, meta)
        self._write_access_log(meta)
        if not decision.allowed:
            flow.response = _refused_dns(flow)

    def _start_raw_flow(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        """Decide a TCP/UDP flow by its peer; a refused one is cut off from its server."""
        if flow.client_conn.id in self._refused or _decided_at_connect(flow.client_conn):
            return
        host = str(flow.server_conn.address[0]) if flow.server_conn.address else None
        decision, meta = self._decide_connection(peer_host(flow), host, None, tunnel=False)
        self._annotate(flow, decision, meta)
        self._write_access_log(meta)
        if not decision.allowed:
            self._refuse_raw(flow)

    def _refuse_raw(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        """Cut a raw flow off its server: no connection, nothing relayed (see server_connect)."""
        self._refused.add(flow.client_conn.id)
        if flow.killable:
            flow.kill()

    # -- internals ---------------------------------------------------------------------

    def _version(self) -> str:
        return self.current.policy.version if self.current else ""

    def _policy(self) -> Policy:
        """The policy in force; none (only after a failed start) is an error, so: deny."""
        if self.current is None:
            raise RuntimeError("no policy loaded")
        return self.current.policy

    def _decide_connection(
        self, peer: str, host: str | None, method: str | None, *, tunnel: bool
    ) -> tuple[Decision, dict[str, Any]]:
        """Decide a connection that carries no request we can read; log the decision."""
        request_id = new_request_id()
        try:
            decision = decide_connection(self._policy(), peer, tunnel=tunnel)
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

    def _log_decision(self, decision: Decision, request_id: str) -> str:
        """Write the event log line; return it (it is also the flow's comment)."""
        line = f"{decision.summary()} id={request_id}"
        if decision.reason == "internal_error":
            logger.error(line)
        else:
            _emit(logging.INFO if decision.allowed else logging.WARNING, line)
        return line

    def _annotate(self, flow: Any, decision: Decision, meta: dict[str, Any], line: str | None = None) -> None:
        """What mitmweb shows: the comment, a mark on denials, and the metadata."""
        flow.metadata[METADATA_KEY] = meta
        flow.comment = line if line is not None else f"{decision.summary()} id={meta['request_id']}"
        if not decision.allowed:
            flow.marked = DENIED_MARKER

    def _complete(self, flow: http.HTTPFlow) -> None:
        """Write the access log line once, when the request is answered or fails."""
        if flow.id not in self._pending:
            return
        self._pending.discard(flow.id)
        if self.access_log is None:
            return  # nothing to write: skip building the record
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


def _internal_error_response(flow: http.HTTPFlow) -> http.Response:
    """The simplest possible denial, for when building the normal one failed."""
    body = b"" if flow.request.method.upper() == "HEAD" else b'{"error": "Internal error", "status": 500}'
    return http.Response.make(500, body, {"Content-Type": "application/json"})


def _refused_dns(flow: dns.DNSFlow) -> dns.DNSMessage:
    return flow.request.fail(dns_response_codes.REFUSED)


def _decided_at_connect(client: connection.Client) -> bool:
    mode = client.proxy_mode
    return isinstance(mode, mode_specs.ReverseMode) and mode.scheme in RAW_REVERSE_SCHEMES


def _close_client_socket(client: connection.Client) -> None:
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


_REQUEST_ID_PREFIX = os.urandom(8).hex()
# n -> n * odd + offset (mod 2**64) is a bijection: ids stay unique, but do not show a
# caller how many requests the proxy has served.
_REQUEST_ID_FACTOR = int.from_bytes(os.urandom(8)) | 1
_REQUEST_ID_OFFSET = int.from_bytes(os.urandom(8))
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """32 hex digits, unique per request: a random per-process half and a scrambled counter.

    Cheaper than uuid4 (no system call per request); ids from different proxies or
    restarts differ by their random half.
    """
    n = next(_request_counter) * _REQUEST_ID_FACTOR + _REQUEST_ID_OFFSET
    return f"{_REQUEST_ID_PREFIX}{n & 0xFFFFFFFFFFFFFFFF:016x}"


def peer_host(flow: Any) -> str:
    """The TCP peer's host as mitmproxy reports it (peername may be a 4-tuple)."""
    peername = flow.client_conn.peername
    return str(peername[0]) if peername else ""


def requested_host(request: http.Request) -> str:
    """``request.pretty_host`` without its cost: the Host header's (or authority's) host."""
    authority = request.host_header
    return _authority_host(authority) if authority else request.host


def request_facts(flow: http.HTTPFlow, policy: Policy) -> RequestFacts:
    """Read what the decision needs from the flow; the header names come from the policy."""
    return read_request(flow, policy)[0]


def read_request(
    flow: http.HTTPFlow, policy: Policy, method: str | None = None, path: str | None = None
) -> tuple[RequestFacts, str, str | None]:
    """(the decision's facts, the host the caller asked for, its User-Agent), in one pass over the headers.

    The caller host is `requested_host`'s; ``method`` and ``path`` are the request's, when
    the caller has read them already.
    """
    request = flow.request
    # One pass over the raw fields instead of a Headers lookup per name (each a full scan).
    # Same values as headers.get (repeated headers folded with ", ") and get_all.
    # (lists made only for the names present: fewer objects per request for the GC)
    forwarded_name = policy.settings.client_ip_header.lower().encode("utf-8", "surrogateescape")
    ours: dict[bytes, list[bytes]] | None = None
    forwarded: list[str] | None = None
    host_fields: list[bytes] | None = None
    agents: list[bytes] | None = None
    for name, value in request.headers.fields:
        lower = name.lower()
        if lower == forwarded_name:
            if forwarded is None:
                forwarded = []
            forwarded.append(value.decode("utf-8", "surrogateescape"))
        if lower.startswith(_PREFIX_BYTES):
            if ours is None:
                ours = {}
            if lower in ours:
                ours[lower].append(value)
            else:
                ours[lower] = [value]
        elif lower == b"host":
            if host_fields is None:
                host_fields = []
            host_fields.append(value)
        elif lower == b"user-agent":
            if agents is None:
                agents = []
            agents.append(value)
    if ours is None:
        ours = _NONE_OF_OURS
    http2 = request.is_http2 or request.is_http3
    # request.host_header, from the fields read above
    host_header = (request.authority or _folded(host_fields)) if http2 else _folded(host_fields)
    caller_host = _authority_host(host_header) if host_header else request.host
    mode = flow.client_conn.proxy_mode
    others: list[str] = []
    if isinstance(mode, mode_specs.ReverseMode):
        # In reverse mode the destination is fixed by the proxy or the route, so the
        # Host the client asked for is what selects the route.
        host = caller_host
        if not http2 and request.authority:
            # HTTP/1 absolute-form: an upstream takes the URL's host over Host.
            others.append(request.authority)
    else:
        # Elsewhere the request goes where request.host says: match that, never a
        # Host header that could name another (open) route.
        host = request.host
        if isinstance(mode, mode_specs.RegularMode | mode_specs.UpstreamMode):
            # The client chose request.host (URL or CONNECT); the Host header and the TLS
            # SNI it sends on are what a virtual-hosting upstream serves: they must agree.
            if host_header:
                others.append(host_header)
            if flow.client_conn.tls and flow.client_conn.sni:
                others.append(flow.client_conn.sni)
    facts = request_facts_of(
        peer=peer_host(flow),
        method=request.method if method is None else method,
        host=host.lower().rstrip("."),
        path=request.path if path is None else path,
        route=_folded(ours.get(_ROUTE_BYTES)),
        environment=_folded(ours.get(_ENVIRONMENT_BYTES)),
        api_key=_folded(ours.get(_KEY_BYTES)),
        forwarded_for=tuple(forwarded) if forwarded else (),
        other_hosts=tuple(_authority_host(name) for name in others if not _same_host(name, host)) if others else (),
    )
    return facts, caller_host, _folded(agents)


_ROUTE_BYTES = ROUTE_HEADER.encode()
_NONE_OF_OURS: dict[bytes, list[bytes]] = {}  # read only
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_ENVIRONMENT_BYTES = ENVIRONMENT_HEADER.encode()
_KEY_BYTES = KEY_HEADER.encode()


def _folded(values: list[bytes] | None) -> str | None:
    """What ``Headers.get`` returns for these raw values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0].decode("utf-8", "surrogateescape")
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def _same_host(authority: str, host: str) -> bool:
    """The common case, cheaply: ``authority`` is ``host`` or ``host:port``."""
    authority = authority.lower()
    host = host.lower()
    return authority == host or (authority.startswith(host) and authority[len(host) : len(host) + 1] == ":")


def _authority_host(authority: str) -> str:
    """The host of a Host header or authority (port removed); as it is when unparsable."""
    if "[" not in authority and authority.count(":") <= 1:
        return authority.partition(":")[0]  # the common case: host or host:port
    try:
        return url.parse_authority(authority, check=False)[0]
    except ValueError:
        return authority


def forward(flow: http.HTTPFlow, decision: Decision) -> None:
    """Prepare an allowed request for upstream: strip our headers, extend XFF, re-target."""
    request = flow.request
    # One pass over the raw fields, with the result of the former (slower) steps:
    #   del headers[x-knoxcall-*]; headers["X-Forwarded-For"] = ", ".join([*get_all(XFF), peer])
    # i.e. our headers dropped; the first X-Forwarded-For (its name's case kept) extended
    # in place and the others folded into it; else one appended at the end.
    peer = decision.peer_ip or peer_host(flow)
    fields: list[tuple[bytes, bytes]] = []
    forwarded: list[bytes] = []
    forwarded_at = -1
    forwarded_name = b"X-Forwarded-For"
    for field in request.headers.fields:
        name = field[0]
        lower = name.lower()
        if lower.startswith(_PREFIX_BYTES) if name.isascii() else _is_ours(name):
            continue
        if lower == _XFF_BYTES:
            if forwarded_at < 0:
                forwarded_at, forwarded_name = len(fields), name
                fields.append((name, b""))
            forwarded.append(field[1])
            continue
        fields.append(field)
    joined = b", ".join([*forwarded, peer.encode("utf-8", "surrogateescape")])
    if forwarded_at < 0:
        fields.append((forwarded_name, joined))
    else:
        fields[forwarded_at] = (forwarded_name, joined)
    request.headers.fields = tuple(fields)
    if decision.target_url:
        target = urlsplit(decision.target_url)
        request.scheme = target.scheme
        request.host = target.hostname or ""
        request.port = target.port or (443 if target.scheme == "https" else 80)
        base = target.path.rstrip("/")
        if base:
            request.path = base + (request.path if request.path.startswith("/") else "/" + request.path)
        request.host_header = _authority(target.scheme, request.host, request.port)


def _is_ours(name: bytes) -> bool:
    """An x-knoxcall-* header name (compared as the str lower() the old code used)."""
    if name.isascii():
        return name[: len(_PREFIX_BYTES)].lower() == _PREFIX_BYTES
    return name.decode("utf-8", "surrogateescape").lower().startswith(HEADER_PREFIX)


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
