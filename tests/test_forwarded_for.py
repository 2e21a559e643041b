"""X-Forwarded-For entries are read strictly (issue 8, finding 8).

`parse_forwarded_entry` is checked against a reference written from the rules with
`ipaddress`, over generated entries; `resolve_client_ip` for how the header is cut
into entries. Addresses here are only data: no traffic is sent.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from knoxcall_addon.decision import resolve_client_ip
from knoxcall_addon.ipmatch import parse_forwarded_entry, parse_ip
from knoxcall_addon.model import IPAddress
from knoxcall_addon.policy import Policy, load_policy


def reference(entry: str) -> IPAddress | None:
    """The documented rules, spelled with ipaddress: an address, v4:port, [v6], [v6]:port;
    a port is 1-65535 in plain decimal; no zone; ::ffff:a.b.c.d is a.b.c.d."""

    def v4(text: str) -> IPAddress | None:
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            return None

    def v6(text: str) -> IPAddress | None:
        if "%" in text:
            return None
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            return None
        return address.ipv4_mapped or address

    def port(text: str) -> bool:
        return text.isascii() and text.isdigit() and not text.startswith("0") and 1 <= int(text) <= 65535

    if (address := v4(entry) or v6(entry)) is not None:
        return address
    if entry.startswith("[") and "]" in entry:
        inside, _, after = entry[1:].partition("]")
        if after == "" or (after.startswith(":") and port(after[1:])):
            return v6(inside)
        return None
    host, colon, after = entry.rpartition(":")
    if colon and port(after):
        return v4(host)
    return None


V4 = st.ip_addresses(v=4).map(str)
V6 = (
    st.ip_addresses(v=6)
    .map(lambda a: st.sampled_from([a.compressed, a.exploded, a.compressed.upper()]))
    .flatmap(lambda s: s)
)
MAPPED = V4.map(lambda a: f"::ffff:{a}")
# wrong ports, among them fullwidth and Arabic-Indic digits (int() reads both)
ODD_PORTS = ["", "0", "00", "080", "+80", "\uff18\uff10", "\u0668\u0660", "1_0", " 80", "80 "]
PORT = st.integers(-2, 70_000).map(str) | st.sampled_from(ODD_PORTS)
ZONE = st.sampled_from(["", "", "", "%eth0", "%", "%25"])
JUNK = st.text("0123456789abcdefABCDEF:.[]%, \t\n", max_size=12)


@st.composite
def entries(draw: st.DrawFn) -> str:
    """Entries near the rules' edges: well-formed, decorated with wrong ports, zones,
    brackets where none belong, trailing junk, or random characters."""
    address = draw(V4 | V6 | MAPPED)
    zone = draw(ZONE)
    form = draw(st.sampled_from(["plain", "port", "bracket", "bracket-port", "junk"]))
    if form == "plain":
        entry = address + zone
    elif form == "port":
        entry = f"{address}{zone}:{draw(PORT)}"
    elif form == "bracket":
        entry = f"[{address}{zone}]"
    elif form == "bracket-port":
        entry = f"[{address}{zone}]:{draw(PORT)}"
    else:
        return draw(JUNK)
    if draw(st.booleans()):
        entry += draw(st.sampled_from(["", "x", ":", "]", " ", "\n", "\t", ":80:80", "]:80"]))
    return entry


@settings(max_examples=3000, deadline=None)
@given(entry=entries())
@example(entry="1.2.3.4:0")
@example(entry="1.2.3.4:65536")
@example(entry="1.2.3.4:abc")
@example(entry="1.2.3.4:")
@example(entry="[2001:db8::1]x")
@example(entry="1.2.3.4%eth0")
@example(entry="1.2.3.4\n")
@example(entry="[1.2.3.4]")
@example(entry="[::1]:")
def test_parse_forwarded_entry_matches_the_reference(entry: str) -> None:
    assert parse_forwarded_entry(entry) == reference(entry)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:1", "1.2.3.4"),
        ("1.2.3.4:65535", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.7", "10.0.0.7"),
        ("[::ffff:10.0.0.7]:80", "10.0.0.7"),
    ],
)
def test_good_entries(entry: str, expected: str) -> None:
    assert parse_forwarded_entry(entry) == ipaddress.ip_address(expected)


BAD_ENTRIES = [
    "1.2.3.4:0",
    "1.2.3.4:65536",
    "1.2.3.4:abc",
    "1.2.3.4:",
    "1.2.3.4:080",
    "1.2.3.4:+80",
    "[2001:db8::1]x",
    "[2001:db8::1]:",
    "[2001:db8::1]:0",
    "[2001:db8::1",
    "[1.2.3.4]",
    "[1.2.3.4]:80",
    "1.2.3.4%eth0",
    "fe80::1%eth0",
    "[fe80::1%eth0]:80",
    "01.2.3.4",
    "1.2.3.4\n",
    "\x0b1.2.3.4",
    "1.2.3.4:80:90",
    "unknown",
    "_hidden",
]


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_bad_entries(entry: str) -> None:
    assert parse_forwarded_entry(entry) is None


def test_peers_keep_the_forgiving_parser() -> None:
    """Peers come from the socket: parse_ip still drops a zone and reads host:port forms."""
    assert parse_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse_ip("10.1.2.3:8080") == ipaddress.ip_address("10.1.2.3")


# -- cutting the header into entries -------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    folder: Path = tmp_path_factory.mktemp("xff")
    (folder / "c.yaml").write_text(
        "settings: {trusted_proxies: [127.0.0.50, 10.9.0.0/16]}\n"
        "environments: [{name: production}]\nclients: [{name: c, ip_address: 10.0.0.0/24}]\n"
        "routes: [{name: r}]\nassignments: {r: {production: [c]}}\n"
    )
    return load_policy(folder)


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        (("10.0.0.7",), "10.0.0.7"),
        (("10.0.0.7,10.9.1.1",), "10.0.0.7"),  # no whitespace needed
        (("10.0.0.7 ,\t10.9.1.1\t",), "10.0.0.7"),  # spaces and tabs around entries
        (("198.51.100.1, 10.0.0.7", "10.9.1.1"), "10.0.0.7"),  # field lines: one list, in order
        (("198.51.100.1", "10.0.0.7, 10.9.1.1"), "10.0.0.7"),
        ((",, 10.0.0.7 , ,", ""), "10.0.0.7"),  # empty elements (and an empty line) are skipped
        (("10.0.0.7, 10.9.1.1:8080, [::ffff:10.9.2.2]:443",), "10.0.0.7"),
        # anything not strictly an entry stops the walk at the last trusted hop
        *(((f"10.0.0.7, {bad}",), "127.0.0.50") for bad in BAD_ENTRIES),
        *(((f"10.0.0.7, {bad}, 10.9.1.1",), "10.9.1.1") for bad in BAD_ENTRIES),
        (("10.0.0.7, 10.9.1.1:0",), "127.0.0.50"),
        (("10.0.0.7,\x0b10.9.1.1",), "127.0.0.50"),  # only space and tab are whitespace
        (("10.0.0.7,\xa010.9.1.1",), "127.0.0.50"),
        (("10.0.0.7,\udcff10.9.1.1",), "127.0.0.50"),  # a non-UTF-8 byte (surrogateescape)
    ],
    ids=lambda value: repr(value) if isinstance(value, tuple) else None,
)
def test_header_cut_into_entries(policy: Policy, headers: tuple[str, ...], client: str) -> None:
    client_ip, peer_ip = resolve_client_ip(policy, "127.0.0.50", headers)
    assert str(client_ip) == client
    assert str(peer_ip) == "127.0.0.50"
