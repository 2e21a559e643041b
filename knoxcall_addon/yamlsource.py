"""Read the config folder's YAML files into plain values that remember where they came from.

Every mapping and list keeps the file and line of each of its entries, so that the
validator can say ``clients.yaml:12: ...`` for any field.  Duplicate keys inside one
mapping are an error here (PyYAML would silently keep the last one).

Fail closed on the folder's entries too: every ``*.yaml``/``*.yml`` name in it is
config, and one that is not a readable regular file (a dangling symlink, a symlink
loop, a directory, a FIFO, a device) is an error, never silently left out; a FIFO or
a device is never opened for reading, so nothing here can hang on one. Aliases may
not expand a document much beyond what is written (a "billion laughs" file is a few
hundred bytes), and values quoted in messages are cut short (`shown`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from knoxcall_addon.model import ConfigError, Location, Problem, cut, elide, shown

YAML_SUFFIXES = (".yaml", ".yml")
# Nodes that aliases may add to a document, beyond those written in it. Anchors are
# handy for a shared list of ranges or clients; a million extra nodes is far more than
# any hand-written config repeats, and far less than a few nested aliases can make.
MAX_ALIAS_EXPANSION = 1_000_000


class LocatedDict(dict):
    """A mapping that knows its own location and the line of each key.

    Key lines are kept as a compact array in key order, not as Location objects: a
    100k-range config has over 100k lines, and a Location each cost ~10 MB.
    """

    __slots__ = ("_lines", "location")
    location: Location
    _lines: array[int]

    def where(self, key: Any) -> Location:
        """The location of ``key`` (which must be in the mapping)."""
        for i, k in enumerate(self):
            if k == key:
                return Location(self.location.file, self._lines[i])
        raise KeyError(key)

    def located_items(self) -> Iterator[tuple[Any, Any, Location]]:
        """(key, value, location of the key) for every entry, in order."""
        file = self.location.file
        for (key, value), line in zip(self.items(), self._lines, strict=True):
            yield key, value, Location(file, line)

    @property
    def key_locations(self) -> dict[Any, Location]:
        file = self.location.file
        return {k: Location(file, line) for k, line in zip(self, self._lines, strict=True)}


class LocatedList(list):
    """A list that knows its own location and the line of each item (compactly, as above)."""

    __slots__ = ("_lines", "location")
    location: Location
    _lines: array[int]

    def where(self, index: int) -> Location:
        """The location of item ``index``."""
        return Location(self.location.file, self._lines[index])

    @property
    def item_locations(self) -> list[Location]:
        file = self.location.file
        return [Location(file, line) for line in self._lines]


def _located_dict(location: Location) -> LocatedDict:
    result = LocatedDict()
    result.location, result._lines = location, array("I")
    return result


def _located_list(location: Location) -> LocatedList:
    result = LocatedList()
    result.location, result._lines = location, array("I")
    return result


@dataclass(frozen=True)
class SourceFile:
    path: Path
    text: str
    data: Any


class _Locating:
    """Constructors for mappings and sequences that record line numbers (from the nodes' marks)."""

    source_name = "<string>"

    def _location(self, node: yaml.Node) -> Location:
        return Location(self.source_name, node.start_mark.line + 1)

    def construct_document(self, node: yaml.Node) -> Any:
        """Refuse a document whose aliases expand too far, before building (or merging) anything."""
        _check_alias_expansion(node, self.source_name)
        return super().construct_document(node)  # type: ignore[misc]

    def construct_located_mapping(self, node: yaml.MappingNode) -> LocatedDict:
        self.flatten_mapping(node)
        result = _located_dict(self._location(node))
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConfigError([Problem(self._location(key_node), "a mapping key must be a plain value")]) from None
            if key in result:
                first = result.where(key)
                raise ConfigError(
                    [
                        Problem(
                            self._location(key_node),
                            f"duplicate key {shown(key)} (first at line {first.line})",
                        )
                    ]
                )
            result[key] = self.construct_object(value_node, deep=True)
            # The key's line, not the value's: a block value starts on the next line,
            # and "unknown key" or "first at line N" must point at the key itself.
            result._lines.append(key_node.start_mark.line + 1)
        return result

    def construct_located_sequence(self, node: yaml.SequenceNode) -> LocatedList:
        result = _located_list(self._location(node))
        result.extend(self.construct_object(child, deep=True) for child in node.value)
        result._lines.extend(child.start_mark.line + 1 for child in node.value)
        return result


def _check_alias_expansion(root: yaml.Node, source_name: str) -> None:
    """Raise ConfigError when aliases make the document more than MAX_ALIAS_EXPANSION
    nodes larger than it is written, or make it contain itself.

    Counted on the composed node graph, where an alias is a second reference to the
    anchored node: each reference after the first adds that node's expanded size. One
    pass over the distinct nodes (iterative: no recursion limit), sizes capped so that
    the numbers stay small whatever the nesting.
    """
    cap = MAX_ALIAS_EXPANSION + 1
    sizes: dict[int, int] = {}  # id(node) -> expanded size (capped), once computed
    referenced: set[int] = set()
    on_path: set[int] = set()
    added = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = _children(node)
        if not children_done:
            if key in sizes:
                continue
            on_path.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in on_path:
                    where = Location(source_name, node.start_mark.line + 1)
                    raise ConfigError(
                        [Problem(where, "invalid YAML: an alias refers to a collection that contains it")]
                    )
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        on_path.discard(key)
        size = 1
        for child in children:
            child_size = sizes[id(child)]
            size += child_size
            if id(child) in referenced:  # an alias: the same node once more
                added += child_size
                if added > MAX_ALIAS_EXPANSION:
                    raise ConfigError(
                        [
                            Problem(
                                Location(source_name, node.start_mark.line + 1),
                                f"invalid YAML: aliases expand the document by more than {MAX_ALIAS_EXPANSION:,} "
                                "nodes (nested anchors and aliases, a 'billion laughs'); write the values out",
                            )
                        ]
                    )
            else:
                referenced.add(id(child))
        sizes[key] = min(size, cap)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value)


class _LocatingLoader(_Locating, yaml.SafeLoader):  # type: ignore[misc]
    """The pure-Python SafeLoader: its error messages are the ones we report."""


# libyaml's parser is ~10x faster on large configs (100k ranges); its nodes carry the
# same line marks. Its error wording differs, so a file it refuses is parsed again with
# the pure-Python loader to report exactly the usual message.
_FastLocatingLoader: type | None = None
if getattr(yaml, "__with_libyaml__", False):

    class _FastLocatingLoader(_Locating, yaml.CSafeLoader):  # type: ignore[no-redef, misc]
        """CSafeLoader with the same constructors."""


for _loader in (_LocatingLoader, _FastLocatingLoader):
    if _loader is not None:
        _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Locating.construct_located_mapping)
        _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _Locating.construct_located_sequence)


class _Unusual(Exception):
    """The document uses something the event reader leaves to the full loaders."""


_STR_TAG = "tag:yaml.org,2002:str"


def _read_events(text: str, source_name: str) -> Any:
    """The same values and locations as _LocatingLoader, built straight from libyaml's events.

    Building no node tree takes a third of the time and half the peak memory on a
    100k-range config. Anything unusual (anchors, aliases, explicit tags, merge keys,
    non-scalar or duplicate keys, several documents) raises _Unusual, and the full
    loaders take the file from the start, with their exact results and messages.
    """
    loader = yaml.CSafeLoader(text)  # type: ignore[attr-defined]
    try:
        get, resolve, constructors = loader.get_event, loader.resolve, loader.yaml_constructors
        get()  # StreamStartEvent
        if isinstance(get(), yaml.StreamEndEvent):
            return None
        stack: list[list[Any]] = []  # [container, key, is_mapping, key_seen, key_line]
        locations: dict[int, Location] = {}  # one Location per line where a container starts
        strings: dict[str, str] = {}  # one object per distinct string: a name is written many times
        root: Any = None
        while True:
            event = get()
            kind = type(event)
            if kind is yaml.ScalarEvent:
                if event.anchor is not None or (event.tag is not None and event.tag != "!"):
                    raise _Unusual
                text = event.value
                if event.implicit[0] and ("/" in text or text.count(".") > 1):
                    tag = _STR_TAG  # no implicit type (int, float, timestamp...) has these: CIDRs
                else:
                    tag = resolve(yaml.ScalarNode, text, event.implicit)
                if tag == _STR_TAG:
                    value = strings.setdefault(text, text)
                elif (construct := constructors.get(tag)) is not None:
                    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
                    value = construct(loader, node)
                else:
                    raise _Unusual  # e.g. "=" (tag:yaml.org,2002:value)
                line = event.start_mark.line + 1
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                if event.anchor is not None or (event.tag is not None and event.tag != "!"):
                    raise _Unusual
                line = event.start_mark.line + 1
                where = locations.get(line) or locations.setdefault(line, Location(source_name, line))
                container = _located_dict(where) if kind is yaml.MappingStartEvent else _located_list(where)
                stack.append([container, None, kind is yaml.MappingStartEvent, False, None])
                continue
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                value = stack.pop()[0]
                line = value.location.line
            elif kind is yaml.DocumentEndEvent:
                break
            else:
                raise _Unusual  # an alias
            if not stack:
                root = value
                continue
            top = stack[-1]
            if not top[2]:
                top[0].append(value)
                top[0]._lines.append(line)
            elif not top[3]:
                if kind is not yaml.ScalarEvent or tag.endswith((":merge", ":value")) or value in top[0]:
                    raise _Unusual
                top[1], top[3], top[4] = value, True, line
            else:
                top[0][top[1]] = value
                top[0]._lines.append(top[4])  # the key's line, as _Locating records it
                top[3] = False
        if not isinstance(get(), yaml.StreamEndEvent):
            raise _Unusual  # several documents: the full loaders say so
        return root
    finally:
        loader.dispose()


def parse_yaml(text: str, source_name: str) -> Any:
    """Parse one YAML document; errors become a ConfigError with file and line."""
    if _FastLocatingLoader is not None:
        try:
            return _read_events(text, source_name)
        except (_Unusual, yaml.YAMLError):
            pass
        fast = _FastLocatingLoader(text)
        fast.source_name = source_name
        try:
            return fast.get_single_data()
        except yaml.YAMLError:
            pass  # report it with the pure-Python loader's words and line, below
        finally:
            fast.dispose()
    loader = _LocatingLoader(text)
    loader.source_name = source_name
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(
            [Problem(Location(source_name, line), f"invalid YAML: {elide(what, 1000)}{syntax_hint(e, text)}")]
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(Location(source_name, 1), f"invalid YAML: {elide(str(e), 1000)}")]) from None
    except RecursionError:
        # PyYAML parses nesting recursively: a pathologically deep file must be a config
        # error with a file name (a reload must not die on it), not a crash.
        raise ConfigError([Problem(Location(source_name, 1), "invalid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()


_KEY_WITHOUT_SPACE = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w.-]*:[^\s:/]")  # name:office (not a URL, not a::1)


def syntax_hint(error: yaml.MarkedYAMLError, text: str) -> str:
    """``"; " + the likely cause`` of a YAML syntax error, in a config writer's terms ("" if
    none fits). PyYAML says what its parser met (``mapping values are not allowed here``),
    which names neither the usual causes nor their fixes."""
    problem = f"{error.problem or ''} {error.context or ''}"
    mark = error.problem_mark or error.context_mark
    lines = text.splitlines()
    index = mark.line if mark else 0
    line = lines[index] if 0 <= index < len(lines) else ""
    if "\t" in line[: len(line) - len(line.lstrip())] or "'\\t'" in problem:  # a tab indents, or starts a token
        return "; a tab on this line: YAML allows no tab in indentation or before a value, use spaces"
    if "alias" in problem or "anchor" in problem:
        return "; a value that starts with '*' or '&' must be quoted, e.g. hosts: [\"*.example.com\"]"
    if "cannot start any token" in problem:
        return "; a value that starts with '@', '`' or '%' must be quoted, e.g. description: \"@home\""
    if "quoted scalar" in problem:
        start = error.context_mark.line + 1 if error.context_mark else index + 1
        return f"; a quote opened on line {start} is not closed"
    if "another document" in problem:
        return "; a config file holds one document: remove the '---' line"
    if "expected ',' or" in problem or "flow " in problem:
        return (
            "; a [list] or {mapping} is not closed, or a value in it holds ',' ':' '[' ']' '{' '}' and must be quoted"
        )
    above_index = next((i for i in range(min(index, len(lines)) - 1, -1, -1) if lines[i].strip()), -1)
    above = lines[above_index] if above_index >= 0 else ""  # the last line with text before this one
    if "mapping values are not allowed" in problem:
        if _KEY_WITHOUT_SPACE.match(above):
            return f"; line {above_index + 1}: a key needs a space after its ':' (name: office, not name:office)"
        value = line.split(": ", 1)[1] if ": " in line else ""
        if ": " in value or value.rstrip().endswith(":"):
            key, value = line.split(":", 1)[0].strip(" -"), value.strip()
            example = value if len(value) <= 40 and '"' not in value else "..."
            return f"; a value that contains ': ' must be quoted, e.g. {cut(key)}: \"{example}\""
        return "; check the indentation: this line is indented deeper than the key it belongs to"
    if "could not find expected ':'" in problem and _KEY_WITHOUT_SPACE.match(line):
        return "; a key needs a space after its ':' (name: office, not name:office)"
    if "expected <block end>" in problem or "expected key" in problem or "'-' indicator" in problem:
        if _KEY_WITHOUT_SPACE.match(above):
            return f"; line {above_index + 1}: a key needs a space after its ':' (name: office, not name:office)"
        return "; check the indentation: keys of one mapping, and the '- ' of one list, must line up"
    return ""


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path if it names a folder; else ConfigError saying what it is.

    The one place that judges the config folder itself, so that ``knoxcall`` and the
    addon's ``knoxcall_config`` say the same words. Messages name the absolute path: a
    relative one is relative to a working directory the reader may not know. An empty
    name is refused rather than read as ``.`` (which ``Path("")`` is).
    """
    if not str(folder).strip():
        raise ConfigError([Problem(Location('""', 0), "the config folder name is empty: name a folder, e.g. config")])
    path = Path(folder)
    where = Location(os.path.abspath(path), 0)
    if path.is_dir():
        return path
    if path.exists():
        hint = f"; name the folder that holds it, {os.path.dirname(where.file)}" if path.suffix in YAML_SUFFIXES else ""
        raise ConfigError([Problem(where, f"the config folder is a file, not a folder{hint}")])
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:  # e.g. `current -> current` for a moment during a release swap
            raise ConfigError([Problem(where, "the config folder is a symlink loop")]) from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise ConfigError([Problem(where, f"the config folder cannot be read: {e.strerror}")]) from None
    if path.is_symlink():
        raise ConfigError([Problem(where, "the config folder is a broken symlink (its target does not exist)")])
    raise ConfigError([Problem(where, "config folder does not exist")])


def config_files(folder: Path) -> list[Path]:
    """Every entry read as config: named ``*.yaml``/``*.yml`` directly in the folder, sorted.

    Hidden names (``.foo.yaml``, editor swap files, Kubernetes' ``..data``) are skipped;
    symlinks are followed, which is how ConfigMap mounts present their files. Entries
    are not filtered by type: one that is not a readable regular file is reported by
    `read_config_file`, never left out (its routes would silently vanish).
    """
    check_folder(folder)
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise ConfigError([Problem(Location(str(folder), 0), f"cannot list the config folder: {e.strerror}")]) from None
    return sorted(folder / name for name in names if name.endswith(YAML_SUFFIXES) and not name.startswith("."))


class UnreadableEntry(Exception):
    """A config entry that is not a readable regular file; the message says what it is."""


_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a FIFO (named pipe)"),
    (stat.S_ISSOCK, "is a socket"),
    (stat.S_ISCHR, "is a character device"),
    (stat.S_ISBLK, "is a block device"),
)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_config_file(path: Path) -> bytes:
    """The bytes of one config entry; UnreadableEntry for anything but a readable regular file.

    Never blocks: the type is checked before opening (a FIFO or device is never opened),
    and again on the open descriptor, opened non-blocking, in case the entry was
    replaced in between.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise UnreadableEntry(_stat_problem(path, e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableEntry(_not_a_file(path, st.st_mode))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise UnreadableEntry(f"cannot read file: {e.strerror}") from None
    with open(fd, "rb", closefd=True) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableEntry(_not_a_file(path, mode))
        try:
            return f.read()
        except OSError as e:
            raise UnreadableEntry(f"cannot read file: {e.strerror}") from None


def _link_note(path: Path) -> str:
    try:
        return f" (a symlink to {shown(os.readlink(path))})"
    except OSError:
        return ""


def _not_a_file(path: Path, mode: int) -> str:
    kind = next((what for test, what in _KINDS if test(mode)), "is not a regular file")
    return (
        f"{kind}{_link_note(path)}, not a regular file: every *.yaml/*.yml entry of the config folder "
        "is config; remove or rename it"
    )


def _stat_problem(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return f"symlink loop{_link_note(path)}: it never reaches a file"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symlink{_link_note(path)}: its target does not exist"
    return f"cannot read file: {error.strerror}"


# The last parse of each file read with ``reuse=True``, by content: a reload that
# changes one small file of a large config parses only that file again. Only
# load_config asks for it, and its builder never changes the values it reads.
_last_parse: dict[str, tuple[bytes, Any]] = {}


def read_folder(folder: Path, *, reuse: bool = False) -> tuple[list[SourceFile], str]:
    """Read and parse every config file; return them and a short hash of their contents.

    ``reuse``: take a file's values from the last such read when its content is the same
    (the values are then shared: callers must not change them).
    """
    global _last_parse
    parsed: dict[str, tuple[bytes, Any]] = {}
    problems: list[Problem] = []
    sources: list[SourceFile] = []
    digest = hashlib.sha256()
    for path in config_files(folder):
        try:
            raw = read_config_file(path)
        except UnreadableEntry as e:
            problems.append(Problem(Location(str(path), 0), str(e)))
            continue
        _hash_file(digest, path, raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            problems.append(Problem(Location(str(path), line), "file is not valid UTF-8"))
            continue
        try:
            if reuse:
                content = hashlib.sha256(raw).digest()
                last = _last_parse.get(str(path))
                if last is not None and last[0] == content:
                    data = last[1]
                else:
                    # Its last parse is of no more use: let the new one take its memory
                    # (the policy in force holds none of it).
                    del last
                    _last_parse.pop(str(path), None)
                    data = parse_yaml(text, str(path))
                parsed[str(path)] = (content, data)
            else:
                data = parse_yaml(text, str(path))
            sources.append(SourceFile(path, text, data))
        except ConfigError as e:
            problems.extend(e.problems)
    if reuse:
        _last_parse = parsed  # one assignment: safe with loads in other threads
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
            raw = read_config_file(path)
        except UnreadableEntry as e:  # what it is, so that another mishap is another version
            raw = b"\0unreadable\0" + str(e).encode("utf-8", "surrogateescape")
        _hash_file(digest, path, raw)
    return digest.hexdigest()[:12]


def _hash_file(digest: Any, path: Path, raw: bytes) -> None:
    """One file's share of the config version (shared by read_folder and folder_version)."""
    digest.update(path.name.encode() + b"\0" + raw + b"\0")
