"""Inject a route's headers into an allowed request: the upstream receives the secrets, and
nothing that shows the flow ever does.

The flow always holds the values as the config writes them, ``{{secret:NAME}}`` in place of
each secret: mitmweb's list, detail view and flow API, intercept, replay and export, saved
flows (``-w``, ``save_stream_file``) and the terminal all see the placeholder, at every moment.

Why not put the value in the flow and take it out again later (a hook order)? Between the
last addon hook of a request and the bytes leaving for the upstream, mitmproxy may open a
connection, do a TLS handshake, or wait for an intercepted flow to be resumed; meanwhile
mitmweb's view already holds the flow (since ``requestheaders``) and serves it to anyone
who asks ``/flows.json``, and ``update`` hooks run after every hook (mitmweb broadcasts
the flow from them). No hook runs after the request is serialized and before the response
arrives, so a real value in the flow would be visible for the whole upstream round trip.

So the substitution happens where mitmproxy hands the request to the server side: the
``RequestHeaders`` event that the HTTP layer builds from ``flow.request`` once a server
connection is ready (HTTP/1, HTTP/2 and HTTP/3 all serialize that event's request). An
armed request is replaced there by a copy that differs only in the injected fields; the
copy lives in that event and the server connection's layer, which no addon sees. This
wraps ``RequestHeaders.__init__`` (`install`); when that is not possible, or mitmproxy's
``proxy_debug`` (which prints every byte sent) is on, a request that would carry a secret
is refused instead (fail closed).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from knoxcall_addon.secretsource import Injection

logger = logging.getLogger("knoxcall")

# On an armed request (the flow's), in its __dict__: (lower-case name, value shown, real value) per
# injected field. Not part of the request's state (its data), so no view, saved flow, copy or
# replay of the flow holds it; gone when the request is sent or fails (`disarm`), or with the flow.
WIRE = "_knoxcall_wire"
_state = {"installed": False, "problem": "", "debug": False}


def install() -> str:
    """Wrap ``RequestHeaders.__init__`` once per process; '' when in place, else why not."""
    if _state["installed"]:
        return ""
    try:
        from mitmproxy.proxy.layers.http import RequestHeaders

        fields = getattr(RequestHeaders, "__dataclass_fields__", {})
        if "request" not in fields:
            raise TypeError("RequestHeaders has no request field")
        original: Callable[..., None] = RequestHeaders.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            # (a replay's event goes to the client side: it becomes flow.request, never fill it in)
            if WIRE in self.request.__dict__ and self.replay_flow is None:
                self.request = wire_request(self.request)

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        RequestHeaders.__init__ = __init__  # type: ignore[method-assign]
    except Exception as e:
        _state["problem"] = f"cannot hand injected secrets to mitmproxy's server side ({type(e).__name__}: {e})"
        logger.error(f"knoxcall: {_state['problem']}; requests on routes that inject secrets are refused")
        return str(_state["problem"])
    _state["installed"] = True
    return ""


def set_debug(on: bool) -> None:
    """mitmproxy's ``proxy_debug`` prints every byte sent upstream: no secret is injected meanwhile."""
    if on and not _state["debug"]:
        logger.warning("knoxcall: proxy_debug is on and would print injected secrets: requests on routes "
                       "that inject secrets are refused until it is off")  # fmt: skip
    _state["debug"] = on


def inject(flow: http.HTTPFlow, injection: Injection) -> None:
    """Set the route's headers on an allowed request (the caller's of the same names go); the
    flow shows placeholders, the upstream gets the values (see the module's docstring)."""
    request = flow.request
    if injection.wire and (not _state["installed"] or _state["debug"]):
        why = "proxy_debug is on" if _state["debug"] else (_state["problem"] or "not installed")
        raise RuntimeError(f"cannot inject secrets: {why}")
    names = injection.names
    fields = [field for field in request.headers.fields if field[0].lower() not in names]
    fields.extend(injection.fields)
    request.headers.fields = tuple(fields)
    if injection.wire:
        request.__dict__[WIRE] = injection.wire


def disarm(flow: http.HTTPFlow) -> None:
    """The request has been sent (or never will be): forget its real values."""
    flow.request.__dict__.pop(WIRE, None)


def is_armed(request: http.Request) -> bool:
    """Does ``request`` wait to be sent with secrets? (for tests)"""
    return WIRE in request.__dict__


def wire_request(request: http.Request) -> http.Request:
    """What the upstream receives: ``request`` itself, or (armed) a copy with the real values in
    the injected fields that still show their placeholder (an edit in mitmweb's intercept wins)."""
    wire = request.__dict__.get(WIRE)
    if wire is None:
        return request
    fields = request.headers.fields
    if len(wire) == 1:  # the usual case: one injected header
        ((name, shown, value),) = wire
        fields = tuple([(n, value if v == shown and n.lower() == name else v) for n, v in fields])
    else:
        real = {(name, shown): value for name, shown, value in wire}
        fields = tuple([(n, real.get((n.lower(), v), v)) for n, v in fields])
    return shallow_copy(request, fields)


def shallow_copy(request: http.Request, fields: tuple[tuple[bytes, bytes], ...]) -> http.Request:
    """``copy.copy(request)`` with a copy of its data holding ``Headers(fields)``: what
    `plain_copy` makes, without copy's reduce protocol and the Headers type checks (``fields``
    are the request's own bytes and the config's), a fifth of the instructions. The request,
    its data and the headers keep their state in ``__dict__`` (mitmproxy 12); anything else
    falls back to `plain_copy`."""
    data = request.data
    plain = type(request) is http.Request and type(data) is http.RequestData and vars(request).keys() <= _PLAIN_STATE
    if not plain:
        return plain_copy(request, fields)
    headers = object.__new__(http.Headers)
    headers.fields = fields
    sent_data = object.__new__(http.RequestData)
    vars(sent_data).update(vars(data))
    sent_data.headers = headers
    sent = object.__new__(http.Request)
    sent.data = sent_data
    return sent


_PLAIN_STATE = frozenset({"data", WIRE})  # what a request made by mitmproxy, maybe armed, holds in __dict__


def plain_copy(request: http.Request, fields: tuple[tuple[bytes, bytes], ...]) -> http.Request:
    """The plain way of `shallow_copy` (the tests compare the two); the copy is not armed."""
    sent = copy.copy(request)
    sent.__dict__.pop(WIRE, None)
    sent.data = copy.copy(request.data)
    sent.data.headers = http.Headers(fields)
    return sent
