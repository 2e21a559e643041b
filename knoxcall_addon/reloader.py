"""Hot reload: watch the config folder, load off the event loop, swap on the loop.

- `FolderWatcher`: watchdog on the folder (plus the folders that its symlinked files
  point into, for Kubernetes ConfigMaps, and its parent, for the folder itself being
  replaced), a debounce that also waits for config files still open for writing, and
  one worker thread that runs a callback when the events have been quiet for a while.
- `HotReload`: turns a quiet period into at most one load of the folder (in the
  worker thread), and the result into one `install(policy)` call on the event loop.
  It never replaces a good policy with anything but another good one.
- `timed_load`: load + compile a folder and say how long it took (for scripts/bench).

No mitmproxy import: the addon passes in the event loop and its install function.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from knoxcall_addon.configdiff import ConfigDiff, diff_configs
from knoxcall_addon.model import ConfigError, Location, Problem
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.yamlsource import YAML_SUFFIXES, folder_version

logger = logging.getLogger("knoxcall")

DEBOUNCE_SECONDS = 0.25  # quiet time after the last event before a reload
SETTLE_SECONDS = 0.05  # ... when that event completed a config file (closed after writing, renamed into place)
MAX_DELAY_SECONDS = 2.0  # a reload happens at most this long after a burst started
OPEN_WAIT_SECONDS = 2.0  # a file still open for writing: wait this long for more events
MAX_OPEN_DELAY_SECONDS = 10.0  # ... but read it at the latest this long after the burst started
MAX_PROBLEMS_LOGGED = 10
COMMAND_WAIT_SECONDS = 2.0  # knoxcall.reload blocks the event loop at most this long

# Events that may mean new content. Opening and reading (ours included) are not among
# them, so that loading the files never triggers another load.
WATCHED_EVENTS = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
]
_WATCHED_TYPES = tuple(WATCHED_EVENTS)


@dataclass(frozen=True)
class TimedLoad:
    policy: Policy
    seconds: float  # read + parse + validate + compile


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``); elsewhere a no-op.

    A reload holds two policies for a moment; without this, the process keeps much of
    that peak as resident memory (with a 100k-range config, ~159 MB after a few reloads
    instead of ~146)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # e.g. musl has no malloc_trim
        ctypes.CDLL(None).malloc_trim(0)


def quiet_watchdog_debug() -> None:
    """Keep watchdog's own DEBUG lines (one per file event) out of the log.

    The config folder's parent is watched too. With debug verbosity and mitmproxy's
    output written to a file there, each such line is a new event, which is logged,
    which is a new event...: a log storm at idle. Set a level on the "watchdog" logger
    yourself to see them anyway.
    """
    watchdog_logger = logging.getLogger("watchdog")
    if watchdog_logger.level == logging.NOTSET:
        watchdog_logger.setLevel(logging.INFO)


def timed_load(folder: str | Path) -> TimedLoad:
    """Load and compile a folder the way a reload does; raise ConfigError if invalid."""
    start = time.perf_counter()
    policy = load_policy(folder)
    return TimedLoad(policy, time.perf_counter() - start)


def watch_dirs(folder: Path) -> set[Path]:
    """The folder (resolved), and every folder that one of its YAML symlinks points into.

    A ConfigMap's ``x.yaml`` is a symlink to ``..data/x.yaml`` and ``..data`` a symlink
    to ``..2026_...``: its swap is seen in the folder itself, an edit behind a symlink
    (or in a file linked from elsewhere) only in the target's folder. Resolved, so that
    a folder that is itself a symlink (``/srv/knoxcall/current -> release-2``) is
    watched where its files are, and re-pointed when the link is swapped.
    """
    dirs = {folder.resolve()}
    try:
        entries = list(folder.iterdir())
    except OSError:
        return dirs
    for path in entries:
        if path.suffix in YAML_SUFFIXES and not path.name.startswith(".") and path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            dirs.add(target.parent)
    return dirs


class _Handler(FileSystemEventHandler):
    """Passes events on; with ``only_name``, only those about that name (the folder in its parent)."""

    def __init__(self, note: Callable[[FileSystemEvent], None], only_name: str | None = None) -> None:
        self._note = note
        self._only_name = only_name

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, _WATCHED_TYPES):
            return
        if self._only_name is not None:
            names = {os.path.basename(os.fsdecode(event.src_path))}
            if getattr(event, "dest_path", ""):
                names.add(os.path.basename(os.fsdecode(event.dest_path)))
            if self._only_name not in names:
                return
        self._note(event)


class FolderWatcher:
    """Calls ``on_quiet`` (in its own thread) once per burst of file system events.

    The call comes ``debounce`` seconds after the last event of a burst, or at the
    latest ``max_delay`` after its first, so that a tool writing without pause cannot
    hold reloads back forever. Events that arrive during a call make one more call.

    When the last event completed a config file (closed after writing, or renamed into
    place, as editors save), the quiet time is only ``settle``: the write is over, and
    a tool writing several files still has its next event well within it.

    A file that was written to and not yet closed is being written: the call then
    waits for its close (at most ``open_wait`` of silence, ``max_open_delay`` in all),
    so that a slow writer's half-written file is not read, let alone put in force
    when its first half happens to be valid YAML.
    """

    def __init__(
        self,
        folder: str | Path,
        on_quiet: Callable[[], None],
        debounce: float = DEBOUNCE_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        open_wait: float = OPEN_WAIT_SECONDS,
        max_open_delay: float = MAX_OPEN_DELAY_SECONDS,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self.folder = Path(os.path.abspath(folder))
        self._on_quiet = on_quiet
        self._debounce = debounce
        self._settle = min(settle, debounce)
        self._max_delay = max_delay
        self._open_wait = open_wait
        self._max_open_delay = max_open_delay
        self._cond = threading.Condition()
        self._first_event: float | None = None
        self._last_event = 0.0
        self._writing: set[str] = set()  # files modified and not yet closed
        self._completed = False  # the last event that counts completed a config file
        self._stopping = False
        self._observer = Observer()
        self._observer.name = "knoxcall-watchdog"
        self._observer.daemon = True
        self._handler = _Handler(self.note)
        self._parent_handler = _Handler(self.note, only_name=self.folder.name)
        # dir -> (watch, (dev, inode) when scheduled, handler)
        self._watches: dict[Path, tuple[object, tuple[int, int] | None, _Handler]] = {}
        self._warned: set[Path] = set()
        self._thread = threading.Thread(target=self._run, name="knoxcall-reload", daemon=True)
        self.calls = 0  # how many times on_quiet ran (tests read it)

    def start(self) -> None:
        """Start the observer, then add the watches: one that fails (e.g. the inotify
        instance limit) is a warning, never an exception in a mitmproxy hook."""
        quiet_watchdog_debug()
        self._observer.start()
        self._update_watches()
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        """Stop both threads and wait for them: nothing outlives the proxy."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._observer.is_alive() or self._thread.is_alive()

    @property
    def watched(self) -> list[Path]:
        """The folders whose files are read (not the parent watched for the folder's replacement)."""
        return sorted(path for path, (_, _, handler) in self._watches.items() if handler is self._handler)

    def note(self, event: FileSystemEvent) -> None:
        """An event from watchdog's thread: track files being written, then poke."""
        src = os.fsdecode(event.src_path)
        with self._cond:
            if isinstance(event, FileModifiedEvent) and _is_config_name(src):
                # Only config files: an editor keeps its swap file open while you type.
                self._writing.add(src)
            elif isinstance(event, (FileClosedEvent, FileDeletedEvent, FileMovedEvent)):
                self._writing.discard(src)
                if isinstance(event, FileMovedEvent):  # renamed over: a new, complete file
                    self._writing.discard(os.fsdecode(event.dest_path))
            if isinstance(event, FileClosedEvent):
                self._completed = self._completed or _is_config_name(src)
            elif isinstance(event, FileMovedEvent) and _is_config_name(os.fsdecode(event.dest_path)):
                self._completed = True
            elif not isinstance(event, DirModifiedEvent) and (event.is_directory or _is_config_name(src)):
                # (a folder's own "modified" follows any change in it; other files,
                # e.g. an editor's swap or temp file, are never read)
                self._completed = False
        self.poke()

    def poke(self) -> None:
        """Note an event; the call follows when events have been quiet for a while."""
        with self._cond:
            now = time.monotonic()
            if self._first_event is None:
                self._first_event = now
            self._last_event = now
            self._cond.notify_all()

    def _due(self) -> float:
        assert self._first_event is not None
        if self._writing:
            return min(self._last_event + self._open_wait, self._first_event + self._max_open_delay)
        quiet = self._settle if self._completed else self._debounce
        return min(self._last_event + quiet, self._first_event + self._max_delay)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._first_event is None:
                    self._cond.wait()
                while not self._stopping and self._first_event is not None:
                    remaining = self._due() - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                if self._writing:
                    logger.warning(
                        f"knoxcall: {', '.join(sorted(self._writing))} still open for writing; reading it anyway"
                    )
                self._first_event = None
                self._writing.clear()
                self._completed = False
            self.calls += 1
            try:
                self._on_quiet()
            except Exception:
                logger.exception("knoxcall: error in the config watcher; the config in force is unchanged")
            if self._update_watches():
                # A new watch (a swapped or re-created folder) cannot have seen what was
                # written between the load and now: look once more.
                self.poke()

    def _update_watches(self) -> bool:
        """Watch the folder, the folders its symlinks point into (they change on a swap),
        and the folder's parent for the folder itself being replaced or re-linked.

        Returns whether a folder whose files are read got a new watch."""
        added = False
        wanted: dict[Path, _Handler] = {d: self._handler for d in watch_dirs(self.folder)}
        parent = self.folder.parent
        if parent not in wanted and parent != self.folder:
            wanted[parent] = self._parent_handler
        for path, (watch, identity, _) in list(self._watches.items()):
            # A folder deleted and created again (or moved away and another moved in)
            # has a new inode and needs a new watch: the old one died with the old folder.
            if path not in wanted or _identity(path) != identity:
                del self._watches[path]
                with contextlib.suppress(Exception):  # the folder is gone, and so is its watch
                    self._observer.unschedule(watch)  # type: ignore[arg-type]
        for path, handler in sorted(wanted.items()):
            if path in self._watches:
                continue
            try:
                watch = self._observer.schedule(handler, str(path), recursive=False, event_filter=WATCHED_EVENTS)
            except OSError as e:
                if path not in self._warned and handler is self._handler:
                    self._warned.add(path)
                    logger.warning(f"knoxcall: cannot watch {path}: {e}; use knoxcall.reload after edits")
                continue
            self._warned.discard(path)
            self._watches[path] = (watch, _identity(path), handler)
            added = added or handler is self._handler
        return added


def _is_config_name(path: str) -> bool:
    """Named like a file that config_files() reads (not hidden, .yaml/.yml)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.endswith(YAML_SUFFIXES)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


Status = Literal["loaded", "unchanged", "invalid", "same_error"]


@dataclass(frozen=True)
class LoadResult:
    """One load attempt, and the latest good policy read from the folder after it.

    ``version`` is the content that was read; ``seconds`` the load + compile time.
    """

    status: Status
    ticket: int
    generation: int
    version: str = ""
    policy: Policy | None = None  # the latest good policy of this folder (new or not)
    error: ConfigError | None = None
    cleared_error: bool = False  # an earlier error is gone (files fixed or reverted)
    seconds: float = 0.0
    base: Policy | None = None  # what ``diff`` was computed against (off the loop)
    diff: ConfigDiff | None = None


class HotReload:
    """Keeps the policy of one folder current; the addon owns the policy, this the reloads.

    ``install(policy, note)`` must put the policy in force with one assignment and log
    its line; it is only ever called on the event loop. ``current()`` returns the policy
    in force. Loads are serialised and numbered; on the loop, only a result newer than
    the last one applied may install, so an older read never replaces a newer one.
    """

    def __init__(
        self,
        install: Callable[[Policy, str], None],
        current: Callable[[], Policy | None],
        debounce: float = DEBOUNCE_SECONDS,
    ) -> None:
        self._install = install
        self._current = current
        self._debounce = debounce
        self._lock = threading.Lock()  # one load at a time (watcher thread or command)
        self._ticket = 0
        self._applied_ticket = 0
        self._latest: Policy | None = None  # the latest good policy read (maybe not yet installed)
        self.generation = 0  # bumped when re-pointed: results for an old folder are dropped
        self.folder: Path | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watcher: FolderWatcher | None = None
        self.failed_version = ""  # the content whose error is the last error
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reloads = 0  # successful reloads since start
        self._command_threads: list[threading.Thread] = []

    # -- lifecycle (event loop) --------------------------------------------------------

    def set_folder(self, folder: str | Path, policy: Policy) -> None:
        """The folder whose ``policy`` was just installed (at start or by the option)."""
        with self._lock:
            self.generation += 1
            self.folder = Path(folder)
            self._latest = policy
            self._clear_error()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Re)start watching ``folder``; checks once at once for edits made since the load."""
        self.stop()
        if self.folder is None:
            return
        self.loop = loop
        generation = self.generation
        self.watcher = FolderWatcher(self.folder, lambda: self._on_quiet(generation), self._debounce)
        self.watcher.start()
        self.watcher.poke()
        if self.watcher.watched:
            logger.info(f"knoxcall: watching {', '.join(str(p) for p in self.watcher.watched)} for config changes")

    def stop(self) -> None:
        """Stop watching; results still on their way to the loop are dropped."""
        if self.watcher is not None:
            with self._lock:
                self.generation += 1
            self.watcher.stop()
            self.watcher = None
        for thread in self._command_threads:  # a knoxcall.reload still loading
            thread.join(30)
        self._command_threads = []

    @property
    def watching(self) -> bool:
        return self.watcher is not None and self.watcher.is_alive()

    # -- loading (any thread) ----------------------------------------------------------

    def attempt(self) -> LoadResult:
        """Read the folder; load and compile it if its content is new. Never raises ConfigError."""
        with self._lock:
            if self.folder is None:
                raise RuntimeError("no config folder set")
            self._ticket += 1
            ticket, generation, folder, latest = self._ticket, self.generation, self.folder, self._latest
            start = time.perf_counter()
            try:
                version = folder_version(folder)
            except (ConfigError, OSError) as e:  # the folder itself is gone or unreadable
                e = _as_config_error(folder, e)
                version = "unreadable"
                if version == self.failed_version:
                    return LoadResult("same_error", ticket, generation, version, latest)
                self._set_error(version, e)
                return LoadResult("invalid", ticket, generation, version, latest, error=e)
            if latest is not None and version == latest.version:
                cleared = self._clear_error()
                return LoadResult("unchanged", ticket, generation, version, latest, cleared_error=cleared)
            if version == self.failed_version:
                return LoadResult("same_error", ticket, generation, version, latest)
            try:
                policy = load_policy(folder)
            except Exception as e:  # ConfigError, or anything unexpected: never a half policy
                e = _as_config_error(folder, e)
                self._set_error(version, e)
                return LoadResult("invalid", ticket, generation, version, latest, error=e)
            self._latest = policy
            cleared = self._clear_error()
            seconds = time.perf_counter() - start
            # Diffing 100k clients takes a good fraction of a second: here, not on the loop.
            diff = diff_configs(latest.config if latest else None, policy.config)
            return LoadResult(
                "loaded", ticket, generation, policy.version, policy, None, cleared, seconds, base=latest, diff=diff
            )

    def _on_quiet(self, generation: int) -> None:
        """Watcher thread: load off the loop, then hand the result to the loop."""
        if generation != self.generation or self.loop is None:
            return
        result = self.attempt()
        if result.status in ("same_error", "unchanged") and not result.cleared_error:
            return  # nothing new: an earlier result (if any is queued) brings the latest policy
        applied = threading.Event()

        def apply_here() -> None:
            try:
                self.apply(result)
            finally:
                applied.set()

        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self.loop.call_soon_threadsafe(apply_here)
            if result.status == "loaded" and applied.wait(COMMAND_WAIT_SECONDS):
                # The policy that was in force is now ours alone (result.base): free it here,
                # not on the event loop, then give the memory of the load back.
                del result
                release_free_memory()

    # -- applying (event loop) ---------------------------------------------------------

    def apply(self, result: LoadResult) -> str:
        """Act on a load result on the event loop; return what happened, in words."""
        if result.generation != self.generation:
            return "the config folder was changed meanwhile; result ignored"
        current = self._current()
        serving = current.version if current else "none"
        installed = ""
        if result.ticket > self._applied_ticket:
            self._applied_ticket = result.ticket
            new = result.policy
            if new is not None and new is not current:
                diff = result.diff
                if diff is None or result.base is not current:  # rare: diffed against another policy
                    diff = diff_configs(current.config if current else None, new.config)
                timing = f" in {result.seconds * 1000:.0f} ms" if result.status == "loaded" else ""
                self._install(new, f"reloaded{timing}, was {serving}: {diff.summary()}")
                self.reloads += 1
                installed = f"config {new.version} loaded (was {serving}): {diff.summary()}"
                serving = new.version
        if result.status == "invalid":
            problems = format_problems(result.error) if result.error else "?"
            logger.error(f"knoxcall: config in {self.folder} is invalid, still serving {serving}: {problems}")
            return f"config invalid, still serving {serving}: {problems}"
        if result.status == "same_error":
            return f"files unchanged since the last error, still serving {serving}: {self.last_error}"
        if result.cleared_error:
            logger.info(f"knoxcall: config in {self.folder} is valid again; serving {serving}")
        if installed:
            return installed
        if result.status == "loaded":
            return f"a newer reload was applied already; serving {serving}"
        return f"config {serving} unchanged"

    def reload_now(self, wait: float = COMMAND_WAIT_SECONDS) -> str:
        """The ``knoxcall.reload`` command (on the loop): load now, say what happened.

        mitmproxy commands are synchronous, so the load runs in a thread and the loop
        waits for it at most ``wait`` seconds; a larger config finishes in the
        background, and its result is applied and logged like a watcher's.
        """
        if self.folder is None:
            return "no config folder loaded"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop (a script, a test): just load
            return self.apply(self.attempt())
        finished = threading.Event()
        handoff = threading.Lock()
        box: list[LoadResult | BaseException] = []
        abandoned = False

        def work() -> None:
            try:
                box.append(self.attempt())
            except BaseException as e:  # reported by the command, or logged below
                box.append(e)
            with handoff:
                finished.set()
                if abandoned and isinstance(box[0], LoadResult):
                    with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                        loop.call_soon_threadsafe(self.apply, box[0])
                elif abandoned:
                    logger.warning("knoxcall: reload failed; the config in force is unchanged", exc_info=box[0])

        thread = threading.Thread(target=work, name="knoxcall-reload-command", daemon=True)
        self._command_threads = [t for t in self._command_threads if t.is_alive()] + [thread]
        thread.start()
        finished.wait(wait)
        with handoff:
            if not finished.is_set():
                abandoned = True
                return f"reload of {self.folder} still running (large config); the event log will say what changed"
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return self.apply(result)

    def _set_error(self, version: str, error: ConfigError) -> None:
        self.failed_version = version
        self.last_error = format_problems(error)
        self.last_error_at = time.time()

    def _clear_error(self) -> bool:
        had = self.last_error is not None
        self.failed_version = ""
        self.last_error = None
        self.last_error_at = None
        return had


def _as_config_error(folder: Path, error: Exception) -> ConfigError:
    if isinstance(error, ConfigError):
        return error
    logger.warning(f"knoxcall: unexpected error while loading {folder}", exc_info=error)
    return ConfigError([Problem(Location(str(folder), 0), f"cannot load: {type(error).__name__}: {error}")])


def format_problems(error: ConfigError) -> str:
    """The problems of an invalid config for the event log and the commands (one log record).

    One problem stays on the line itself. Several start with a summary (how many, in which
    files: the audit trail's line), then one indented line each: joined on one line they
    made a line too long to read, with each problem's file:line lost in the middle of it.
    """
    problems = [str(p) for p in error.problems] or [str(error)]
    if len(problems) == 1:
        return problems[0]
    files = list(dict.fromkeys(p.location.file for p in error.problems))
    where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    shown = problems[:MAX_PROBLEMS_LOGGED]
    more = len(problems) - len(shown)
    lines = [f"{len(problems)} problems in {where}:", *(f"  {p}" for p in shown)]
    return "\n".join(lines + ([f"  (+{more} more)"] if more else []))
