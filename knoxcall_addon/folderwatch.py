"""Watch the config folder for hot reload: watchdog events, a debounce, one worker thread.

`FolderWatcher` watches the folder (plus the folders that its symlinked files point into,
for Kubernetes ConfigMaps, and its parent, for the folder itself being replaced), waits,
however long it takes, for config files still open for writing, and runs a callback in
its one worker thread when the events have been quiet for a while. The thread survives
any error (it retries), restarts a watchdog observer that died, and says so (event log,
`failure`) when it cannot. No mitmproxy import; nothing here loads a config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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

from knoxcall_addon.model import ConfigError
from knoxcall_addon.yamlsource import YAML_SUFFIXES, config_files, elide

logger = logging.getLogger("knoxcall")

DEBOUNCE_SECONDS = 0.25  # quiet time after the last event before a reload
SETTLE_SECONDS = 0.05  # ... when that event completed a config file (closed after writing, renamed into place)
MAX_DELAY_SECONDS = 2.0  # a reload happens at most this long after a burst started
OPEN_WAIT_SECONDS = 2.0  # a file still open for writing this long gets a warning (it is never read before its close)
OPEN_WARN_SECONDS = 60.0  # ... and another one this often while it stays open
HEALTH_SECONDS = 2.0  # how often an idle watcher checks that its observer runs and its watches are current
MAX_RETRY_SECONDS = 30.0  # after an error the watcher tries again, waiting at most this long


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



def secret_dirs(files: Iterable[str]) -> set[Path]:
    """The folders of secret files (see secretsource.py), and of their symlinks' targets.

    A Kubernetes Secret volume's ``token`` is ``..data/token``, and ``..data`` a symlink
    that a rotation swaps: seen in the file's own folder; an edit behind a symlink only in
    its target's folder. A folder that does not exist (yet) is left out.
    """
    dirs: set[Path] = set()
    for name in files:
        path = Path(name)
        for candidate in (path.parent, _target_dir(path)):
            if candidate is not None and candidate.is_dir():
                dirs.add(candidate)
    return dirs


def _target_dir(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True).parent if path.is_symlink() else None
    except (OSError, RuntimeError):
        return None


def watch_dirs(folder: Path) -> set[Path]:
    """The folder (resolved), and every folder that one of its YAML symlinks points into.

    A ConfigMap's ``x.yaml`` is a symlink to ``..data/x.yaml`` and ``..data`` a symlink
    to ``..2026_...``: its swap is seen in the folder itself, an edit behind a symlink
    (or in a file linked from elsewhere) only in the target's folder. Resolved, so that
    a folder that is itself a symlink (``/srv/knoxcall/current -> release-2``) is
    watched where its files are, and re-pointed when the link is swapped.
    """
    try:
        dirs = {folder.resolve(strict=True)}
        entries = list(folder.iterdir())
    except (OSError, RuntimeError):  # gone, not a folder, or a symlink loop (RuntimeError before 3.13)
        return set()
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
        try:
            self._note(event)
        except Exception:  # an exception here would end watchdog's observer thread
            logger.warning("knoxcall: error while noting a file event", exc_info=True)


class FolderWatcher:
    """Calls ``on_quiet`` (in its own thread) once per burst of file system events.

    The call comes ``debounce`` seconds after the last event of a burst, or at the
    latest ``max_delay`` after its first, so that a tool writing without pause cannot
    hold reloads back forever. Events that arrive during a call make one more call.

    When the last event completed a config file (closed after writing, or renamed into
    place, as editors save), the quiet time is only ``settle``: the write is over, and
    a tool writing several files still has its next event well within it.

    A config file that was written to and not yet closed is being written: no call is
    made until it is closed (or deleted, or renamed over), however long that takes, so
    that a slow writer's first half is never read, let alone put in force when it
    happens to be valid YAML. After ``open_wait`` seconds, and every ``warn_every``
    seconds after that, a warning says which file holds reloads back. This needs close
    events, which only inotify (Linux) delivers; elsewhere files are read after the
    debounce, and a writer should write a temp file and rename it into place.

    The thread survives any error (logged, then retried with a growing delay), checks
    every ``health`` seconds that watchdog's observer still runs (and starts a new one
    if not) and that the watches follow the folder. When it cannot go on, ``failure``
    says why, an ERROR says that edits are no longer seen, and `is_alive` is False.
    """

    def __init__(
        self,
        folder: str | Path,
        on_quiet: Callable[[], None],
        debounce: float = DEBOUNCE_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        open_wait: float = OPEN_WAIT_SECONDS,
        warn_every: float = OPEN_WARN_SECONDS,
        settle: float = SETTLE_SECONDS,
        health: float = HEALTH_SECONDS,
        extra_files: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.folder = Path(os.path.abspath(folder))
        self._on_quiet = on_quiet
        # secret files the config names (outside the folder, often): watched like its files
        self._extra_files = extra_files or (lambda: ())
        self._extra: frozenset[str] = frozenset()
        self._debounce = debounce
        self._settle = min(settle, debounce)
        self._max_delay = max_delay
        self._open_wait = open_wait
        self._warn_every = warn_every
        self._health = health
        self._cond = threading.Condition()
        self._first_event: float | None = None
        self._last_event = 0.0
        self._not_before = 0.0  # after an error: no call before this time
        # files modified and not yet closed: path -> (first modification, next warning)
        self._writing: dict[str, tuple[float, float]] = {}
        self.modifications = 0  # config file modifications seen so far (HotReload compares it)
        self._completed = False  # the last event that counts completed a config file
        self._stopping = False
        self._observer = self._new_observer()
        # Only inotify reports closes: elsewhere "still open" could never end.
        self.tracks_open_files = "inotify" in type(self._observer).__module__
        self._handler = _Handler(self.note)
        self._parent_handler = _Handler(self.note, only_name=self.folder.name)
        # dir -> (watch, (dev, inode) when scheduled, handler)
        self._watches: dict[Path, tuple[object, tuple[int, int] | None, _Handler]] = {}
        self._warned: set[Path] = set()
        self._thread = threading.Thread(target=self._run, name="knoxcall-reload", daemon=True)
        self.calls = 0  # how many times on_quiet ran (tests read it)
        self.failure: str | None = None  # why edits are no longer seen, while they are not
        self.failed_at: float | None = None
        self._retry_error = ""  # the last error retried (logged once, not at every retry)

    @staticmethod
    def _new_observer() -> Observer:
        observer = Observer()
        observer.name = "knoxcall-watchdog"
        observer.daemon = True
        return observer

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
            observer = self._observer
        if observer.is_alive():
            observer.stop()
            observer.join(timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._observer is not observer and self._observer.is_alive():  # replaced meanwhile
            self._observer.stop()
            self._observer.join(timeout)

    def is_alive(self) -> bool:
        """Are edits seen: both threads running and no failure?"""
        return self._observer.is_alive() and self._thread.is_alive() and self.failure is None

    @property
    def watched(self) -> list[Path]:
        """The folders whose files are read (not the parent watched for the folder's replacement)."""
        return sorted(path for path, (_, _, handler) in self._watches.items() if handler is self._handler)

    def open_for_writing(self) -> list[tuple[str, float]]:
        """Config files written to and not yet closed, with how long (seconds) since the first write."""
        now = time.monotonic()
        with self._cond:
            return sorted((path, now - since) for path, (since, _) in self._writing.items())

    def note(self, event: FileSystemEvent) -> None:
        """An event from watchdog's thread: track files being written, then poke."""
        src = os.fsdecode(event.src_path)
        with self._cond:
            if isinstance(event, FileModifiedEvent) and self._is_read(src):
                # Only config files: an editor keeps its swap file open while you type.
                self.modifications += 1
                if self.tracks_open_files and src not in self._writing:
                    since = time.monotonic()
                    self._writing[src] = (since, since + self._open_wait)
            elif isinstance(event, (FileClosedEvent, FileDeletedEvent, FileMovedEvent)):
                self._writing.pop(src, None)
                if isinstance(event, FileMovedEvent):  # renamed over: a new, complete file
                    self._writing.pop(os.fsdecode(event.dest_path), None)
            if isinstance(event, FileClosedEvent):
                self._completed = self._completed or self._is_read(src)
            elif isinstance(event, FileMovedEvent) and self._is_read(os.fsdecode(event.dest_path)):
                self._completed = True
            elif not isinstance(event, DirModifiedEvent) and (event.is_directory or self._is_read(src)):
                # (a folder's own "modified" follows any change in it; other files,
                # e.g. an editor's swap or temp file, are never read)
                self._completed = False
        self.poke()

    def _is_read(self, path: str) -> bool:
        """A file that a load reads: a config file, or a secret file the config names."""
        return _is_config_name(path) or path in self._extra

    def poke(self) -> None:
        """Note an event; the call follows when events have been quiet for a while."""
        with self._cond:
            now = time.monotonic()
            if self._first_event is None:
                self._first_event = now
            self._last_event = now
            self._cond.notify_all()

    def _due(self) -> float | None:
        """When the pending burst's call is due; None while a config file is being written."""
        assert self._first_event is not None
        if self._writing:
            return None
        quiet = self._settle if self._completed else self._debounce
        return max(min(self._last_event + quiet, self._first_event + self._max_delay), self._not_before)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # reported below; the thread ends either way
            if not self._stopping:
                self._fail(f"the watcher thread ended: {type(e).__name__}: {elide(str(e))}", e)

    def _serve(self) -> None:
        failures = 0
        while True:
            with self._cond:
                due = self._wait(self._health)
                if self._stopping:
                    return
                if due:
                    self._first_event = None
                    self._completed = False
            if not due:
                self._check_health()
                continue
            self.calls += 1
            try:
                self._on_quiet()
            except Exception:
                logger.exception("knoxcall: error in the config watcher; the config in force is unchanged")
            try:
                if self._update_watches():
                    # A new watch (a swapped or re-created folder) cannot have seen what was
                    # written between the load and now: look once more.
                    self.poke()
            except Exception as e:
                failures += 1
                self._retry(e, min(MAX_RETRY_SECONDS, 0.5 * 2**failures))
                continue
            failures = 0
            self._retry_error = ""

    def _wait(self, timeout: float) -> bool:
        """With the lock held: wait until the pending call is due (True), or ``timeout`` (False).

        While a config file is being written, nothing is due: warn now and then, and
        forget files that are no longer part of the config (the folder was re-pointed).
        """
        deadline = time.monotonic() + timeout
        while not self._stopping:
            now = time.monotonic()
            wake = deadline
            if self._first_event is not None:
                if self._writing:
                    self._forget_unread_files()
                    self._warn_open_files(now)
                due = self._due()
                if due is not None and due <= now:
                    return True
                wake = min(wake, due if due is not None else deadline, *(w for _, w in self._writing.values()))
            if now >= deadline:
                return False
            self._cond.wait(max(0.0, wake - now))
        return False

    def _warn_open_files(self, now: float) -> None:
        for path, (since, warn_at) in sorted(self._writing.items()):
            if now >= warn_at:
                self._writing[path] = (since, now + self._warn_every)
                logger.warning(
                    f"knoxcall: {path} is still open for writing ({now - since:.0f} s); no config is read from "
                    f"{self.folder} until it is closed, and the config in force stays"
                )

    def _forget_unread_files(self) -> None:
        """Drop files being written that the config no longer reads (e.g. in the release
        that ``current`` pointed to before a swap): their close may never be seen."""
        try:
            read = {os.path.realpath(path) for path in (*config_files(self.folder), *self._extra)}
        except (ConfigError, OSError):
            return  # the folder is unreadable right now: keep waiting, the next event says more
        for path in [p for p in self._writing if os.path.realpath(p) not in read]:
            del self._writing[path]

    def _check_health(self) -> None:
        """Idle: is the observer running, and do the watches follow the folder? Repair if not."""
        if not self._observer.is_alive():
            try:
                with self._cond:
                    if self._stopping:
                        return
                    old, self._observer = self._observer, self._new_observer()
                self._watches.clear()
                with contextlib.suppress(Exception):
                    old.stop()
                self._observer.start()
                logger.warning("knoxcall: the file watcher (watchdog) had stopped; started a new one")
            except Exception as e:
                if self.failure is None:
                    self._fail(f"cannot restart the file watcher: {type(e).__name__}: {elide(str(e))}", e)
                return
            self.poke()  # what changed meanwhile was not seen: read the folder again
        try:
            if self._update_watches():
                self.poke()
        except Exception as e:
            self._log_once(e)
        if self.failure is not None and self._observer.is_alive():
            logger.info(f"knoxcall: watching {self.folder} again; edits are seen again")
            self.failure = None
            self.failed_at = None
            self.poke()

    def _log_once(self, error: Exception, then: str = "trying again") -> None:
        """A warning for an error, but not again for the same error at every retry."""
        text = f"{type(error).__name__}: {elide(str(error))}"
        if text != self._retry_error:
            self._retry_error = text
            logger.warning(f"knoxcall: config watcher error ({text}); {then}", exc_info=error)

    def _retry(self, error: Exception, delay: float) -> None:
        """An error after a call (e.g. re-pointing the watches): call again after ``delay``."""
        self._log_once(error, f"trying again in {delay:.1f} s")
        with self._cond:
            self._not_before = time.monotonic() + delay
        self.poke()

    def _fail(self, why: str, error: BaseException | None = None) -> None:
        self.failure = why
        self.failed_at = time.time()
        logger.error(
            f"knoxcall: {why}; edits to {self.folder} are no longer seen: use knoxcall.reload after edits, "
            "or restart the proxy",
            exc_info=error,
        )

    def _update_watches(self) -> bool:
        """Watch the folder, the folders its symlinks point into (they change on a swap),
        and the folder's parent for the folder itself being replaced or re-linked.

        Returns whether a folder whose files are read got a new watch."""
        added = False
        wanted: dict[Path, _Handler] = {d: self._handler for d in watch_dirs(self.folder)}
        extra = frozenset(os.path.abspath(f) for f in self._extra_files())
        self._extra = extra
        wanted.update((d, self._handler) for d in secret_dirs(extra))
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




