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

Once running, one level more goes: mitmproxy's ``Script`` node, which holds the module
(``ScriptLoader`` -> ``Script`` -> module), gets the module's hooks itself and stops
leading to the module (`flatten`): walking into the module cost ~45,000 instructions per
request. mitmproxy finds the same hooks in the same order; when the module is done (a
script reload or removal, shutdown) the node is restored first. Where the node is not
mitmproxy's plain ``Script`` as this was written for, nothing is changed.

The objects stay findable as before: their commands are on the module (mitmproxy
collects them there), and ``ctx.master.addons.get("knoxcall")`` and
``get("connectivitymonitor")`` find them (registered while the script is loaded).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import mitmproxy.proxy.layers  # noqa: F401  (defines the HTTP, TCP, ... events: all of hooks.all_hooks)
from mitmproxy import addonmanager, ctx, exceptions, hooks
from mitmproxy.addons import script as mitmproxy_script

from knoxcall_addon.connectivity import ConnectivityMonitor
from knoxcall_addon.proxy_addon import KnoxCall

logger = logging.getLogger("knoxcall")

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
        try:
            knoxcall.running()
            monitor.running()
        finally:
            flatten(namespace)

    def done() -> None:
        unflatten(namespace)
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


class FlatScript(mitmproxy_script.Script):
    """A ``Script`` node holding its module's hooks: mitmproxy does not walk into the module
    (``addons`` is empty; the plain ``Script`` has ``[module]``)."""

    addons: tuple[Any, ...] = ()  # shadows Script's property, for the class swap in `flatten`


FLAT_MARK = "_knoxcall_flat_hooks"  # on a flattened node: the names of the hooks put on it
LEAVING = "_knoxcall_leaving"  # on a flattened node whose own done hook runs (removal, shutdown)


def script_node(namespace: MutableMapping[str, Any]) -> Any:
    """mitmproxy's ``Script`` addon whose module has ``namespace`` as its globals, or None."""
    master = getattr(ctx, "master", None)
    loader = master.addons.get("scriptloader") if master is not None else None
    for node in getattr(loader, "addons", ()):
        module = getattr(node, "ns", None)
        if module is not None and vars(module) is namespace:
            return node
    return None


def flatten(namespace: MutableMapping[str, Any]) -> bool:
    """Put the module's hooks on its ``Script`` node, and have the node lead nowhere (see
    the module's docstring). False, and nothing changed, where that is not safe."""
    node = script_node(namespace)
    if node is None or type(node) is not mitmproxy_script.Script:
        return False  # loaded another way (script.run, tests), flattened already, or another Script
    if not isinstance(vars(mitmproxy_script.Script).get("addons"), property) or node.addons != [node.ns]:
        return False  # not the Script this was written for
    names = [name for name in hooks.all_hooks if name not in ("load", "running") and callable(namespace.get(name))]
    if any(name in vars(node) for name in names) or "done" not in names:
        return False
    module_done = namespace["done"]

    def done() -> None:
        """The node is removed, or mitmproxy stops: the node's own done, then the module's,
        as mitmproxy would have called them."""
        mitmproxy_script.Script.done(node)
        node.__dict__[LEAVING] = True
        module_done()

    try:
        for name in names:
            setattr(node, name, namespace[name])
        node.done = done
        node.__dict__[FLAT_MARK] = names
        node.__class__ = FlatScript
    except Exception:  # never half done: hooks on both the node and the module would run twice
        for name in [*names, FLAT_MARK]:
            node.__dict__.pop(name, None)
        node.__class__ = mitmproxy_script.Script
        logger.warning("knoxcall: could not put the hooks on mitmproxy's script node; they stay on the module",
                       exc_info=True)  # fmt: skip
        return False
    return True


def unflatten(namespace: MutableMapping[str, Any]) -> None:
    """Undo `flatten` as the module is done: the node holds no hook of it any more.

    When the module alone is removed (a script reload), the node leads to modules again: its
    next module is walked into until it flattens the node in turn. When the node itself is
    removed, or mitmproxy stops, it keeps leading nowhere (mitmproxy's walk is past the
    node's done hook and would call the module's a second time), and the module's name,
    which mitmproxy's removal of the node did not reach, is forgotten with it.
    """
    node = script_node(namespace)
    if node is None or type(node) is not FlatScript:
        return
    for name in node.__dict__.pop(FLAT_MARK, ()):
        node.__dict__.pop(name, None)
    if not node.__dict__.pop(LEAVING, False):
        node.__class__ = mitmproxy_script.Script
        return
    master = getattr(ctx, "master", None)
    lookup = getattr(getattr(master, "addons", None), "lookup", None)
    name = addonmanager._get_name(node.ns)
    if isinstance(lookup, dict) and lookup.get(name) is node.ns:
        del lookup[name]
