"""IP address parsing and a range index whose lookups cost O(log n) at any size.

The index turns any number of (possibly overlapping) CIDR ranges into sorted,
disjoint intervals per address family; each interval carries the ids of every
range owner covering it. A lookup is one ``bisect`` on a list of integers.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from bisect import bisect_right
from collections.abc import Hashable, Iterable
from operator import itemgetter

from knoxcall_addon.model import IPAddress, IPNetwork

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4 = re.compile(rf"^{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}$")
_PLAIN_IPV6 = re.compile(r"^[0-9A-Fa-f:]+$")


def parse_ip(text: str) -> IPAddress | None:
    """An address as a peer or header gives it, normalised; None when it is not one.

    ``%zone`` is dropped, ``::ffff:a.b.c.d`` becomes ``a.b.c.d``, and the forms
    ``[v6]``, ``[v6]:port`` and ``v4:port`` that some proxies write are accepted.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    # Fast path for the plain forms every socket reports (~5x faster than ip_address);
    # anything else takes ip_address below, and gives the same result either way.
    if _PLAIN_IPV4.match(text):
        return ipaddress.IPv4Address(int.from_bytes(socket.inet_aton(text)))
    if _PLAIN_IPV6.match(text):
        try:
            address = ipaddress.IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text)))
        except OSError:
            return None
        mapped = address.ipv4_mapped
        return mapped if mapped is not None else address
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class RangeIndex[Owner: Hashable]:
    """Which owners' ranges cover an address; built once, read per request."""

    __slots__ = ("_owners", "_size", "_starts")

    def __init__(self, ranges: Iterable[tuple[IPNetwork, Owner]], order: dict[Owner, int] | None = None) -> None:
        """``order`` ranks owners so that each lookup lists them in a stable order."""
        self._build(
            (
                (network.version, start, start + network.num_addresses, owner)
                for network, owner in ranges
                for start in (int(network.network_address),)
            ),
            order,
        )

    @classmethod
    def from_intervals(
        cls, intervals: Iterable[tuple[int, int, int, Owner]], order: dict[Owner, int] | None = None
    ) -> RangeIndex[Owner]:
        """From (version, first address, last address + 1, owner), e.g. NetworkSet.intervals()."""
        index = cls.__new__(cls)
        index._build(intervals, order)
        return index

    def _build(self, intervals: Iterable[tuple[int, int, int, Owner]], order: dict[Owner, int] | None) -> None:
        events: dict[int, list[tuple[int, int, Owner]]] = {4: [], 6: []}
        size = 0
        for version, start, end, owner in intervals:
            family = events[version]
            family.append((start, 1, owner))
            family.append((end, -1, owner))
            size += 1
        rank = order or {}
        self._starts: dict[int, list[int]] = {}
        self._owners: dict[int, list[tuple[Owner, ...]]] = {}
        for version, family_events in events.items():
            self._starts[version], self._owners[version] = _sweep(family_events, rank)
        self._size = size

    def __len__(self) -> int:
        return self._size

    def lookup(self, address: IPAddress) -> tuple[Owner, ...]:
        """Owners whose ranges contain ``address`` (empty tuple when none)."""
        starts = self._starts[address.version]
        i = bisect_right(starts, int(address)) - 1
        if i < 0:
            return ()
        return self._owners[address.version][i]

    def __contains__(self, address: IPAddress) -> bool:
        return bool(self.lookup(address))


def _sweep[Owner: Hashable](
    events: list[tuple[int, int, Owner]], rank: dict[Owner, int]
) -> tuple[list[int], list[tuple[Owner, ...]]]:
    """Sweep start/end events into disjoint intervals, merging equal neighbours."""
    events.sort(key=itemgetter(0))
    active: dict[Owner, int] = {}
    interned: dict[tuple[Owner, ...], tuple[Owner, ...]] = {(): ()}
    starts: list[int] = []
    owners: list[tuple[Owner, ...]] = []
    rank_of = rank.get
    i = 0
    n = len(events)
    while i < n:
        position = events[i][0]
        while i < n and events[i][0] == position:
            _, delta, owner = events[i]
            count = active.get(owner, 0) + delta
            if count:
                active[owner] = count
            else:
                del active[owner]
            i += 1
        if not active:
            covering = ()
        elif len(active) == 1:
            covering = tuple(active)
        else:
            covering = tuple(sorted(active, key=lambda o: rank_of(o, 0)))
        covering = interned.setdefault(covering, covering)
        if owners and owners[-1] is covering:
            continue
        starts.append(position)
        owners.append(covering)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
        owners.insert(0, ())
    return starts, owners
