"""The load-time fast paths (libyaml events, plain CIDR parsing, disjoint ranges) give exactly what the slow paths give.

They exist for speed only (scripts/bench): any difference in values, lines or error
messages would be a behaviour change, so each is compared with the reference path.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
import yaml

from knoxcall_addon import ipmatch, networks, yamlsource
from knoxcall_addon.model import ConfigError, NetworkSet
from knoxcall_addon.yamlsource import LocatedDict, LocatedList


def reference(text: str) -> object:
    """The pure-Python loader alone: the behaviour the fast paths must reproduce."""
    return _pure(text)


def _pure(text: str) -> object:
    parser = yamlsource._LocatingLoader(text)
    parser.source_name = "f.yaml"
    try:
        return parser.get_single_data()
    finally:
        parser.dispose()


def same(a: object, b: object) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, LocatedDict):
        assert isinstance(b, LocatedDict)
        assert list(a) == list(b)
        assert a.location == b.location
        assert a.key_locations == b.key_locations
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, LocatedList):
        assert isinstance(b, LocatedList)
        assert len(a) == len(b)
        assert a.location == b.location
        assert a.item_locations == b.item_locations
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b


DOCUMENTS = [
    "",
    "# only a comment\n",
    "---\n",
    "clients:\n  - name: a\n    ip_address: [10.0.0.0/8, '::1']\n    enabled: false\n",
    "settings:\n  default_environment: production\n  trusted_proxies: []\nroutes: []\n",
    "a: 1\nb: 1.5\nc: null\nd: ~\ne: yes\nf: 2001-12-14\ng: 0x1F\nh: '01'\ni: \"x\\ty\"\n",
    "list:\n- a\n-\n  - b\n  - {c: d}\n- |\n  block\n  text\n- >\n  folded\n",
    "key: !!str 123\n",  # explicit tag
    "base: &b {x: 1}\nother: *b\n",  # anchor and alias
    "base: &b {x: 1}\nmerged:\n  <<: *b\n  y: 2\n",  # merge key
    "? [complex]\n: key\n",  # non-scalar key
    "a: 1\na: 2\n",  # duplicate key
    "a: 1\n---\nb: 2\n",  # two documents
    "a: b: c\n",  # syntax error
    "a:\n  - x\n b: 1\n",
    "a: [1, 2\n",
    "\tfoo: 1\n",
    "'unterminated\n",
    "x: !!binary aGVsbG8=\n",
    "= : 1\n",
    "1: a\ntrue: b\n~: c\n2001-12-14: d\n0o17: e\n",  # non-string keys
    "a: 1\n'a': 2\n",  # duplicate through quoting
    "1: a\n1.0: b\n",  # duplicate: 1 == 1.0
    "x: [a, {b: [c, d]}, []]\ny: {}\nz: !!null ''\n",
    # plain scalars with a slash or two dots are strings without asking the resolvers;
    # near misses (one dot, timestamps, sexagesimal) still go through them
    "a: [10.0.0.0/8, 1.2.3.4, 1/2, 2001:db8::/32, .5., 1_0.5.3, 1.2.3, ./x, '1.2.3']\n"
    "b: [1.5, 1:2:3.5, 1.2e+3, .inf, 2001-12-14t21:59:43.10-05:00, 1:2:3:4:5:6:7:8, 1.]\n"
    "c: {1.2.3.4: x, 10.0.0.0/8: y}\n",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_parse_yaml_matches_the_pure_python_loader(text: str) -> None:
    try:
        expected: object = reference(text)
    except ConfigError as e:
        expected = ("config error", str(e))
    except yaml.YAMLError:
        expected = "yaml error"
    try:
        got: object = yamlsource.parse_yaml(text, "f.yaml")
    except ConfigError as e:
        got = ("config error", str(e))
    if expected == "yaml error":
        # parse_yaml reports it as a ConfigError with the pure loader's words and line
        assert isinstance(got, tuple)
        assert got[0] == "config error"
        assert "invalid YAML" in got[1]
        with pytest.raises(ConfigError) as info:
            yamlsource.parse_yaml(text, "f.yaml")
        mark = _pure_error_line(text)
        assert info.value.problems[0].location.line == mark
    elif isinstance(expected, tuple):
        assert got == expected
    else:
        same(got, expected)


def _pure_error_line(text: str) -> int:
    try:
        _pure(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        return mark.line + 1 if mark else 1
    raise AssertionError("expected a YAML error")


def test_the_event_reader_is_what_reads_a_plain_config() -> None:
    """Guards the speed: a plain config must not silently fall back to the slow loaders."""
    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml: only the pure-Python loader exists")
    text = "clients:\n  - name: a\n    ip_address:\n      - 10.0.0.0/8\n      - 2001:db8::/32\n"
    same(yamlsource._read_events(text, "f.yaml"), reference(text))


def _reference_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _network_texts() -> list[str]:
    rng = random.Random(5)
    texts = ["1.2.3.4", "0.0.0.0/0", "10.0.0.1/8", "01.2.3.4", "1.2.3.4/33", "1.2.3.4/08", "::", "::/0",
             "::ffff:10.0.0.1", "::ffff:a00:0/104", "1::2::3", "12345::", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9",
             "::/129", "ABCD::/16", "2001:db8::1/32", " 10.0.0.0/8", "10.0.0.0/8 ", "1.2.3", "1", "0x1.2.3.4",
             "1.2.3.4 x", "1.2.3.4/", "1.2.3.4/ 8", "1.2.3.4/+8", "1.2.3.4/\u0668", "1.2.3.4//8", "1.2.3.4\n",
             "1.2.3.4/0", "0.0.0.0/00", "1.2.3.4/032", "256.1.1.1", "1.2.3.4\x00", "\u0661.2.3.4", ""]  # fmt: skip
    for _ in range(3000):
        if rng.random() < 0.5:
            prefix, value = rng.randint(0, 32), rng.getrandbits(32)
            if rng.random() < 0.7:
                value &= ~((1 << (32 - prefix)) - 1)
            texts.append(f"{ipaddress.IPv4Address(value)}/{prefix}")
        else:
            prefix, value = rng.randint(0, 128), rng.getrandbits(128) >> rng.choice([0, 64, 100])
            if rng.random() < 0.7:
                value &= ~((1 << (128 - prefix)) - 1)
            address = ipaddress.IPv6Address(value)
            texts.append(f"{address.exploded if rng.random() < 0.3 else address}/{prefix}")
    return texts


def test_plain_network_fast_path_agrees_with_ipaddress() -> None:
    taken = 0
    for text in _network_texts():
        packed = networks.pack_plain_network(text)
        if packed is None:
            continue  # left to the full path
        taken += 1
        fast = NetworkSet.from_packed(packed)[0]
        expected = _reference_network(text)
        assert fast == expected and type(fast) is type(expected), text
    assert taken > 1000  # the fast path is really used


def test_parse_network_results_and_errors_unchanged() -> None:
    for text in _network_texts():
        expected = _reference_network(text)
        try:
            got = networks.parse_network(text)
        except ValueError:
            assert expected is None or "%" in text, text
            continue
        assert got == expected and type(got) is type(expected), text


def _reference_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """parse_ip as it was before its fast path."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def test_parse_ip_fast_path_agrees_with_ipaddress() -> None:
    from knoxcall_addon.ipmatch import parse_ip

    rng = random.Random(7)
    texts = ["1.2.3.4", "01.2.3.4", "1.2.3", "0x1.2.3.4", "256.1.1.1", "::", "::1", "::ffff:1.2.3.4",
             "::ffff:102:304", "::ffff:0:0", "1::2::3", ":::", "12345::", "fe80::1%eth0", "[::1]:80",
             "1.2.3.4:80", "", " 10.0.0.1 ", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7::"]  # fmt: skip
    for _ in range(5000):
        if rng.random() < 0.5:
            texts.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            address = ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 32, 64, 96]))
            texts.append(rng.choice([str(address), address.exploded, str(address).upper()]))
    for text in texts:
        got, expected = parse_ip(text), _reference_ip(text)
        assert got == expected and type(got) is type(expected), text


def test_normalize_path_fast_path_agrees_with_the_full_steps() -> None:
    import posixpath
    from urllib.parse import unquote

    from knoxcall_addon.policy import normalize_path

    def full(path: str) -> str:
        path = unquote(path.split("?", 1)[0].split("#", 1)[0]).replace("\\", "/")
        normalized = posixpath.normpath(path if path.startswith("/") else "/" + path)
        return "/" + normalized.lstrip("/") if normalized.startswith("//") else normalized

    rng = random.Random(3)
    pieces = ["a", "b", "/", ".", "..", "%2e", "%2F", "?", "#", "\\", "//", "x.y", "-", "é", "%", " "]
    for _ in range(20000):
        path = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.7:
            path = "/" + path
        assert normalize_path(path) == full(path), path


def test_decide_builds_the_same_decision_objects_as_the_constructor(tmp_path) -> None:
    """decide() builds its Decisions without the dataclass __init__ (for speed): same objects."""
    import dataclasses

    from benchmarks.bench import make_facts
    from benchmarks.configgen import BENCH_ROUTE, generate
    from knoxcall_addon.decision import Decision, RequestFacts, decide
    from knoxcall_addon.policy import load_policy

    gen = generate(tmp_path / "cfg", clients=40, ranges=400, routes=12)
    policy = load_policy(gen.folder)
    # an address that passes the client check of route-0000 (methods are checked after it)
    assigned = next(iter(policy.access_for("route-0000", "production").allowed))
    assigned_peer = str(policy.config.clients[assigned].networks[0].network_address)
    facts = [
        *make_facts(gen, 600),
        RequestFacts(peer="127.0.0.1", route="no-such-route"),
        RequestFacts(peer="127.0.0.1", route=BENCH_ROUTE, environment="nowhere"),
        RequestFacts(peer="not an ip", route=BENCH_ROUTE),
        RequestFacts(peer=assigned_peer, route="route-0000", host="api0.example.com", path="/r0", method="PATCH"),
        RequestFacts(peer="127.0.0.1", route=BENCH_ROUTE, api_key="unknown"),
        RequestFacts(peer="127.0.0.1", host="unmatched.example", path="/"),
    ]
    reasons = set()
    for f in facts:
        got = decide(policy, f)
        reasons.add(got.reason)
        built = Decision(**{field.name: getattr(got, field.name) for field in dataclasses.fields(Decision)})
        assert got == built
        assert repr(got) == repr(built)
        assert list(vars(got).items()) == list(vars(built).items())
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.allowed = not got.allowed  # type: ignore[misc]
    assert {"client", "client_not_assigned", "ip_not_whitelisted", "route_not_found", "environment_not_found",
            "method_not_allowed", "invalid_api_key"} <= reasons  # fmt: skip


def _reference_sweep(
    intervals: list[tuple[int, int, str]], rank: dict[str, int]
) -> tuple[list[int], list[tuple[str, ...]]]:
    """The range index's intervals as they were built before the disjoint-range fast path:
    one sweep over every start and end event."""
    events = sorted([(s, 1, o) for s, _, o in intervals] + [(e, -1, o) for _, e, o in intervals], key=lambda x: x[0])
    active: dict[str, int] = {}
    starts: list[int] = []
    owners: list[tuple[str, ...]] = []
    i = 0
    while i < len(events):
        position = events[i][0]
        while i < len(events) and events[i][0] == position:
            _, delta, owner = events[i]
            count = active.get(owner, 0) + delta
            if count:
                active[owner] = count
            else:
                del active[owner]
            i += 1
        covering = tuple(sorted(active, key=lambda o: rank.get(o, 0)))
        if owners and owners[-1] == covering:
            continue
        starts.append(position)
        owners.append(covering)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
        owners.insert(0, ())
    return starts, owners


def test_range_index_intervals_match_a_single_sweep() -> None:
    """Disjoint ranges, adjacent ones, nested and repeated ones, ranges at 0 and at the top."""
    rng = random.Random(7)
    for _ in range(400):
        bits = rng.choice([4, 8, 32])
        intervals = []
        for _ in range(rng.randint(0, 30)):
            prefix = rng.randint(0, bits)
            start = rng.getrandbits(bits) >> (bits - prefix) << (bits - prefix) if prefix else 0
            intervals.append((start, start + (1 << (bits - prefix)), rng.choice("abcde")))
        rank = {o: rng.random() for o in "abcde"}
        expected = _reference_sweep(list(intervals), rank)
        assert ipmatch._disjoint(list(intervals), rank) == expected, intervals
