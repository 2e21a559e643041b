"""scripts/bench's instruction counts: the do-nothing script mirrors KnoxCall's, and the counter runs.

No figures are asserted (they belong to scripts/bench): only that the no-op variant has
the shape mitmproxy charges for (the same objects, hooks and nesting as the entry point),
and that a count under callgrind comes back with every request answered.
"""

from __future__ import annotations

import shutil
from typing import Any

import mitmproxy.proxy.layers  # noqa: F401  (defines the HTTP, TCP, ... events: all of hooks.all_hooks)
import pytest
from mitmproxy import hooks

import knoxcall_addon.addon as entry_point
from benchmarks import instructions, noop_addon


def shape(node: Any) -> tuple[Any, ...]:
    """What mitmproxy walks for each event: the hooks of a node, and its sub-addons' shapes."""
    own = tuple(sorted(name for name in hooks.all_hooks if callable(getattr(node, name, None))))
    return own, tuple(shape(child) for child in getattr(node, "addons", None) or ())


def test_the_noop_script_has_the_entry_points_shape() -> None:
    assert shape(noop_addon) == shape(entry_point)
    assert "requestheaders" in str(shape(entry_point))  # not trivially equal
    for noop in nodes(noop_addon):
        for name in hooks.all_hooks:
            hook = getattr(noop, name, None)
            if callable(hook) and name not in ("load", "configure", "running", "done"):
                assert hook(object()) is None  # does nothing


def nodes(root: Any) -> list[Any]:
    found = [root]
    for child in getattr(root, "addons", None) or ():
        found += nodes(child)
    return found


def test_ratios_are_against_bare() -> None:
    result = {"variants": {"bare": {"instructions_per_request": 1000}, "x": {"instructions_per_request": 1250}}}
    assert instructions.ratios(result) == {"x": {"extra_per_request": 250, "ratio": 0.8}}


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind is not installed")
@pytest.mark.timeout(300)
def test_a_count_under_callgrind_answers_every_request(tmp_path) -> None:
    result = instructions.count_variants(
        [instructions.Variant("bare", [], {"x-test": "1"})], tmp_path, requests=8, rounds=2, warmup=4, connections=2
    )
    bare = result["variants"]["bare"]
    assert bare["unexpected_status"] == 0
    assert len(bare["per_round"]) == 2
    assert bare["instructions_per_request"] > 100_000  # mitmdump's work for a request, counted
