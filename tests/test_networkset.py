"""NetworkSet, the packed form of a client's networks, against the ipaddress objects it stands for."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from knoxcall_addon.ipmatch import RangeIndex
from knoxcall_addon.model import Client, IPNetwork, Location, NetworkSet
from knoxcall_addon.networks import pack_networks, parse_networks


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        prefix = draw(st.integers(0, 32))
        value = draw(st.integers(0, 2**32 - 1)) >> (32 - prefix) << (32 - prefix)
        return ipaddress.IPv4Network((value, prefix))
    prefix = draw(st.integers(0, 128))
    value = draw(st.integers(0, 2**128 - 1)) >> (128 - prefix) << (128 - prefix)
    return ipaddress.IPv6Network((value, prefix))


@given(st.lists(networks(), max_size=8))
def test_a_network_set_reads_back_what_it_was_given(given_networks: list[IPNetwork]) -> None:
    packed = NetworkSet(given_networks)
    assert len(packed) == len(given_networks)
    assert list(packed) == given_networks
    assert [type(n) for n in packed] == [type(n) for n in given_networks]
    assert packed == tuple(given_networks) and packed == NetworkSet(given_networks)
    assert hash(packed) == hash(NetworkSet(given_networks))
    assert packed[1:3] == tuple(given_networks[1:3])
    for i in range(-len(given_networks), len(given_networks)):
        assert packed[i] == given_networks[i]
    assert list(packed.intervals()) == [
        (n.version, int(n.network_address), int(n.network_address) + n.num_addresses) for n in given_networks
    ]


@given(st.lists(networks(), min_size=1, max_size=4))
def test_packing_a_text_agrees_with_parsing_it(given_networks: list[IPNetwork]) -> None:
    text = ", ".join(str(n) for n in given_networks)
    where = Location("t.yaml", 1)
    expected = parse_networks(text, where)
    assert list(NetworkSet.from_packed(pack_networks(text, where))) == expected


def test_edges_of_each_family_survive_packing() -> None:
    texts = [
        "0.0.0.0/0",
        "255.255.255.255",
        "::/0",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::1",
        "::ffff:10.0.0.1",
    ]
    packed = NetworkSet.from_packed(pack_networks(", ".join(texts), Location("t.yaml", 1)))
    assert [str(n) for n in packed] == [
        "0.0.0.0/0", "255.255.255.255/32", "::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "::1/128",
        "10.0.0.1/32",  # IPv4-mapped IPv6 is IPv4
    ]  # fmt: skip
    index = RangeIndex.from_intervals((v, s, e, "x") for v, s, e in packed.intervals())
    assert index.lookup(ipaddress.ip_address("255.255.255.255")) == ("x",)
    assert index.lookup(ipaddress.ip_address("ffff::1")) == ("x",)  # inside ::/0


def test_clients_built_with_a_tuple_hold_a_network_set() -> None:
    client = Client(name="a", networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert isinstance(client.networks, NetworkSet)
    assert client == Client(name="a", networks=NetworkSet([ipaddress.ip_network("10.0.0.0/8")]))


def test_a_torn_record_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number"):
        NetworkSet.from_packed(b"\x00" * 16)
    with pytest.raises(IndexError):
        NetworkSet()[0]
