"""The mitmproxy adapter: options, hooks and flow annotations around the pure decision.

Fail closed everywhere: a hook that raises would let mitmproxy forward the request,
so every hook catches its own errors and denies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, NoReturn

from mitmproxy import command, ctx, exceptions, http
from mitmproxy import log as mitmproxy_log

from knoxcall_addon import injection, launchguard, metrics
from knoxcall_addon.accesslog import AccessLog, utc_timestamp
from knoxcall_addon.configdiff import diff_configs
from knoxcall_addon.connections import ConnectionHooks
from knoxcall_addon.decision import (
    Decision,
    internal_error,
)
from knoxcall_addon.drain import Drain
from knoxcall_addon.eventlog import SKIP_LEGACY, flow_comment, log_decision
from knoxcall_addon.explain import explain_text
from knoxcall_addon.gate import (
    add_our_headers,
    body_size_unknown,
    decide_request,
    denial_response,
    forward,
    internal_error_response,
    new_request_id,
    peer_host,
    request_meta,
    requested_host,
    strip_signature_headers,
)
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.ratestore import Checked, RateLimiter
from knoxcall_addon.reloader import HotReload, release_free_memory
from knoxcall_addon.replay import forget_key, restore
from knoxcall_addon.signing import MISSING, before_body, check_signed, refused
from knoxcall_addon.status import LoadedPolicy, status_lines

logger = logging.getLogger("knoxcall")


METADATA_KEY = "knoxcall"
DENIED_MARKER = ":no_entry:"
REPORT_MARKER = ":warning:"  # let through in report mode: would be refused when enforced


class KnoxCall(ConnectionHooks):
    """Client IP authorization per route and environment."""

    def __init__(self) -> None:
        self.current: LoadedPolicy | None = None
        self.access_log: AccessLog | None = None
        self._pending: set[str] = set()  # ids of HTTP flows decided but not yet answered (access log, drain)
        self.reload = HotReload(self.install, lambda: self.current.policy if self.current else None)
        self._reload_enabled = True
        self._running = False
        self._refused: set[str] = set()  # ids of client connections whose raw flows were refused
        self.streaming_bodies = False  # stream_large_bodies is set: denied bodies may be streamed
        self._killed: set[str] = set()  # ids of client connections whose HTTP flow we killed
        self.limiter = RateLimiter()  # rate limits: the store and its buckets outlive reloads
        self.metrics_server: metrics.MetricsServer | None = None  # knoxcall_metrics
        self.metrics: metrics.Metrics | None = None  # its counters; None when off: then nothing is counted
        # graceful stop on SIGTERM (drain.py); in flight: decided, or waiting for the body to check its signature
        self.drain = Drain(lambda: len(self._pending) + len(self._awaiting_body))
        # signed routes: flows decided, their signature checked once the body is in (the `request` hook)
        self._awaiting_body: dict[str, tuple[Decision, dict[str, Any] | None, Policy, tuple[Any, ...]]] = {}

    # -- options -----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, mitmproxy_log.LegacyLogEvents):
                handler.addFilter(SKIP_LEGACY)
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
        loader.add_option(
            "knoxcall_metrics",
            str,
            "",
            "Serve Prometheus metrics (/metrics) and readiness (/healthz) on [HOST:]PORT "
            "(HOST defaults to 127.0.0.1); empty for none.",
        )
        self.drain.load(loader)
        launchguard.check_options(loader)  # before mitmproxy applies --set values: a bad one drops the script
        injection.install()  # injected secrets reach the upstream, never the flow (see injection.py)

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
                    if self.current is None and not self._running:  # at start: nothing to keep
                        refuse_to_start(e)
                    # Later, mitmproxy rolls the option back: the previous policy stays in force.
                    raise exceptions.OptionsError(f"knoxcall: invalid config, nothing changed:\n{e}") from None
                previous = self.current.policy.config if self.current else None
                note = f"was {previous.version}: {diff_configs(previous, policy.config).summary()}" if previous else ""
                self.install(policy, note)
                self.reload.set_folder(folder, policy)
                del previous
                release_free_memory()  # what loading needed beyond what the policy keeps
                repoint = True
        if "scripts" in updated and self._running and (problem := launchguard.script_order_problem(self)):
            raise exceptions.OptionsError(problem)  # e.g. :set scripts=...: rolled back
        if "knoxcall_reload" in updated:
            self._reload_enabled = ctx.options.knoxcall_reload
            repoint = True
        if repoint and self._running:
            self._start_watcher()
        if ("ignore_hosts" in updated or "allow_hosts" in updated) and (
            ctx.options.ignore_hosts or ctx.options.allow_hosts
        ):
            # mitmproxy relays the connections of ignored hosts without calling any hook:
            # no request inside them could be decided.
            raise exceptions.OptionsError(
                "knoxcall: ignore_hosts/allow_hosts make mitmproxy relay connections that no addon sees, "
                "so KnoxCall could not decide them: unset both"
            )
        if "stream_large_bodies" in updated:
            self.streaming_bodies = bool(ctx.options.stream_large_bodies)
        if "knoxcall_metrics" in updated:
            self._set_metrics(ctx.options.knoxcall_metrics)
        self.drain.configure(updated)
        if "proxy_debug" in updated:
            injection.set_debug(bool(getattr(ctx.options, "proxy_debug", False)))
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
        self.limiter.install(policy.rate_limits, policy.settings, policy.store_url, policy.store_secrets)
        launchguard.activate(self)  # a policy in force: our hooks decide; until then the guard refuses all
        if self.metrics is not None:
            self.metrics.policy_installed(policy)
        config = policy.config
        logger.info(
            f"knoxcall: config {policy.version} loaded from {config.folder}: "
            f"{len(config.clients)} clients, {len(policy.clients_by_ip)} ranges, "
            f"{len(config.routes)} routes, {len(config.environments)} environments, "
            f"{len(config.assignments)} assignments" + (f"; {note}" if note else "")
        )

    def running(self) -> None:
        """Only now start watching: an error logged during startup would make mitmproxy exit."""
        problem = launchguard.script_order_problem(self)
        if problem:
            logger.error(problem)  # at startup: mitmdump exits 1
        self._running = True
        self._start_watcher()
        self.drain.running()

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
        lines.extend(self.limiter.status_lines())
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
            handler.removeFilter(SKIP_LEGACY)
        self._running = False
        try:
            self.reload.stop()
        except Exception:
            logger.warning("knoxcall: stopping the config watcher failed", exc_info=True)
        if self.access_log:
            self.access_log.close()
            self.access_log = None
        self.limiter.stop()
        self._set_metrics("")
        self.drain.done()
        self._awaiting_body.clear()

    @command.command("knoxcall.explain")
    def explain(self, ip: str, route: str, env: str = "") -> str:
        """The decision for a caller IP on a route (and environment), and why; as `knoxcall explain`."""
        if self.current is None:
            return "no policy loaded: every request is denied"
        return explain_text(self.current.policy, ip, route, env or None)

    # -- HTTP --------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Decide as soon as the headers are in, before any body is read or forwarded.

        Returns an awaitable only when a shared rate limit store must be asked: mitmproxy
        awaits it before it goes on with this flow (and only this flow).
        """
        if flow.response or flow.error:
            return None
        # refusing_on_error spelled out: this runs once per request, the context manager
        # cost a microsecond each time
        try:
            return self._decide_request(flow)
        except Exception:
            logger.exception("knoxcall: unexpected error while deciding a request; refusing it")
            self._refuse_request(flow, internal_error_response(flow))
            return None

    def _decide_request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # A replayed flow (mitmweb's "replay") passes here again and is decided again.
        request_id = new_request_id()
        started = time.perf_counter() if self.metrics is not None else 0.0
        request = flow.request
        # what the caller sent, before forward() re-targets the request
        method = request.method
        path = request.path
        rate_limit = None
        try:
            if flow.is_replay == "request":  # decided as the original was (replay.py)
                restore(flow, peer_host(flow))
                method, path = request.method, request.path
            policy = self._policy()
            decision, caller_host, user_agent = decide_request(flow, policy, method, path)
            # rate limits last: a request refused by any other check takes no token
            checked = self.limiter.check(policy.rate_limits, decision)
            if not isinstance(checked, tuple):
                seen = (request_id, method, caller_host, path, user_agent, started)
                return self._decide_later(flow, checked, policy, seen)
            decision, rate_limit = checked
            if decision.allowed and (decision := self._admit(flow, decision, rate_limit, policy, (
                    request_id, method, caller_host, path, user_agent))) is None:  # fmt: skip
                return None  # a signed route: decided when the body is in
        except Exception as e:
            decision = self._internal_error(flow, request_id, e)
            caller_host = requested_host(request)
            user_agent = request.headers.get("user-agent")
        self._settle(flow, decision, rate_limit, request_id, method, caller_host, path, user_agent, started)
        return None

    async def _decide_later(
        self, flow: http.HTTPFlow, checked: Awaitable[Checked], policy: Policy, seen: tuple[Any, ...]
    ) -> None:
        """The rest of `_decide_request` once the rate limit store has answered; fails closed too."""
        try:
            try:
                decision, rate_limit = await checked
                if decision.allowed and (decision := self._admit(flow, decision, rate_limit, policy, seen)) is None:
                    return  # a signed route: decided when the body is in
            except Exception as e:
                decision, rate_limit = self._internal_error(flow, seen[0], e), None
            self._settle(flow, decision, rate_limit, *seen)
        except Exception:
            logger.exception("knoxcall: unexpected error while deciding a request; refusing it")
            self._refuse_request(flow, internal_error_response(flow))

    def _admit(
        self, flow: http.HTTPFlow, decision: Decision, rate_limit: Any, policy: Policy, seen: tuple[Any, ...]
    ) -> Decision | None:
        """An allowed request goes upstream now; on a route that requires signatures, once its
        body is in and its signature checked (None: see `request`). Nothing is forwarded before."""
        if decision.route not in policy.signatures:
            self._forward(flow, decision, policy)
            return decision
        streamed = flow.request.stream or (self.streaming_bodies and body_size_unknown(flow.request))
        refusal = before_body(decision, bool(streamed))
        if refusal is None:
            self._awaiting_body[flow.id] = (decision, rate_limit, policy, seen)
            flow.metadata[METADATA_KEY] = {"request_id": seen[0], "signature": "pending"}  # (see `request`)
        return refusal

    def _forward(self, flow: http.HTTPFlow, decision: Decision, policy: Policy) -> None:
        """Prepare an allowed request for its upstream: re-target it, then inject the route's headers."""
        forward(flow, decision, policy)
        if policy.injections and (found := policy.injections.get((decision.route, decision.environment))):  # type: ignore[arg-type]
            injection.inject(flow, found)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The body is in: check the signature of a request on a signed route (fail closed)."""
        pending = self._awaiting_body.pop(flow.id, None) if self._awaiting_body else None
        if pending is None:
            if flow.metadata.get(METADATA_KEY, {}).get("signature") == "pending":
                # decided by a KnoxCall instance that is gone (the script was reloaded meanwhile): not checked
                self._refuse_request(flow, internal_error_response(flow))
                logger.error("knoxcall: a signed request's check was lost in a script reload; refused it")
            return None
        decision, rate_limit, policy, seen = pending
        try:
            keys = policy.signing_keys.get((decision.client, decision.environment), ())  # type: ignore[arg-type]
            sent = (flow.request.headers.fields, seen[1], seen[3], flow.request.raw_content)
            spec = policy.signatures[decision.route]  # type: ignore[index]
            checked = check_signed(decision, spec, keys, sent, self.limiter.remember_nonce, time.time())
            return self._signed(flow, checked, rate_limit, policy, seen)
        except Exception as e:
            self._settle(flow, self._internal_error(flow, seen[0], e), None, *seen)
            return None

    def _signed(
        self, flow: http.HTTPFlow, checked: Decision | Awaitable[Decision], rate_limit: Any, policy: Policy,
        seen: tuple[Any, ...],
    ) -> Awaitable[None] | None:  # fmt: skip
        """Forward a request whose signature was good (then without its signature headers); settle."""
        if not isinstance(checked, Decision):
            return self._signed_later(flow, checked, rate_limit, policy, seen)
        if checked.allowed:
            strip_signature_headers(flow)
            self._forward(flow, checked, policy)
        self._settle(flow, checked, rate_limit, *seen)
        return None

    async def _signed_later(
        self, flow: http.HTTPFlow, checked: Awaitable[Decision], rate_limit: Any, policy: Policy, seen: tuple[Any, ...]
    ) -> None:
        """`_signed` once the nonce store has answered; fails closed like `_decide_later`."""
        try:
            try:
                self._signed(flow, await checked, rate_limit, policy, seen)
            except Exception as e:
                self._settle(flow, self._internal_error(flow, seen[0], e), None, *seen)
        except Exception:
            logger.exception("knoxcall: unexpected error while checking a signature; refusing it")
            self._refuse_request(flow, internal_error_response(flow))

    def _internal_error(self, flow: http.HTTPFlow, request_id: str, error: Exception) -> Decision:
        logger.exception(f"knoxcall: error while deciding request {request_id}; denying it")
        peer = peer_host(flow)
        return internal_error(peer, peer, f"{type(error).__name__}: {error}", self._version())

    def _settle(
        self,
        flow: http.HTTPFlow,
        decision: Decision,
        rate_limit: dict[str, Any] | None,
        request_id: str,
        method: str,
        caller_host: str,
        path: str,
        user_agent: str | None,
        started: float = 0.0,
        answer: bool = True,
    ) -> None:
        """Log and annotate a decided request; answer it if refused (and ``answer``)."""
        request = flow.request
        if self.metrics is not None:
            self.metrics.request_decided(decision, time.perf_counter() - started)
        meta = request_meta(decision, request_id, method, caller_host, path, user_agent, rate_limit)
        line = self._log_decision(decision, request_id)
        self._annotate(flow, decision, meta, line)
        self._pending.add(flow.id)  # decided, not yet answered: access log, drain
        if not decision.allowed:
            if answer:
                self._refuse_request(flow, denial_response(decision, request_id, request.method))
            else:  # (a request that ended: nothing to answer, but its key must not stay on the flow)
                forget_key(request)

    def _refuse_request(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Answer a refused request with ``response``, or close it when that cannot be done.

        stream_large_bodies: mitmproxy streams this body (or will, once a chunked body of
        unknown size grows past the limit) and cannot also answer the request: it raises,
        and the caller hangs with no answer at all. Close the connection instead; nothing
        goes upstream either way. Its API key header goes (see forget_key): every refusal of a
        request passes here, also one refused for an error before it was decided.
        """
        forget_key(flow.request)
        flow.marked = DENIED_MARKER
        may_stream = flow.request.stream or (self.streaming_bodies and body_size_unknown(flow.request))
        if may_stream and flow.killable:
            flow.kill()
            self._killed.add(flow.client_conn.id)
        else:
            flow.response = response

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Every response we make or forward carries the request id (also when streamed)."""
        injection.disarm(flow)  # sent: its secrets are no longer needed
        meta = flow.metadata.get(METADATA_KEY)
        if meta and flow.response is not None:
            rate_limit = meta.get("rate_limit")
            if rate_limit is not None and not self.limiter.settings.rate_limit_headers:
                rate_limit = None
            add_our_headers(flow.response.headers, meta["request_id"], rate_limit)

    def response(self, flow: http.HTTPFlow) -> None:
        self._complete(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        injection.disarm(flow)
        pending = self._awaiting_body.pop(flow.id, None) if self._awaiting_body else None
        if pending is not None:  # the request ended before its body (and signature) could be checked
            decision = refused(pending[0], MISSING, "the request ended before its body arrived: not checked")
            self._settle(flow, decision, pending[1], *pending[3], answer=False)
        self._complete(flow)

    # -- metrics -----------------------------------------------------------------------

    def _set_metrics(self, value: str) -> None:
        """Start, move or stop the metrics endpoint (see metrics.py); a bad value is an OptionsError."""
        try:
            policy = self.current.policy if self.current else None
            self.metrics_server = metrics.reconfigure(self.metrics_server, value, self.metrics_state, policy)
        except (ValueError, OSError) as e:
            raise exceptions.OptionsError(f"knoxcall: knoxcall_metrics={value}: {e}") from None
        self.metrics = self.metrics_server.metrics if self.metrics_server else None

    def metrics_state(self) -> metrics.State:
        """What /metrics and /healthz read at scrape time (in the metrics server's thread)."""
        current = self.current
        master = getattr(ctx, "master", None)
        monitor = master.addons.get("connectivitymonitor") if master is not None else None
        last = getattr(monitor, "last", None) if getattr(monitor, "interval", 0) > 0 else None
        return metrics.State(
            version=current.policy.version if current else None,
            ready=current is not None and not launchguard.status_lines(self) and not self.drain.draining,
            draining=self.drain.draining,
            loaded_at=current.loaded_at if current else None,
            reloads_ok=self.reload.reloads,
            reloads_invalid=self.reload.invalid_reloads,
            access_log_lost=self.access_log.lost_total if self.access_log else 0,
            connectivity=None if last is None else tuple((client, r.status) for (client, _), r in list(last.items())),
        )

    # -- internals ---------------------------------------------------------------------

    def _version(self) -> str:
        return self.current.policy.version if self.current else ""

    def _policy(self) -> Policy:
        """The policy in force; none (only after a failed start) is an error, so: deny."""
        if self.current is None:
            raise RuntimeError("no policy loaded")
        return self.current.policy

    def _log_decision(self, decision: Decision, request_id: str) -> str:
        return log_decision(decision, request_id)

    def _annotate(self, flow: Any, decision: Decision, meta: dict[str, Any], line: str) -> None:
        """What mitmweb shows: the comment (from ``line``, the decision's log line), a mark on
        denials, and the metadata."""
        flow.metadata[METADATA_KEY] = meta
        flow.comment = flow_comment(decision, line)
        if not decision.allowed:
            flow.marked = DENIED_MARKER
        elif decision.report_only:
            flow.marked = REPORT_MARKER

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


def refuse_to_start(error: ConfigError) -> NoReturn:
    """An invalid config at start: each problem on its own line, then exit 1.

    Raised as an OptionsError, mitmproxy would print "error in script" and a traceback,
    open the listening socket, and only then exit. SystemExit from here ends the process
    before it listens (the script loads while mitmproxy starts its servers); nothing has
    been served, and the guard refuses everything meanwhile (launchguard).
    """
    problems = error.problems or []
    logger.error(f"knoxcall: invalid config, not starting ({len(problems) or 1} problem(s)):")
    for problem in problems or [str(error)]:
        logger.error(f"knoxcall:   {problem}")
    for handler in logging.getLogger().handlers:  # mitmdump's terminal writes from a queue: flush it
        with contextlib.suppress(Exception):
            handler.flush()
    raise SystemExit(1)
