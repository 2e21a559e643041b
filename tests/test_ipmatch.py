"""Address parsing and the range index, checked against a brute-force ipaddress scan."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from knoxcall_addon.ipmatch import RangeIndex, parse_ip
from knoxcall_addon.model import IPAddress, IPNetwork, Location
from knoxcall_addon.networks import parse_networks

ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 10.1.2.3 ", "10.1.2.3"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::1", "::1"),
        ("::ffff:127.0.0.5", "127.0.0.5"),
        ("::ffff:7f00:5", "127.0.0.5"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%25", "fe80::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:8443", "2001:db8::1"),
        ("[fe80::1%eth0]:80", "fe80::1"),
        ("[::ffff:10.0.0.1]:80", "10.0.0.1"),
        ("10.1.2.3:8080", "10.1.2.3"),
        ("0.0.0.0", "0.0.0.0"),
        ("::", "::"),
    ],
)
def test_parse_ip(text: str, expected: str) -> None:
    assert parse_ip(text) == ip(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "10.1.2",
        "10.1.2.256",
        "10.0.0.0/8",
        "[2001:db8::1",
        "2001:db8::g",
        "example.com:80",
        "_hidden",
        "10.1.2.3:80:90",
        "1.2.3.4, 5.6.7.8",
        "%eth0",
    ],
)
def test_parse_ip_garbage(text: str) -> None:
    assert parse_ip(text) is None


def build(*ranges: tuple[str, str]) -> RangeIndex[str]:
    """An index from (cidr-or-'a, b' text, owner) pairs, parsed as the loader parses config."""
    pairs = [(n, owner) for text, owner in ranges for n in parse_networks(text, Location("t", 1))]
    order = {}
    for _, owner in ranges:
        order.setdefault(owner, len(order))
    return RangeIndex(pairs, order=order)


def test_list_and_comma_forms() -> None:
    index = build(("10.0.0.1, 10.0.0.3 ,2001:db8::/126", "a"), ("::ffff:192.168.0.0/120", "b"))
    assert index.lookup(ip("10.0.0.1")) == ("a",)
    assert index.lookup(ip("10.0.0.2")) == ()
    assert index.lookup(ip("10.0.0.3")) == ("a",)
    assert index.lookup(ip("2001:db8::3")) == ("a",)
    assert index.lookup(ip("2001:db8::4")) == ()
    # mapped in the config is IPv4 in the index
    assert index.lookup(ip("192.168.0.77")) == ("b",)
    assert len(index) == 4


def test_overlapping_and_nested_ranges() -> None:
    index = build(("10.0.0.0/8", "wide"), ("10.1.0.0/16", "mid"), ("10.1.2.3", "host"), ("10.1.0.0/24", "mid"))
    assert index.lookup(ip("10.1.2.3")) == ("wide", "mid", "host")  # declaration order
    assert index.lookup(ip("10.1.2.4")) == ("wide", "mid")
    assert index.lookup(ip("10.1.0.5")) == ("wide", "mid")  # one owner, twice: listed once
    assert index.lookup(ip("10.2.0.0")) == ("wide",)
    assert index.lookup(ip("11.0.0.0")) == ()
    assert index.lookup(ip("9.255.255.255")) == ()
    assert ip("10.255.255.255") in index
    assert ip("11.0.0.0") not in index


def test_boundaries_and_extreme_prefixes() -> None:
    index = build(
        ("0.0.0.0/0", "all4"),
        ("255.255.255.255/32", "top4"),
        ("0.0.0.0/32", "zero4"),
        ("::/128", "zero6"),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "top6"),
        ("2001:db8::/127", "pair6"),
    )
    assert index.lookup(ip("0.0.0.0")) == ("all4", "zero4")
    assert index.lookup(ip("255.255.255.255")) == ("all4", "top4")
    assert index.lookup(ip("255.255.255.254")) == ("all4",)
    assert index.lookup(ip("::")) == ("zero6",)
    assert index.lookup(ip("::1")) == ()
    assert index.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == ("top6",)
    assert index.lookup(ip("2001:db8::1")) == ("pair6",)
    assert index.lookup(ip("2001:db8::2")) == ()
    assert index.lookup(ip("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff")) == ()


def test_families_never_mix() -> None:
    """0.0.0.0/0 covers no IPv6 address and ::/0 no IPv4 one (mapped addresses are IPv4 by then)."""
    index = build(("0.0.0.0/0", "v4"))
    assert index.lookup(ip("::1")) == ()
    assert index.lookup(ip("::a00:1")) == ()  # 10.0.0.1's bits as IPv4-compatible IPv6
    index6 = build(("::/0", "v6"))
    assert index6.lookup(ip("10.0.0.1")) == ()
    assert index6.lookup(ip("::1")) == ("v6",)
    assert build().lookup(ip("10.0.0.1")) == ()
    assert build().lookup(ip("::1")) == ()


def test_caller_forms_meet_config_forms() -> None:
    """What a peer reports (mapped, zoned) finds what the config wrote (plain IPv4, plain IPv6)."""
    index = build(("127.0.0.0/29", "loop4"), ("fe80::/64", "link"))
    mapped = parse_ip("::ffff:127.0.0.5")
    zoned = parse_ip("fe80::1%eth0")
    assert mapped is not None and zoned is not None
    assert index.lookup(mapped) == ("loop4",)
    assert index.lookup(zoned) == ("link",)


# -- property: the index agrees with a brute-force scan ----------------------------------


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    # Mostly small address space near a few bases, so that ranges overlap and nest.
    prefix = draw(st.integers(0, bits))
    base = draw(st.sampled_from([0, 1 << (bits - 1), (1 << bits) - (1 << (bits // 2)), (1 << bits) - 1]))
    offset = draw(st.integers(0, (1 << min(bits, 20)) - 1))
    value = (base + offset) % (1 << bits)
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((value, prefix), strict=False)


def addresses_near(ranges: list[tuple[IPNetwork, str]]) -> st.SearchStrategy[IPAddress]:
    """Addresses at and around every range boundary, plus arbitrary ones of both families."""
    edges: list[IPAddress] = []
    for network, _ in ranges:
        cls = type(network.network_address)
        top = (1 << network.max_prefixlen) - 1
        for value in (
            int(network.network_address) - 1,
            int(network.network_address),
            int(network.broadcast_address),
            int(network.broadcast_address) + 1,
        ):
            if 0 <= value <= top:
                edges.append(cls(value))
    anywhere = st.one_of(
        st.integers(0, (1 << 32) - 1).map(ipaddress.IPv4Address),
        st.integers(0, (1 << 128) - 1).map(ipaddress.IPv6Address),
    )
    return st.one_of(st.sampled_from(edges), anywhere) if edges else anywhere


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ranges=st.lists(st.tuples(networks(), st.sampled_from("abcdefgh")), max_size=25))
@example(data=None, ranges=[(net("0.0.0.0/0"), "a"), (net("::/0"), "b"), (net("10.0.0.0/32"), "c")])
def test_lookup_agrees_with_brute_force(data: st.DataObject | None, ranges: list[tuple[IPNetwork, str]]) -> None:
    order: dict[str, int] = {}
    for _, owner in ranges:
        order.setdefault(owner, len(order))
    index = RangeIndex(ranges, order=order)
    probes: list[IPAddress] = []
    if data is None:  # the explicit example: probe the interesting edges directly
        probes = [ip("0.0.0.0"), ip("10.0.0.0"), ip("10.0.0.1"), ip("255.255.255.255"), ip("::"), ip("::1")]
    else:
        probes = [data.draw(addresses_near(ranges)) for _ in range(20)]
    for address in probes:
        expected = {owner for network, owner in ranges if network.version == address.version and address in network}
        got = index.lookup(address)
        assert set(got) == expected, (address, ranges)
        assert len(got) == len(set(got))  # each owner once
        assert list(got) == sorted(got, key=order.__getitem__)  # in declaration order
