"""What changed between two configs, by name: the audit line of each reload.

Pure (no mitmproxy, no I/O). Where a value was written (file and line) is not part of
its meaning: moving a client to another file or line is not a change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from knoxcall_addon.model import Config

# Field names as the YAML spells them, where the model's differ.
_YAML_NAMES = {"networks": "ip_address"}
_NOT_MEANING = ("name", "location")


@dataclass(frozen=True)
class SectionChanges:
    """Names added, removed and changed in one section; `changed` maps a name to what changed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[tuple[str, str], ...] = ()  # (name, detail), detail may be ""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self, limit: int = 0) -> str:
        """``+added -removed ~changed(detail)``; with ``limit``, at most that many names."""
        parts = [f"+{n}" for n in self.added] + [f"-{n}" for n in self.removed]
        parts += [f"~{n}({detail})" if detail else f"~{n}" for n, detail in self.changed]
        if limit and len(parts) > limit:
            parts = [*parts[:limit], f"(and {len(parts) - limit} more)"]
        return " ".join(parts)


SUMMARY_LIMIT = 25  # names per section in a summary line

SECTIONS = ("settings", "environments", "clients", "routes", "assignments", "api_keys", "secrets")


@dataclass(frozen=True)
class ConfigDiff:
    """Per section (in SECTIONS order) what changed; empty sections are left out."""

    sections: tuple[tuple[str, SectionChanges], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sections)

    def get(self, section: str) -> SectionChanges:
        return dict(self.sections).get(section, SectionChanges())

    def summary(self, limit: int = SUMMARY_LIMIT) -> str:
        """One line, e.g. ``clients +lab -office; assignments ~api/production(+lab -office)``.

        At most ``limit`` names per section (0: all), so that a bulk change still gives
        a readable log line; the counts say how much more changed.
        """
        if not self.sections:
            return "no change in meaning (comments, formatting or order only)"
        return "; ".join(f"{name} {changes.summary(limit)}" for name, changes in self.sections)


def diff_configs(old: Config | None, new: Config) -> ConfigDiff:
    """Compare two validated configs section by section, by name."""
    if old is None:
        everything = [
            (section, SectionChanges(added=tuple(_named(new, section))))
            for section in SECTIONS
            if section != "settings" and _named(new, section)
        ]
        return ConfigDiff(tuple(everything))
    sections = []
    settings = _field_changes(old.settings, new.settings)
    if settings:
        sections.append(("settings", SectionChanges(changed=tuple((name, "") for name in settings))))
    for section in SECTIONS[1:]:
        changes = _compare(_named(old, section), _named(new, section), section)
        if section == "secrets":
            changes = _rotated(old, new, changes)
        if changes:
            sections.append((section, changes))
    return ConfigDiff(tuple(sections))


def _rotated(old: Config, new: Config, changes: SectionChanges) -> SectionChanges:
    """Secrets whose value changed (by fingerprint: a diff never holds a value), as ``~name(value)``."""
    changed = dict(changes.changed)
    for name, secret in new.secrets.items():
        before = old.secrets.get(name)
        if before is None:
            continue
        every = (secret.source, before.source, *secret.environments.values(), *before.environments.values())
        sources = {s for s in every if s is not None}
        if any(old.secret_values.fingerprint(s) != new.secret_values.fingerprint(s) for s in sources):
            changed[name] = ",".join(filter(None, (changed.get(name, ""), "value")))
    return SectionChanges(changes.added, changes.removed, tuple(changed.items()))


def _named(config: Config, section: str) -> Mapping[str, Any]:
    """A section as name -> value; assignments are named ``route/environment``."""
    if section == "assignments":
        return {f"{a.route}/{a.environment}": a.clients for a in config.assignments}
    return getattr(config, section)


def _compare(old: Mapping[str, Any], new: Mapping[str, Any], section: str) -> SectionChanges:
    added = tuple(n for n in new if n not in old)
    removed = tuple(n for n in old if n not in new)
    changed = []
    for name in new:
        if name not in old:
            continue
        if section == "assignments":
            if old[name] != new[name]:
                plus = [f"+{c}" for c in new[name] if c not in old[name]]
                minus = [f"-{c}" for c in old[name] if c not in new[name]]
                changed.append((name, " ".join(plus + minus) or "order"))
            continue
        fields = _field_changes(old[name], new[name])
        if fields:
            changed.append((name, ",".join(fields)))
    return SectionChanges(added, removed, tuple(changed))


def _field_changes(old: Any, new: Any) -> list[str]:
    """The names of the dataclass fields whose values differ (location and name ignored)."""
    names = _meaning_fields(type(old))
    if type(new) is type(old) and all(getattr(old, n) == getattr(new, n) for n in names):
        return []  # the usual case, 10k times on a big config's reload: no list, no lookups
    return [_YAML_NAMES.get(n, n) for n in names if getattr(old, n) != getattr(new, n)]


@functools.cache
def _meaning_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_MEANING)
