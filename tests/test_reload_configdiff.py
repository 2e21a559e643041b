"""The change summary of a reload: a pure function over two validated configs."""

from __future__ import annotations

import yaml

from knoxcall_addon.configdiff import diff_configs
from knoxcall_addon.loader import load_config

BASE = {
    "settings": {"default_environment": "production"},
    "environments": [{"name": "production"}, {"name": "staging"}],
    "clients": [
        {"name": "office", "ip_address": "192.0.2.0/24"},
        {"name": "vpn", "ip_address": "198.51.100.7"},
    ],
    "routes": [{"name": "api", "target_base_url": "https://api.example.com"}],
    "assignments": {"api": {"production": ["office", "vpn"], "staging": ["office"]}},
    "api_keys": [{"name": "ci", "key_sha256": "0" * 64, "type": "test"}],
}


def config_of(tmp_path, name, data, text=None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return load_config(folder)


def test_added_removed_and_changed_by_name(tmp_path):
    new = yaml.safe_load(yaml.safe_dump(BASE))
    new["clients"] = [
        {"name": "office", "ip_address": "192.0.2.0/25"},  # changed range
        {"name": "lab", "ip_address": "203.0.113.5"},  # added; vpn removed
    ]
    new["assignments"]["api"]["production"] = ["office", "lab"]
    new["assignments"]["api"]["development"] = ["lab"]
    new["environments"].append({"name": "development"})
    new["routes"][0]["enabled"] = False
    new["routes"].append({"name": "status", "requires_clients": False})
    new["api_keys"] = []
    new["settings"]["unmatched_requests"] = "allow"
    diff = diff_configs(config_of(tmp_path, "old", BASE), config_of(tmp_path, "new", new))

    assert diff.get("clients").added == ("lab",)
    assert diff.get("clients").removed == ("vpn",)
    assert diff.get("clients").changed == (("office", "ip_address"),)
    assert diff.get("assignments").added == ("api/development",)
    assert diff.get("assignments").changed == (("api/production", "+lab -vpn"),)
    assert diff.get("environments").added == ("development",)
    assert diff.get("routes").added == ("status",)
    assert diff.get("routes").changed == (("api", "enabled"),)
    assert diff.get("api_keys").removed == ("ci",)
    assert diff.get("settings").changed == (("unmatched_requests", ""),)
    assert diff.summary() == (
        "settings ~unmatched_requests; environments +development; clients +lab -vpn ~office(ip_address); "
        "routes +status ~api(enabled); assignments +api/development ~api/production(+lab -vpn); api_keys -ci"
    )


def test_moving_lines_and_comments_is_not_a_change(tmp_path):
    old = config_of(tmp_path, "old", BASE)
    text = "# a comment\n\n" + yaml.safe_dump(BASE, sort_keys=True)  # other order, other lines
    new = config_of(tmp_path, "new", None, text=text)
    assert old.version != new.version
    diff = diff_configs(old, new)
    assert not diff
    assert diff.summary().startswith("no change in meaning")


def test_from_nothing_everything_is_added(tmp_path):
    diff = diff_configs(None, config_of(tmp_path, "new", BASE))
    assert diff.get("clients").added == ("office", "vpn")
    assert diff.get("assignments").added == ("api/production", "api/staging")
    assert "settings" not in dict(diff.sections)


def test_reordered_assignment_is_reported(tmp_path):
    new = yaml.safe_load(yaml.safe_dump(BASE))
    new["assignments"]["api"]["production"] = ["vpn", "office"]
    diff = diff_configs(config_of(tmp_path, "old", BASE), config_of(tmp_path, "new", new))
    assert diff.get("assignments").changed == (("api/production", "order"),)


def test_a_bulk_change_gives_a_bounded_line(tmp_path):
    old = yaml.safe_load(yaml.safe_dump(BASE))
    new = yaml.safe_load(yaml.safe_dump(BASE))
    new["clients"] += [{"name": f"c{i:03d}", "ip_address": f"10.0.{i}.0/24"} for i in range(100)]
    diff = diff_configs(config_of(tmp_path, "old", old), config_of(tmp_path, "new", new))
    assert len(diff.get("clients").added) == 100
    assert diff.summary(limit=3) == "clients +c000 +c001 +c002 (and 97 more)"
    assert diff.summary(limit=0).count("+c") == 100
