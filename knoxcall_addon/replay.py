"""Replaying a flow (mitmweb's *replay*, `replay.client`): decided as the original request was.

An allowed request is changed before it goes upstream (KnoxCall's headers removed,
X-Forwarded-For extended, re-targeted to the route's target), so replaying it as it now
stands would be decided on something the caller never sent. `forward` keeps on the flow
what a replay needs to put back: the route and environment the request was decided for
and, when it was re-targeted, the target the caller asked for. The API key is never kept:
a replay of a route that requires one is refused (401), whatever a flow file says, and
the key header of a refused request is removed from the flow so that no view shows it.
The peer is the flow's own (mitmproxy replays with a copy of the original client).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from knoxcall_addon.decision import ENVIRONMENT_HEADER, KEY_HEADER, ROUTE_HEADER
from knoxcall_addon.ipmatch import parse_ip

REPLAY_KEY = "knoxcall_replay"  # flow.metadata: (route, environment, target or None)
_XFF = "X-Forwarded-For"


def remember(flow: http.HTTPFlow, route: str | None, environment: str | None, retargeted: bool) -> None:
    """Keep what `restore` needs, before `forward` changes the request (one small tuple)."""
    request = flow.request
    target = (
        (request.scheme, request.host, request.port, request.path, request.host_header) if retargeted else None
    )
    flow.metadata[REPLAY_KEY] = (route, environment, target)


def restore(flow: http.HTTPFlow, peer: str) -> None:
    """Put a replayed request back as the caller sent it, so that it is decided again like the
    original (on the policy in force now). Raises ValueError on a kept value of the wrong
    shape (a crafted flow file): the request is then refused, never decided half-restored."""
    headers = flow.request.headers
    headers.pop(KEY_HEADER, None)  # never from a flow (kept or not): a replay proves no key
    kept: Any = flow.metadata.pop(REPLAY_KEY, None)
    if kept is None:
        return
    route, environment, target = _checked(kept)
    request = flow.request
    if target is not None:
        request.scheme, request.host, request.port, request.path, host_header = target
        if host_header is not None:
            request.host_header = host_header
    for name, value in ((ROUTE_HEADER, route), (ENVIRONMENT_HEADER, environment)):
        if value is not None:
            headers[name] = value
    address = parse_ip(peer)  # as forward() wrote it: ::ffff:a.b.c.d as a.b.c.d
    peer = str(address) if address is not None else peer
    forwarded = headers.get(_XFF)
    if forwarded == peer:
        del headers[_XFF]
    elif forwarded is not None and forwarded.endswith(", " + peer):
        headers[_XFF] = forwarded[: -len(peer) - 2]


def forget_key(request: http.Request) -> None:
    """Remove the API key header from a refused request: mitmweb, saved flows and a replay
    would all show or reuse it (an allowed one lost it in `forward`)."""
    if KEY_HEADER in request.headers:
        del request.headers[KEY_HEADER]


def _checked(kept: Any) -> tuple[str | None, str | None, tuple[str, str, int, str, str | None] | None]:
    if not (isinstance(kept, tuple | list) and len(kept) == 3):
        raise ValueError("the flow's replay information is not KnoxCall's")
    route, environment, target = kept
    if not all(v is None or isinstance(v, str) for v in (route, environment)):
        raise ValueError("the flow's replay information is not KnoxCall's")
    if target is not None:
        if not (isinstance(target, tuple | list) and len(target) == 5):
            raise ValueError("the flow's replay information is not KnoxCall's")
        scheme, host, port, path, host_header = target
        if not (
            isinstance(scheme, str) and isinstance(host, str) and isinstance(port, int) and isinstance(path, str)
        ) or not (host_header is None or isinstance(host_header, str)):
            raise ValueError("the flow's replay information is not KnoxCall's")
        target = (scheme, host, port, path, host_header)
    return route, environment, target
