"""Hot reload: watch the config folder, load off the event loop, swap on the loop.

- `FolderWatcher`: watchdog on the folder (plus the folders that its symlinked files
  point into, for Kubernetes ConfigMaps, and its parent, for the folder itself being
  replaced), a debounce that also waits, however long it takes, for config files still
  open for writing, and one worker thread that runs a callback when the events have
  been quiet for a while. The thread survives any error (it retries), restarts a
  watchdog observer that died, and says so (event log, `failure`) when it cannot.
- `HotReload`: turns a quiet period into at most one load of the folder (in the
  worker thread), and the result into one `install(policy)` call on the event loop.
  It never replaces a good policy with anything but another good one. Everything that
  is formatted (problems, the diff, the config's dangerous findings) is formatted in
  the worker thread; the loop only installs and logs ready-made lines.
- `timed_load`: load + compile a folder and say how long it took (for scripts/bench).

No mitmproxy import: the addon passes in the event loop and its install function.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from knoxcall_addon.configdiff import ConfigDiff, diff_configs
from knoxcall_addon.folderwatch import DEBOUNCE_SECONDS, FolderWatcher
from knoxcall_addon.lint import error_findings
from knoxcall_addon.model import ConfigError, Location, Problem
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.secretsource import files_stamp
from knoxcall_addon.yamlsource import elide, folder_version

logger = logging.getLogger("knoxcall")

MAX_PROBLEMS_LOGGED = 10
MAX_FINDINGS_LOGGED = 20  # dangerous findings logged (and listed in status) per config
LINE_CHARS = 500  # one problem or finding in a log line or status, at most
COMMAND_WAIT_SECONDS = 2.0  # knoxcall.reload blocks the event loop at most this long


@dataclass(frozen=True)
class TimedLoad:
    policy: Policy
    seconds: float  # read + parse + validate + compile


def release_free_memory() -> None:
    """After a load: the garbage collector's full pass, then freed heap memory back to the
    system (glibc ``malloc_trim``; elsewhere only the pass).

    The pass: a load makes millions of objects that live on, and once the collector has
    moved enough of them to its oldest generation it scans them all (0.1-0.3 s with a
    100k-range config), at whatever request comes a few hundred requests later. Done
    here, it comes at once and no request waits for it.

    The memory: a reload holds two policies for a moment; without this, the process keeps
    much of that peak as resident memory (with a 100k-range config, ~159 MB after a few
    reloads instead of ~146)."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # e.g. musl has no malloc_trim
        ctypes.CDLL(None).malloc_trim(0)



def timed_load(folder: str | Path) -> TimedLoad:
    """Load and compile a folder the way a reload does; raise ConfigError if invalid."""
    start = time.perf_counter()
    policy = load_policy(folder)
    return TimedLoad(policy, time.perf_counter() - start)


Status = Literal["loaded", "unchanged", "invalid", "same_error"]


@dataclass(frozen=True)
class LoadResult:
    """One load attempt, and the latest good policy read from the folder after it.

    ``version`` is the content that was read; ``seconds`` the load + compile time.
    The texts (``message``, ``summary``, ``findings``) are made in the loading thread,
    so that the event loop only logs them.
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
    message: str = ""  # the error's problems, on one bounded line
    summary: str = ""  # diff.summary()
    findings: tuple[str, ...] = ()  # the new policy's dangerous findings (see `dangerous_findings`)


def dangerous_findings(policy: Policy) -> tuple[str, ...]:
    """What `knoxcall check` calls an error in this (valid) config, one bounded line each.

    The proxy serves such a config (it is valid), but says so at every load and in
    ``knoxcall.status``. Cheap (no per-range objects): fine for every reload.
    """
    return tuple(elide(str(f), LINE_CHARS) for f in error_findings(policy.config))


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
        self.invalid_reloads = 0  # reloads refused since start (an invalid config; the one in force stays)
        # (version, lines): the dangerous findings of the policy in force (by version, so
        # that no reference keeps a replaced policy alive)
        self.findings: tuple[str, tuple[str, ...]] = ("", ())
        self._command_threads: list[threading.Thread] = []
        self._failed_files: tuple[str, ...] = ()  # the secret files the failed config names

    # -- lifecycle (event loop) --------------------------------------------------------

    def set_folder(self, folder: str | Path, policy: Policy) -> None:
        """The folder whose ``policy`` was just installed (at start or by the option).

        Its dangerous findings are computed and logged here: on the loop, but only when
        the folder option is set (at start, before serving, or by the operator)."""
        with self._lock:
            self.generation += 1
            self.folder = Path(folder)
            self._latest = policy
            self._clear_error()
            self._failed_files = ()
        self._note_findings(policy.version, dangerous_findings(policy))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Re)start watching ``folder``; checks once at once for edits made since the load."""
        self.stop()
        if self.folder is None:
            return
        self.loop = loop
        generation = self.generation
        self.watcher = FolderWatcher(
            self.folder, lambda: self._on_quiet(generation), self._debounce, extra_files=self.secret_files
        )
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

    def secret_files(self) -> tuple[str, ...]:
        """The secret files to watch: those of the latest good config and of a failed one."""
        latest = self._latest
        files = latest.config.secret_values.files if latest is not None else ()
        return tuple(dict.fromkeys((*files, *self._failed_files)))

    @property
    def watching(self) -> bool:
        """Are edits seen (the watcher runs, and has not given up)?"""
        return self.watcher is not None and self.watcher.is_alive()

    def failure_text(self) -> str | None:
        """Why a started watcher no longer sees edits, for ``knoxcall.status``; None if it does."""
        watcher = self.watcher
        if watcher is None or watcher.is_alive():
            return None
        when = f" since {_utc(watcher.failed_at)}" if watcher.failed_at else ""
        why = watcher.failure or "the watcher thread is not running"
        return f"off{when}: {why}; edits are no longer seen (see the event log); use knoxcall.reload after edits"

    def status_notes(self, version: str) -> list[str]:
        """More ``knoxcall.status`` lines: files that hold reloads back, and the dangerous
        findings of the config in force (``version``)."""
        lines: list[str] = []
        watcher = self.watcher
        if watcher is not None and self.watching:
            for path, seconds in watcher.open_for_writing():
                lines.append(
                    f"hot reload waiting: {path} is still open for writing ({seconds:.0f} s); "
                    "nothing is reloaded until it is closed"
                )
        found_for, found = self.findings
        if found_for != version:
            return lines  # e.g. a policy installed by other means: nothing known
        if not found:
            lines.append("dangerous settings (knoxcall check errors): none")
            return lines
        lines.append(f"dangerous settings (knoxcall check errors): {len(found)}, served as written")
        lines.extend(f"  {line}" for line in found[:MAX_FINDINGS_LOGGED])
        if len(found) > MAX_FINDINGS_LOGGED:
            lines.append(f"  (and {len(found) - MAX_FINDINGS_LOGGED} more: run knoxcall check)")
        return lines

    def _note_findings(self, version: str, findings: tuple[str, ...]) -> None:
        """Log the dangerous findings of the policy just put in force, and keep them for status."""
        self.findings = (version, findings)
        for line in findings[:MAX_FINDINGS_LOGGED]:
            logger.warning(f"knoxcall: config {version}: {line} (knoxcall check calls it an error; served as written)")
        if len(findings) > MAX_FINDINGS_LOGGED:
            logger.warning(
                f"knoxcall: config {version}: and {len(findings) - MAX_FINDINGS_LOGGED} more findings that "
                "knoxcall check calls errors; run knoxcall check"
            )

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
                version = "unreadable:" + format_problems(e)  # another mishap is another error
                if version == self.failed_version:
                    return LoadResult("same_error", ticket, generation, version, latest)
                self._set_error(version, e)
                return LoadResult(
                    "invalid", ticket, generation, version, latest, error=e, message=self.last_error or ""
                )
            if latest is not None and version == latest.version and _secrets_unchanged(latest):
                cleared = self._clear_error()
                return LoadResult("unchanged", ticket, generation, version, latest, cleared_error=cleared)
            # a secret file may fix (or break) the config as much as its YAML files
            failed = self._failed_files
            if _with_secrets(version, failed, files_stamp(failed) if failed else "") == self.failed_version:
                return LoadResult("same_error", ticket, generation, version, latest)
            try:
                policy = load_policy(folder)
            except Exception as e:  # ConfigError, or anything unexpected: never a half policy
                e = _as_config_error(folder, e)
                self._failed_files = e.secret_files
                self._set_error(_with_secrets(version, e.secret_files, e.secret_stamp), e)
                return LoadResult(
                    "invalid", ticket, generation, version, latest, error=e, message=self.last_error or ""
                )
            self._latest = policy
            cleared = self._clear_error()
            self._failed_files = ()
            seconds = time.perf_counter() - start
            # Diffing 100k clients takes a good fraction of a second: here, not on the loop.
            diff = diff_configs(latest.config if latest else None, policy.config)
            return LoadResult(
                "loaded", ticket, generation, policy.version, policy, None, cleared, seconds, base=latest, diff=diff,
                summary=diff.summary(), findings=dangerous_findings(policy),
            )  # fmt: skip

    def _on_quiet(self, generation: int) -> None:
        """Watcher thread: load off the loop, then hand the result to the loop."""
        if generation != self.generation or self.loop is None:
            return
        watcher = self.watcher
        modifications = watcher.modifications if watcher is not None else 0
        result = self.attempt()
        if result.status == "loaded" and watcher is not None and watcher.modifications != modifications:
            # A config file was written to while it was read: what was read may be its first
            # half. Not put in force; the watcher calls again once the file is closed.
            self._forget(result)
            logger.info("knoxcall: a config file was written to while the folder was read; reading it again")
            return
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

    def _forget(self, result: LoadResult) -> None:
        """Undo a load that will not be applied: the next attempt compares with what it had."""
        with self._lock:
            if self._latest is result.policy:
                self._latest = result.base

    # -- applying (event loop) ---------------------------------------------------------

    def apply(self, result: LoadResult) -> str:
        """Act on a load result on the event loop; return what happened, in words.

        Everything it logs was formatted off the loop (in `attempt`), except in the rare
        case of a result diffed against another policy than the one in force."""
        if result.generation != self.generation:
            return "the config folder was changed meanwhile; result ignored"
        current = self._current()
        serving = current.version if current else "none"
        installed = ""
        if result.ticket > self._applied_ticket:
            self._applied_ticket = result.ticket
            new = result.policy
            if new is not None and new is not current:
                summary = result.summary
                if result.diff is None or result.base is not current or not summary:  # rare: diffed against another
                    summary = diff_configs(current.config if current else None, new.config).summary()
                timing = f" in {result.seconds * 1000:.0f} ms" if result.status == "loaded" else ""
                self._install(new, f"reloaded{timing}, was {serving}: {summary}")
                self.reloads += 1
                findings = result.findings if result.policy is new and result.status == "loaded" else None
                self._note_findings(new.version, findings if findings is not None else dangerous_findings(new))
                installed = f"config {new.version} loaded (was {serving}): {summary}"
                serving = new.version
        if result.status == "invalid":
            self.invalid_reloads += 1
            problems = result.message or (format_problems(result.error) if result.error else "?")
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
        background, and its result is applied and logged like a watcher's. While the
        watcher sees a config file still open for writing, nothing is read.
        """
        if self.folder is None:
            return "no config folder loaded"
        # (only a live watcher knows: a dead one may never see the close)
        writing = self.watcher.open_for_writing() if self.watcher is not None and self.watching else []
        if writing:
            files = ", ".join(f"{path} ({seconds:.0f} s)" for path, seconds in writing)
            serving = self._current()
            return (
                f"not reloaded: {files} still open for writing; still serving {serving.version if serving else 'none'}"
                " (the watcher reloads once it is closed; if nothing writes it any more, touch it)"
            )
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


def _secrets_unchanged(policy: Policy) -> bool:
    """Do the policy's secret files hold what they held when it loaded?"""
    values = policy.config.secret_values
    return not values.files or files_stamp(values.files) == values.file_stamp


def _with_secrets(version: str, files: tuple[str, ...], stamp: str) -> str:
    """A config's content: its files' version, and what its secret files hold (never shown)."""
    return f"{version}+{stamp}" if files else version


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _as_config_error(folder: Path, error: Exception) -> ConfigError:
    if isinstance(error, ConfigError):
        return error
    logger.warning(f"knoxcall: unexpected error while loading {folder}", exc_info=error)
    return ConfigError([Problem(Location(str(folder), 0), f"cannot load: {type(error).__name__}: {elide(str(error))}")])


def format_problems(error: ConfigError) -> str:
    """The problems of an invalid config for the event log and the commands (one log record).

    One problem stays on the line itself. Several start with a summary (how many, in which
    files: the audit trail's line), then one indented line each: joined on one line they
    made a line too long to read, with each problem's file:line lost in the middle of it.
    """
    problems = [elide(str(p), LINE_CHARS) for p in error.problems] or [elide(str(error))]
    if len(problems) == 1:
        return problems[0]
    files = list(dict.fromkeys(p.location.file for p in error.problems))
    where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    shown = problems[:MAX_PROBLEMS_LOGGED]
    more = len(problems) - len(shown)
    lines = [f"{len(problems)} problems in {where}:", *(f"  {p}" for p in shown)]
    return "\n".join(lines + ([f"  (+{more} more)"] if more else []))
