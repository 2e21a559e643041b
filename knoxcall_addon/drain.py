"""Graceful stop: on SIGTERM a worker drains before it stops, so that a rolling restart loses no request.

mitmproxy stops at once on SIGTERM (``tools/main.py`` calls the master's shutdown), cutting
every request in flight. A proxy behind a load balancer must instead:

1. report not ready: ``/healthz`` answers 503 ``draining`` (``knoxcall_ready`` 0), so that a
   balancer with active health checks (a Kubernetes readiness probe, HAProxy's ``check``)
   stops sending it new requests, and every HTTP/1 response carries ``Connection: close``,
   so that keep-alive callers take their next request elsewhere;
2. keep serving for ``knoxcall_drain_seconds`` while the balancer notices (only with the
   metrics endpoint on: without ``/healthz`` nobody can see step 1, so nothing waits for it);
3. stop listening: new connections are refused, and a balancer passes them to another
   worker (nothing was sent, so nginx does so for any method);
4. wait until no request is in flight (each one read has been answered, its connection
   closed after the response, and no connection accepted just before step 3 is still
   about to send one), at most ``knoxcall_drain_timeout`` seconds; then shut down as
   mitmproxy would have. Idle keep-alive and HTTP/2 connections are closed by that stop.

A second SIGTERM, or SIGINT (mitmproxy's own handler), stops at once.

`Drain` is owned by the KnoxCall addon, which hands it its hooks (load, configure, running,
done): it is not an entry of mitmproxy's hook chain, which costs every flow's every event.
Only while draining does a small hook object (`_Closing`) join the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

logger = logging.getLogger("knoxcall")

DEFAULT_SECONDS = 5  # about what a balancer's health checks take to notice (Kubernetes: periodSeconds)
DEFAULT_TIMEOUT = 25  # with the drain, the 30 s that Kubernetes waits before SIGKILL by default
QUIET = 0.25  # seconds with nothing in flight before the stop: the last response's bytes are written
CONNECTION_GRACE = 1.0  # seconds a connection accepted just before listening stopped has to send its request
POLL = 0.05


class Drain:
    """The SIGTERM handler and its drain; `draining` is what /healthz reports."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.in_flight = in_flight  # HTTP requests decided and not yet answered
        self.seconds = DEFAULT_SECONDS
        self.timeout = DEFAULT_TIMEOUT
        self.health_visible = False  # knoxcall_metrics is on: /healthz can tell a balancer
        self.draining = False
        self._master: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = _Closing()

    # -- handed over by the KnoxCall addon ----------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "knoxcall_drain_seconds",
            int,
            DEFAULT_SECONDS,
            "On SIGTERM, seconds to keep serving while /healthz says not ready (only with knoxcall_metrics on), "
            "before listening stops.",
        )
        loader.add_option(
            "knoxcall_drain_timeout",
            int,
            DEFAULT_TIMEOUT,
            "On SIGTERM, once listening has stopped, seconds to wait at most for the requests in flight.",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("knoxcall_drain_seconds", "knoxcall_drain_timeout"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"knoxcall: {name} must be 0 or a number of seconds")
        if "knoxcall_drain_seconds" in updated:
            self.seconds = ctx.options.knoxcall_drain_seconds
        if "knoxcall_drain_timeout" in updated:
            self.timeout = ctx.options.knoxcall_drain_timeout
        if "knoxcall_metrics" in updated:
            self.health_visible = bool(ctx.options.knoxcall_metrics.strip())

    def running(self) -> None:
        """Replace mitmproxy's SIGTERM handler (installed before the master runs) with ours."""
        self._master = ctx.master
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_signal_handler(signal.SIGTERM, self._sigterm)
        except (NotImplementedError, RuntimeError):  # no signal handlers on this loop (Windows): mitmproxy's stays
            self._loop = None

    def done(self) -> None:
        """Hand SIGTERM back to a plain shutdown: no handler may outlive the addon that owns it.

        A drain under way carries on (its task holds the master) and ends in the shutdown.
        """
        self._leave_chain()
        if self._loop is not None and self._master is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.add_signal_handler(signal.SIGTERM, self._master.shutdown)
        self._loop = None

    # -- the drain ----------------------------------------------------------------------------

    def _sigterm(self) -> None:
        if self.draining:
            logger.warning("knoxcall: SIGTERM again while draining: stopping now; requests in flight are cut")
            self._master.shutdown()
            return
        self.draining = True
        assert self._loop is not None
        self._task = self._loop.create_task(self._drain(), name="knoxcall-drain")

    async def _drain(self) -> None:
        """Steps 1-4 of the module doc; whatever happens, the process stops at the end."""
        master = self._master
        try:
            serve = self.seconds if self.health_visible else 0
            logger.info(
                f"knoxcall: SIGTERM: draining: /healthz says not ready, serving {serve} s more, then refusing new "
                f"connections and stopping once the requests in flight are answered (at most {self.timeout} s)"
            )
            self._join_chain(master)
            await asyncio.sleep(serve)
            await self._stop_listening(master)
            if await self._wait_until_idle():
                logger.info("knoxcall: drained: no request in flight; stopping")
            else:
                logger.warning(
                    f"knoxcall: drain timeout ({self.timeout} s): stopping with {self.in_flight()} request(s) in flight"
                )
        except Exception:
            logger.exception("knoxcall: draining failed; stopping now")
        finally:
            master.shutdown()

    async def _stop_listening(self, master: Any) -> None:
        proxyserver = master.addons.get("proxyserver")
        if proxyserver is not None:
            await proxyserver.servers.update([])

    async def _wait_until_idle(self) -> bool:
        """True once nothing has been in flight for QUIET seconds; False at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        quiet_since: float | None = None
        while True:
            now = loop.time()
            if self._busy():
                quiet_since = None
            elif not self._open_connections():
                return True  # nothing open at all: nothing can still be written
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= QUIET:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(POLL)

    def _busy(self) -> bool:
        if self.in_flight() or self._closing.connections:
            return True
        young = time.time() - CONNECTION_GRACE
        return any(getattr(h.client, "timestamp_start", 0) > young for h in self._open_connections())

    def _open_connections(self) -> list[Any]:
        proxyserver = self._master.addons.get("proxyserver") if self._master is not None else None
        return list(getattr(proxyserver, "connections", {}).values())

    def _join_chain(self, master: Any) -> None:
        addons = master.addons
        if not any(a is self._closing for a in addons.chain):
            addons.chain = [*addons.chain, self._closing]  # rebound: mitmproxy may be iterating the old list

    def _leave_chain(self) -> None:
        if self._master is not None:
            addons = self._master.addons
            addons.chain = [a for a in addons.chain if a is not self._closing]


class _Closing:
    """In the hook chain only while draining: HTTP/1 responses close their connection after them."""

    def __init__(self) -> None:
        self.connections: set[str] = set()  # told to close after a response not yet fully sent

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        request = flow.request
        if response is None or request.is_http2 or request.is_http3 or request.method == "CONNECT":
            return
        if response.status_code == 101:  # a protocol switch (WebSocket) keeps its Connection: upgrade
            return
        response.headers["connection"] = "close"
        self.connections.add(flow.client_conn.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self.connections.discard(client.id)
