"""A mitmproxy script shaped like KnoxCall's, each hook doing nothing.

scripts/bench runs it as a variant: what mitmproxy itself charges for loading a script
and dispatching events to it, apart from any work KnoxCall does. mitmproxy walks a
script's whole addon tree for every event and calls every hook it finds, so the mirror
has the same tree as ``knoxcall_addon/addon.py``'s ``addons``: one object per addon (and
per sub-addon, nested the same way) with a do-nothing method for each event hook that
addon has. KnoxCall's guard (launchguard.LaunchGuard) is not mirrored: it leaves
mitmproxy's hook chain once KnoxCall has a policy in force, so it costs a running proxy
nothing. Like KnoxCall's, the hooks are put on mitmproxy's Script node once running
(hooktable.flatten), so that the mirror is charged what KnoxCall is charged.
"""

from __future__ import annotations

from typing import Any

import mitmproxy.proxy.layers  # noqa: F401  (defines the HTTP, TCP, ... events: all of hooks.all_hooks)
from mitmproxy import hooks

from knoxcall_addon import addon as knoxcall_script
from knoxcall_addon import hooktable


def _nothing(self: Any, *args: Any) -> None:
    return None


def mirror(addon: object) -> object:
    """A do-nothing object with ``addon``'s event hooks and, mirrored too, its sub-addons."""
    names = {name: _nothing for name in hooks.all_hooks if callable(getattr(addon, name, None))}
    noop = type(f"Noop{type(addon).__name__}", (), names)()
    children = getattr(addon, "addons", None)
    if children:
        noop.addons = [mirror(child) for child in children]  # type: ignore[attr-defined]
    return noop


def _module_nothing(*args: Any) -> None:
    return None


for _name in hooks.all_hooks:
    if callable(getattr(knoxcall_script, _name, None)):
        globals()[_name] = _module_nothing


def running() -> None:
    hooktable.flatten(globals())


if hasattr(knoxcall_script, "addons"):
    addons = [mirror(a) for a in knoxcall_script.addons]
