"""KnoxCall's hooks on the script module (hooktable.py), as mitmproxy sees them.

The module stands in for ``addons = [KnoxCall(), ConnectivityMonitor()]``: mitmproxy must
find the same hooks, commands and addon names, the guard must count KnoxCall as active,
and the access log must get every request, also one decided before the log was opened.
"""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.addons import script as mitmproxy_script
from mitmproxy.test import taddons, tflow, tutils

from knoxcall_addon import hooktable, launchguard
from knoxcall_addon.connectivity import ConnectivityMonitor
from knoxcall_addon.proxy_addon import KnoxCall
from tests.test_addon_unit import config_dir, make_flow  # noqa: F401  (fixture)


def entry_module(name: str = "addon.py") -> tuple[types.ModuleType, KnoxCall, ConnectivityMonitor]:
    """What addon.py is, as a fresh module (mitmproxy loads the file itself as one and names it by its path)."""
    module = types.ModuleType("knoxcall_entry_point_under_test")
    module.name = name  # type: ignore[attr-defined]
    knoxcall, monitor = hooktable.expose(vars(module))
    return module, knoxcall, monitor


def test_mitmproxy_finds_knoxcalls_hooks_commands_and_names_on_the_module(config_dir) -> None:  # noqa: F811
    module, knoxcall, monitor = entry_module()
    with taddons.context(module) as context:
        context.configure(module, knoxcall_config=str(config_dir))
        master = context.master
        assert master.addons.get("knoxcall") is knoxcall
        assert master.addons.get("connectivitymonitor") is monitor
        assert {"knoxcall.reload", "knoxcall.status", "knoxcall.explain"} <= set(master.commands.commands)
        assert "knoxcall_config" in master.options and "knoxcall_ping_interval" in master.options
        # every event hook KnoxCall has is found on the module, bound to it
        for name in hooks.all_hooks:
            if name in hooktable.LIFECYCLE or not callable(getattr(knoxcall, name, None)):
                continue
            hook = getattr(module, name, None)  # what mitmproxy looks up for each event
            assert hook.__self__ is knoxcall
        # the guard counts KnoxCall as in force: it left the chain
        assert launchguard.GUARD_NAME not in [getattr(a, "name", "") for a in master.addons.chain]
        flow = make_flow()
        master.addons.invoke_addon_sync(module, hooks.all_hooks["requestheaders"](flow))
        assert flow.metadata["knoxcall"]["decision"] == "allowed" and flow.response is None
        master.addons.remove(module)  # what a script reload does first
        assert master.addons.get("knoxcall") is None and master.addons.get("connectivitymonitor") is None
        guard = master.addons.get(launchguard.GUARD_NAME)
        assert guard.keeper is None and master.addons.chain[-1] is guard  # refusing again


def test_a_second_knoxcall_script_is_refused_like_a_second_addon_of_a_name(config_dir) -> None:  # noqa: F811
    first, _, _ = entry_module("a/addon.py")
    second, _, _ = entry_module("b/addon.py")
    with taddons.context(first) as context:
        with pytest.raises(exceptions.AddonManagerError, match="already exists"):
            context.master.addons.register(second)
        assert context.master.addons.get("knoxcall") is not None


def test_access_log_opened_later_misses_no_request(tmp_path, config_dir) -> None:  # noqa: F811
    module, knoxcall, _ = entry_module()
    log = tmp_path / "access.jsonl"
    with taddons.context(module) as context:
        context.configure(module, knoxcall_config=str(config_dir))
        decided_before = make_flow()
        module.requestheaders(decided_before)
        context.configure(module, knoxcall_access_log=str(log))
        assert module.response.__self__ is knoxcall and module.error.__self__ is knoxcall
        decided_after = make_flow()
        module.requestheaders(decided_after)
        for flow in (decided_before, decided_after):
            flow.response = tutils.tresp()
            module.responseheaders(flow)
            module.response(flow)
            module.response(flow)  # once only
        failed = make_flow()
        module.requestheaders(failed)
        failed.error = tflow.terr()
        module.error(failed)
        context.configure(module, knoxcall_access_log="")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    ids = [f.metadata["knoxcall"]["request_id"] for f in (decided_before, decided_after, failed)]
    assert [line["request_id"] for line in lines] == ids
    assert [line["status"] for line in lines] == [200, 200, None]


def test_the_entry_point_file_loads_as_a_script(config_dir) -> None:  # noqa: F811
    """mitmproxy's own loader on addon.py: the module holds the hooks, no addons."""
    path = Path(__file__).resolve().parent.parent / "knoxcall_addon" / "addon.py"
    with taddons.context() as context:
        module = mitmproxy_script.load_script(str(path))
        assert module is not None and not hasattr(module, "addons")
        context.master.addons.add(module)
        context.configure(module, knoxcall_config=str(config_dir))
        knoxcall: Any = context.master.addons.get("knoxcall")
        assert isinstance(knoxcall, KnoxCall) and knoxcall.current is not None
        assert module.requestheaders.__self__ is knoxcall


ENTRY_POINT = Path(__file__).resolve().parent.parent / "knoxcall_addon" / "addon.py"


def loaded_script_node(context: taddons.context, folder: Path) -> Any:
    """mitmproxy's ScriptLoader with a Script node for addon.py, as ``-s`` makes them: the node is
    registered, then loads its module (its watcher would, once the loop gets control)."""
    loader = context.master.addons.get("scriptloader")
    context.options.update_defer(knoxcall_config=str(folder), knoxcall_reload=False)
    node = mitmproxy_script.Script(str(ENTRY_POINT), True)
    loader.addons.append(node)
    context.master.addons.register(node)
    node.loadscript()
    return node


def in_loop(scenario: Any) -> None:
    """Run ``scenario`` (a test's body) inside an event loop, as mitmproxy runs hooks: the
    running hook's drain and watcher ask for the loop."""

    async def body() -> None:
        scenario()

    asyncio.run(body())


def test_once_running_the_script_node_holds_the_hooks_and_leads_nowhere(config_dir) -> None:  # noqa: F811
    def scenario() -> None:
        with taddons.context(mitmproxy_script.ScriptLoader()) as context:
            node = loaded_script_node(context, config_dir)
            module = node.ns
            knoxcall = context.master.addons.get("knoxcall")
            assert isinstance(knoxcall, KnoxCall) and list(addonmanager.traverse([node])) == [node, module]
            context.master.addons.trigger(hooks.RunningHook())
            assert type(node) is hooktable.FlatScript and list(addonmanager.traverse([node])) == [node]
            found = dict(context.master.addons._iter_hooks(node, hooks.all_hooks["requestheaders"](make_flow())))
            assert found == {node: module.requestheaders} and module.requestheaders.__self__ is knoxcall
            # what mitmproxy calls for an event: each of KnoxCall's hooks once, through the node
            flow = make_flow()
            context.master.addons.trigger(hooks.all_hooks["requestheaders"](flow))
            assert flow.metadata["knoxcall"]["decision"] == "allowed", flow.metadata["knoxcall"]
            assert launchguard.GUARD_NAME not in [getattr(a, "name", "") for a in context.master.addons.chain]

            # a script reload removes the module alone: the node leads to modules again, holding no hook
            context.master.addons.remove(module)
            assert type(node) is mitmproxy_script.Script and node.addons == [module]
            assert not hasattr(node, "requestheaders") and context.master.addons.get("knoxcall") is None
            guard = context.master.addons.get(launchguard.GUARD_NAME)
            assert guard.keeper is None and context.master.addons.chain[-1] is guard  # refusing again

    in_loop(scenario)


def test_removing_the_flattened_node_calls_each_done_once_and_forgets_every_name(config_dir, monkeypatch) -> None:  # noqa: F811
    def scenario() -> None:
        with taddons.context(mitmproxy_script.ScriptLoader()) as context:
            node = loaded_script_node(context, config_dir)
            module = node.ns
            context.master.addons.trigger(hooks.RunningHook())
            assert type(node) is hooktable.FlatScript
            calls: list[str] = []
            knoxcall = context.master.addons.get("knoxcall")
            original_done = knoxcall.done
            monkeypatch.setattr(knoxcall, "done", lambda: (calls.append("done"), original_done()))
            context.master.addons.remove(node)  # what ScriptLoader does when the script leaves the scripts option
            assert calls == ["done"]
            lookup = context.master.addons.lookup
            assert module.name not in lookup and "knoxcall" not in lookup and node.name not in lookup
            assert not any(name in vars(node) for name in ("requestheaders", "done", hooktable.FLAT_MARK))
            # the same script can be added again, as mitmproxy allows
            context.master.addons.get("scriptloader").addons.remove(node)
            again = loaded_script_node(context, config_dir)
            assert context.master.addons.get("knoxcall") is not None and again.ns is not module

    in_loop(scenario)


def test_a_node_that_is_not_mitmproxys_plain_script_is_left_as_it_is(config_dir) -> None:  # noqa: F811
    def scenario() -> None:
        class OtherScript(mitmproxy_script.Script):
            pass

        with taddons.context(mitmproxy_script.ScriptLoader()) as context:
            node = loaded_script_node(context, config_dir)
            node.__class__ = OtherScript
            context.master.addons.trigger(hooks.RunningHook())
            assert type(node) is OtherScript and list(addonmanager.traverse([node])) == [node, node.ns]
            flow = make_flow()
            context.master.addons.trigger(hooks.all_hooks["requestheaders"](flow))
            assert flow.metadata["knoxcall"]["decision"] == "allowed", flow.metadata["knoxcall"]

    in_loop(scenario)


def test_a_flattening_that_fails_half_way_leaves_the_node_as_it_was(config_dir, monkeypatch) -> None:  # noqa: F811
    """Hooks on both the node and the module would run twice per event: all or nothing."""

    def scenario() -> None:
        with taddons.context(mitmproxy_script.ScriptLoader()) as context:
            node = loaded_script_node(context, config_dir)
            original_setattr = mitmproxy_script.Script.__setattr__

            def refuse_done(self: Any, name: str, value: Any) -> None:
                if name == "done":
                    raise RuntimeError("refused on purpose")
                original_setattr(self, name, value)

            monkeypatch.setattr(mitmproxy_script.Script, "__setattr__", refuse_done, raising=False)
            context.master.addons.trigger(hooks.RunningHook())
            monkeypatch.undo()
            assert type(node) is mitmproxy_script.Script and list(addonmanager.traverse([node])) == [node, node.ns]
            assert not any(name in vars(node) for name in ("requestheaders", "response", hooktable.FLAT_MARK))
            flow = make_flow()
            context.master.addons.trigger(hooks.all_hooks["requestheaders"](flow))
            assert flow.metadata["knoxcall"]["decision"] == "allowed"

    in_loop(scenario)
