"""What a load reuses from the last one (parsed files, the client index)
never changes its result: every load equals a load from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest

from knoxcall_addon import policy, yamlsource
from knoxcall_addon.decision import RequestFacts, decide
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import load_policy

BASE = {
    "environments.yaml": "environments:\n  - name: production\n  - name: staging\n",
    "clients.yaml": "clients:\n  - name: office\n    ip_address: [10.1.0.0/16, '2001:db8::/32']\n"
    "  - name: home\n    ip_address: 192.0.2.7, 10.1.2.0/24\n",
    "routes.yaml": "routes:\n  - name: api\nassignments:\n  api:\n    production: [office]\n    staging: [home]\n",
}


def fresh(folder: Path) -> policy.Policy:
    """A load with nothing to reuse."""
    policy.forget_previous_load()
    assert not yamlsource._last_parse and policy._last_client_index is None
    return load_policy(folder)


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def verdicts(p: policy.Policy) -> list[tuple[bool, str, str | None]]:
    out = []
    for ip in ("10.1.2.3", "10.1.9.9", "192.0.2.7", "2001:db8::5", "198.51.100.1"):
        for env in ("production", "staging"):
            d = decide(p, RequestFacts(peer=ip, route="api", environment=env))
            out.append((d.allowed, d.reason, d.client))
    return out


@pytest.mark.parametrize(
    "change",
    [
        {"routes.yaml": BASE["routes.yaml"].replace("staging: [home]", "staging: [home, office]")},
        {"clients.yaml": BASE["clients.yaml"].replace("10.1.2.0/24", "10.1.9.0/24")},
        {"clients.yaml": BASE["clients.yaml"] + "  - name: extra\n    ip_address: 10.1.2.128/25\n"},
        {"clients.yaml": BASE["clients.yaml"].replace("name: office", "name: office\n    enabled: false")},
        {
            "clients.yaml": BASE["clients.yaml"].replace("  - name: office", "  - name: zeta"),
            "routes.yaml": BASE["routes.yaml"].replace("[office]", "[zeta]"),
        },
    ],
)
def test_a_reload_equals_a_load_from_scratch(tmp_path: Path, change: dict[str, str]) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    write(folder, BASE)
    first = fresh(folder)
    write(folder, change)
    reloaded = load_policy(folder)  # reuses what it can from `first`
    scratch = fresh(folder)
    assert reloaded.config == scratch.config
    assert reloaded.version == scratch.version != first.version
    assert verdicts(reloaded) == verdicts(scratch)


def test_unchanged_clients_keep_their_index_and_changed_ones_get_a_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    write(folder, BASE)
    first = fresh(folder)
    write(folder, {"routes.yaml": BASE["routes.yaml"].replace("staging: [home]", "staging: []")})
    second = load_policy(folder)
    assert second.clients_by_ip is first.clients_by_ip  # reused: nothing about clients changed
    write(folder, {"clients.yaml": BASE["clients.yaml"].replace("192.0.2.7", "192.0.2.8")})
    third = load_policy(folder)
    assert third.clients_by_ip is not first.clients_by_ip
    assert decide(third, RequestFacts(peer="192.0.2.8", route="api", environment="production")).reason == (
        "client_not_assigned"
    )


def test_an_invalid_edit_is_reported_as_from_scratch(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    write(folder, BASE)
    fresh(folder)
    write(folder, {"clients.yaml": BASE["clients.yaml"].replace("10.1.2.0/24", "10.1.2.1/24")})
    with pytest.raises(ConfigError) as reloaded:
        load_policy(folder)
    with pytest.raises(ConfigError) as scratch:
        fresh(folder)
    assert str(reloaded.value) == str(scratch.value)
    assert "has host bits set" in str(reloaded.value)
