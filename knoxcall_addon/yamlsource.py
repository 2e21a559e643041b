"""Read the config folder's YAML files into plain values that remember where they came from.

Every mapping and list keeps the file and line of each of its entries, so that the
validator can say ``clients.yaml:12: ...`` for any field.  Duplicate keys inside one
mapping are an error here (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from knoxcall_addon.model import ConfigError, Location, Problem

YAML_SUFFIXES = (".yaml", ".yml")


class LocatedDict(dict):
    """A mapping that knows its own location and the line of each key."""

    location: Location
    key_locations: dict[Any, Location]


class LocatedList(list):
    """A list that knows its own location and the line of each item."""

    location: Location
    item_locations: list[Location]


@dataclass(frozen=True)
class SourceFile:
    path: Path
    text: str
    data: Any


class _LocatingLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences record line numbers."""

    source_name = "<string>"

    def _location(self, node: yaml.Node) -> Location:
        return Location(self.source_name, node.start_mark.line + 1)

    def construct_located_mapping(self, node: yaml.MappingNode) -> LocatedDict:
        self.flatten_mapping(node)
        result = LocatedDict()
        result.location = self._location(node)
        result.key_locations = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConfigError([Problem(self._location(key_node), "a mapping key must be a plain value")]) from None
            if key in result:
                first = result.key_locations[key]
                raise ConfigError(
                    [
                        Problem(
                            self._location(key_node),
                            f"duplicate key {key!r} (first at line {first.line})",
                        )
                    ]
                )
            result[key] = self.construct_object(value_node, deep=True)
            # The key's line, not the value's: a block value starts on the next line,
            # and "unknown key" or "first at line N" must point at the key itself.
            result.key_locations[key] = self._location(key_node)
        return result

    def construct_located_sequence(self, node: yaml.SequenceNode) -> LocatedList:
        result = LocatedList(self.construct_object(child, deep=True) for child in node.value)
        result.location = self._location(node)
        result.item_locations = [self._location(child) for child in node.value]
        return result


_LocatingLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LocatingLoader.construct_located_mapping
)
_LocatingLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LocatingLoader.construct_located_sequence
)


def parse_yaml(text: str, source_name: str) -> Any:
    """Parse one YAML document; errors become a ConfigError with file and line."""
    loader = _LocatingLoader(text)
    loader.source_name = source_name
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError([Problem(Location(source_name, line), f"invalid YAML: {what}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(Location(source_name, 1), f"invalid YAML: {e}")]) from None
    except RecursionError:
        # PyYAML parses nesting recursively: a pathologically deep file must be a config
        # error with a file name (a reload must not die on it), not a crash.
        raise ConfigError([Problem(Location(source_name, 1), "invalid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()


def config_files(folder: Path) -> list[Path]:
    """The YAML files read from a config folder: directly in it, sorted by name.

    Hidden files (``.foo.yaml``, editor swap files, Kubernetes' ``..data``) are skipped;
    symlinks are followed, which is how ConfigMap mounts present their files.
    """
    if not folder.is_dir():
        raise ConfigError([Problem(Location(str(folder), 0), "config folder does not exist")])
    return sorted(
        p for p in folder.iterdir() if p.suffix in YAML_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def read_folder(folder: Path) -> tuple[list[SourceFile], str]:
    """Read and parse every config file; return them and a short hash of their contents."""
    problems: list[Problem] = []
    sources: list[SourceFile] = []
    digest = hashlib.sha256()
    for path in config_files(folder):
        try:
            raw = path.read_bytes()
        except OSError as e:
            problems.append(Problem(Location(str(path), 0), f"cannot read file: {e.strerror}"))
            continue
        _hash_file(digest, path, raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            problems.append(Problem(Location(str(path), line), "file is not valid UTF-8"))
            continue
        try:
            sources.append(SourceFile(path, text, parse_yaml(text, str(path))))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return sources, digest.hexdigest()[:12]


def folder_version(folder: Path) -> str:
    """The version `read_folder` would give the folder's current files, without parsing them.

    Hot reload compares it with the version in force to skip loads that would change
    nothing (an editor's swap file, a touch, a revert of an invalid edit).
    """
    digest = hashlib.sha256()
    for path in config_files(folder):
        try:
            raw = path.read_bytes()
        except OSError:
            raw = b"\0unreadable\0"
        _hash_file(digest, path, raw)
    return digest.hexdigest()[:12]


def _hash_file(digest: Any, path: Path, raw: bytes) -> None:
    """One file's share of the config version (shared by read_folder and folder_version)."""
    digest.update(path.name.encode() + b"\0" + raw + b"\0")
