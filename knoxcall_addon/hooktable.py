"""KnoxCall's hooks on the script module itself: what mitmproxy charges least for.

For every event of every flow (a request has eight: requestheaders, request,
responseheaders, response, and an update after each) mitmproxy walks each script's
addon tree (script, module, each object in the module's ``addons``, their sub-addons)
and looks every node up for a hook. With ``addons = [KnoxCall(), ConnectivityMonitor()]``
that is two nodes and one more level more than the module alone, ~40,000 instructions
per request for nothing (scripts/bench --sections instructions). So the entry point
(addon.py) has no ``addons``: `expose` puts KnoxCall's event hooks on the module as bound
methods, and the module's lifecycle hooks (load, configure, running, done) call
KnoxCall's and the connectivity monitor's in that order, as mitmproxy did.

The objects stay findable as before: their commands are on the module (mitmproxy
collects them there), and ``ctx.master.addons.get("knoxcall")`` and
``get("connectivitymonitor")`` find them (registered while the script is loaded).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import mitmproxy.proxy.layers  # noqa: F401  (defines the HTTP, TCP, ... events: all of hooks.all_hooks)
from mitmproxy import ctx, exceptions, hooks

from knoxcall_addon.connectivity import ConnectivityMonitor
from knoxcall_addon.proxy_addon import KnoxCall

LIFECYCLE = ("load", "configure", "running", "done")
LOOKUP_NAMES = ("knoxcall", "connectivitymonitor")  # as mitmproxy named the two addons


def event_hooks(addon: object) -> list[str]:
    """The names of ``addon``'s event hooks other than the lifecycle ones."""
    return [name for name in hooks.all_hooks if name not in LIFECYCLE and callable(getattr(addon, name, None))]


def commands(addon: object) -> dict[str, Any]:
    """``addon``'s mitmproxy commands (bound methods with a ``command_name``), by attribute name."""
    found = {}
    for name in dir(type(addon)):
        if not name.startswith("_") and isinstance(getattr(getattr(type(addon), name), "command_name", None), str):
            found[name] = getattr(addon, name)
    return found


def expose(namespace: MutableMapping[str, Any]) -> tuple[KnoxCall, ConnectivityMonitor]:
    """Make a KnoxCall and a ConnectivityMonitor, and put their hooks and commands into
    ``namespace`` (the entry point module's globals)."""
    knoxcall, monitor = KnoxCall(), ConnectivityMonitor()
    both = (knoxcall, monitor)
    for name in event_hooks(monitor):  # none today; kept if the monitor gets one
        if name in event_hooks(knoxcall):
            raise RuntimeError(f"both addons have the hook {name}: the module can hold one")
        namespace[name] = getattr(monitor, name)
    for name in event_hooks(knoxcall):
        namespace[name] = getattr(knoxcall, name)
    for addon in both:
        for name, method in commands(addon).items():
            namespace[name] = method

    def load(loader: Any) -> None:
        lookup = loader.master.addons.lookup
        for name in LOOKUP_NAMES:  # as AddonManager.register refuses a second addon of a name
            if name in lookup:
                raise exceptions.AddonManagerError(f"An addon called '{name}' already exists.")
        knoxcall.load(loader)
        monitor.load(loader)
        lookup.update(zip(LOOKUP_NAMES, both, strict=True))

    def configure(updated: set[str]) -> None:
        knoxcall.configure(updated)
        monitor.configure(updated)

    def running() -> None:
        knoxcall.running()
        monitor.running()

    def done() -> None:
        try:
            knoxcall.done()
            monitor.done()
        finally:
            master = getattr(ctx, "master", None)
            lookup = getattr(getattr(master, "addons", None), "lookup", None)
            if isinstance(lookup, dict):
                for name, addon in zip(LOOKUP_NAMES, both, strict=True):
                    if lookup.get(name) is addon:
                        del lookup[name]

    namespace.update(load=load, configure=configure, running=running, done=done)
    return knoxcall, monitor
