"""Addresses and CIDR ranges as written in the config: parsed strictly, packed for the index.

Strict about host bits (with a suggestion), zone indexes refused, IPv4-mapped IPv6 taken as
IPv4; a fast path for the well-formed common case, since configs hold 100k ranges.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from knoxcall_addon.model import ConfigError, IPNetwork, Location, NetworkSet, Problem, pack_network, shown


def parse_networks(value: str, where: Location) -> list[IPNetwork]:
    """Parse "an IP, a CIDR, or 'a, b, c'" into networks; raise ConfigError on any bad part."""
    return list(NetworkSet.from_packed(pack_networks(value, where)))


def pack_networks(value: str, where: Location) -> bytes:
    """parse_networks, packed as in NetworkSet (what the loader keeps)."""
    packed: list[bytes] = []
    problems: list[Problem] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            problems.append(Problem(where, f"empty address in {shown(value)}"))
            continue
        try:
            packed.append(pack_plain_network(part) or pack_network(parse_network(part)))
        except ValueError as e:
            problems.append(Problem(where, str(e)))
    if problems:
        raise ConfigError(problems)
    return b"".join(packed)


_PLAIN_IPV6_NETWORK = re.compile(r"^([0-9A-Fa-f:]+)(?:/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?$")


def pack_plain_network(text: str) -> bytes | None:
    """The common well-formed cases, packed, ~5x faster than ``ip_network(text)`` (100k
    ranges in ~0.1 s). Anything unusual returns None and takes the full path below, which
    gives the same result for what this accepts and the error messages for what it does not."""
    address, slash, prefix_text = text.partition("/")
    if ":" not in address:
        try:
            raw = socket.inet_aton(address)
        except (OSError, ValueError):
            return None
        if socket.inet_ntoa(raw) != address:  # only the canonical dotted quad (inet_aton takes "1.2", hex...)
            return None
        prefix = 32
        if slash:
            if not (prefix_text.isascii() and prefix_text.isdigit()) or prefix_text[0] == "0" != prefix_text:
                return None
            prefix = int(prefix_text)
            if prefix > 32:
                return None
        if int.from_bytes(raw) & ((1 << (32 - prefix)) - 1):
            return None
        return _V4_HEADS[prefix] + raw
    if m := _PLAIN_IPV6_NETWORK.match(text):
        try:
            raw = socket.inet_pton(socket.AF_INET6, m[1])
        except OSError:
            return None
        prefix = int(m[2]) if m[2] is not None else 128
        value = int.from_bytes(raw)
        if value & ((1 << (128 - prefix)) - 1) or (prefix >= 96 and value >> 32 == 0xFFFF):
            return None  # host bits, or IPv4-mapped: the full path handles those
        return _V6_HEADS[prefix] + raw
    return None


# what pack_network puts before an address's bytes, per prefix length
_V4_HEADS = [pack_network(ipaddress.IPv4Network(("0.0.0.0", p)))[:13] for p in range(33)]
_V6_HEADS = [pack_network(ipaddress.IPv6Network(("::", p)))[:1] for p in range(129)]


def parse_network(text: str) -> IPNetwork:
    """One IP or CIDR, strict about host bits; IPv4-mapped IPv6 becomes IPv4."""
    if (fast := pack_plain_network(text)) is not None:
        return NetworkSet.from_packed(fast)[0]
    if "%" in text:
        raise ValueError(f"{shown(text)}: zone indexes (%...) are not allowed in config")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{shown(text)} is not an IP address or CIDR range") from None
        if "has host bits set" in str(e):
            raise ValueError(
                f"{shown(text)} has host bits set; did you mean {loose} (or {text.split('/')[0]} alone)?"
            ) from None
        raise ValueError(f"{shown(text)}: {e}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
