"""Route matching costs linear time and memory in the host and path (issue 8, finding 5).

The former matcher made one string per path segment (and per host label), each as long
as the path: a 40 KB path from anyone cost 0.5 s and 360 MB. Checked here by counting
work, not by timing it: the C calls find() makes, and the peak memory it allocates.
Both must not grow with the number of segments or labels (beyond a pass over the text).
The results are checked against the former matcher, kept below as the reference.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from knoxcall_addon.model import Route, RouteMatch
from knoxcall_addon.policy import RouteTable, normalize_path, path_prefixes


def reference_find(table: RouteTable, host: str, path: str) -> Route | None:
    """RouteTable.find as it was: every host suffix and every path prefix, in full."""
    buckets: list[dict[str, Route]] = []
    if (exact := table.exact.get(host)) is not None:
        buckets.append(exact)
    labels = host.split(".")
    for i in range(1, len(labels)):
        if (bucket := table.wildcard.get(".".join(labels[i:]))) is not None:
            buckets.append(bucket)
    if table.any_host:
        buckets.append(table.any_host)
    normalized = normalize_path(path)
    prefixes = []
    while normalized not in ("/", ""):
        prefixes.append(normalized)
        normalized = normalized.rsplit("/", 1)[0]
    prefixes.append("/")
    for prefix in prefixes:
        for bucket in buckets:
            if (route := bucket.get(prefix)) is not None:
                return route
    return None


def table_of(matches: list[tuple[tuple[str, ...], str]]) -> RouteTable:
    """A table of routes r0, r1... with these (hosts, path_prefix); duplicates dropped."""
    routes = []
    seen: set[tuple[str, str]] = set()
    for i, (hosts, prefix) in enumerate(matches):
        keys = {(h, prefix) for h in hosts} if hosts else {("", prefix)}
        if keys & seen:
            continue
        seen |= keys
        routes.append(Route(f"r{i}", match=RouteMatch(hosts=hosts, path_prefix=prefix)))
    table = RouteTable(routes)
    assert not table.problems
    return table


TABLE = table_of(
    [
        (("api.example.com",), "/v1"),
        (("api.example.com",), "/v1/admin/users"),
        (("*.example.com",), "/v1"),
        (("*.eu.west.example.com",), "/"),
        ((), "/open"),
    ]
)

# -- same answers as the former matcher --------------------------------------------------

SEGMENT = st.sampled_from(["a", "b", "ab", "v1", "admin", ".", "..", "", "%2e%2e", "%2F", "a?b", "x#"])
LABEL = st.sampled_from(["a", "b", "example", "com", "eu", "api", ""])
PREFIX = st.lists(st.sampled_from(["a", "b", "ab", "v1", "admin"]), max_size=4).map(lambda s: "/" + "/".join(s))
HOST = st.lists(LABEL, min_size=1, max_size=6).map(".".join)
WILD = st.lists(st.sampled_from(["a", "b", "example", "com", "eu"]), min_size=1, max_size=3).map(
    lambda labels: "*." + ".".join(labels)
)
MATCHES = st.lists(st.tuples(st.lists(HOST | WILD, max_size=2).map(tuple), PREFIX), max_size=8)
PATH = st.lists(SEGMENT, max_size=8).map(lambda s: "/" + "/".join(s)) | st.text("/ab.%2e?", max_size=12)


@settings(max_examples=500, deadline=None)
@given(matches=MATCHES, host=HOST, path=PATH)
@example(matches=[((), "/")], host="a", path="/a/b")
@example(matches=[(("*.a.b",), "/a/b/ab")], host="x.y.a.b", path="/a/b/ab/v1")
@example(matches=[(("*.a",), "/a")], host=".a", path="/a")
def test_find_agrees_with_the_former_matcher(matches: list[tuple[tuple[str, ...], str]], host: str, path: str) -> None:
    table = table_of(matches)
    assert table.find(host, path) is reference_find(table, host, path)


@pytest.mark.parametrize("depth", range(5))
@pytest.mark.parametrize("path", ["/", "/a", "/a/b", "/a/b/c/d", "/a/./b/../c//d/", "/a?x=/b/c"])
def test_path_prefixes_up_to_a_depth(depth: int, path: str) -> None:
    """The prefixes of at most `depth` segments, and only those: depth + 1 at most."""
    full = path_prefixes(path)
    bounded = path_prefixes(path, depth)
    assert bounded == [p for p in full if p == "/" or p.count("/") <= depth]
    assert len(bounded) <= depth + 1


# -- linear work ------------------------------------------------------------------------


def c_calls(function: Callable[[], Any]) -> int:
    """How many C functions (str methods, dict.get...) ``function`` calls: a count of its work."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event == "c_call":
            count += 1

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return count


def peak_bytes(function: Callable[[], Any]) -> int:
    """The most memory ``function`` held at once (Python allocations, from tracemalloc)."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


DEEP = ["/v1" * 4000, "/v1/admin" * 1000, "/a" * 4000, "/v1/./" * 1500 + "x"]  # 6-12 KB, 1-4k segments
MANY_LABELS = "a." * 4000 + "eu.west.example.com"


@pytest.mark.parametrize("path", DEEP, ids=lambda p: f"{p[:8]}...{len(p)}B")
@pytest.mark.parametrize(
    "host", ["api.example.com", "x.eu.west.example.com", MANY_LABELS], ids=["exact", "wild", "8KB-host"]
)
def test_find_does_a_bounded_number_of_operations(host: str, path: str) -> None:
    """The same number of C calls for a path 8x deeper (and a host 8x longer): none per
    segment or label. The former matcher made one per segment and per label (~4,000 here)."""
    shallow_path = path[: len(path) // 8]
    shallow_host = host[len(host) - len(host) // 8 :] if host is MANY_LABELS else host
    deep = c_calls(lambda: TABLE.find(host, path))
    shallow = c_calls(lambda: TABLE.find(shallow_host, shallow_path))
    assert deep <= 60, deep
    assert deep <= shallow + 4, (deep, shallow)  # a little slack for which prefix matches


@pytest.mark.parametrize("path", DEEP, ids=lambda p: f"{p[:8]}...{len(p)}B")
def test_find_memory_is_linear(path: str) -> None:
    """At most a few copies of the input (normalising may split it into segments once);
    the former matcher held every prefix at once: ~n²/4 bytes, 16 MB for 8 KB."""
    size = len(path) + len(MANY_LABELS)
    assert peak_bytes(lambda: TABLE.find(MANY_LABELS, path)) <= 40 * size + 64 * 1024


def test_find_on_a_megabyte_path_and_host() -> None:
    """1 MB of path (500,000 segments) and of host (500,000 labels): a few MB at most,
    and the right route. The former matcher would have needed ~250 GB for this path."""
    path = "/v1/admin/users" + "/x" * 500_000
    host = "a." * 500_000 + "eu.west.example.com"
    assert TABLE.find("api.example.com", path).name == "r1"  # type: ignore[union-attr]
    assert TABLE.find(host, path).name == "r2"  # type: ignore[union-attr]
    assert peak_bytes(lambda: TABLE.find(host, path)) <= 8 * (len(path) + len(host))
    assert c_calls(lambda: TABLE.find(host, path)) <= 60
    dotted = "/v1/admin/./users" * 50_000  # dot segments: normalised first (one split and join)
    assert TABLE.find("api.example.com", dotted).name == "r1"  # type: ignore[union-attr]
    assert peak_bytes(lambda: TABLE.find("api.example.com", dotted)) <= 40 * len(dotted)
