"""A mitmproxy script with the same event hooks as KnoxCall, each doing nothing.

scripts/bench runs it as a third variant: what mitmproxy itself charges for loading a
script and dispatching those events to it, apart from any work KnoxCall does.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import hooks

from knoxcall_addon.proxy_addon import KnoxCall


class NoopKnoxCall:
    """Filled in below with one do-nothing method per KnoxCall event hook."""


def _nothing(self: Any, *args: Any) -> None:
    return None


for _name in hooks.all_hooks:
    if callable(getattr(KnoxCall, _name, None)):
        setattr(NoopKnoxCall, _name, _nothing)

addons = [NoopKnoxCall()]
