"""Issue 9 in process: the watcher's waiting and surviving, alias bounds, unreadable entries, findings.

Real files, real watchdog threads, real loaders. Where a failure that cannot be made
for real (a thread killed, an observer that cannot start) is needed, one function is
replaced by one that raises, and the test says so. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from mitmproxy.test import taddons

from knoxcall_addon import folderwatch, reloader
from knoxcall_addon.folderwatch import FolderWatcher, watch_dirs
from knoxcall_addon.lint import error_findings, lint
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import SHOWN_CHARS, ConfigError, elide, shown
from knoxcall_addon.policy import load_policy
from knoxcall_addon.proxy_addon import KnoxCall
from knoxcall_addon.reloader import HotReload, format_problems
from knoxcall_addon.yamlsource import (
    MAX_ALIAS_EXPANSION,
    _LocatingLoader,
    folder_version,
    parse_yaml,
    read_config_file,
)
from knoxcall_addon.yamlsource import UnreadableEntry as Unreadable
from tests.test_reload_unit import CLIENTS, wait_until, write_config


class Installed:
    def __init__(self, policy):
        self.policy = policy
        self.notes: list[str] = []

    def install(self, policy, note: str) -> None:
        self.policy = policy
        self.notes.append(note)


def recorder(folder: Path) -> tuple[list[str], object]:
    seen: list[str] = []
    return seen, lambda: seen.append(folder_version(folder))


# -- 2. files open for writing -------------------------------------------------------------


def test_a_file_open_for_writing_is_never_read_however_long_and_the_wait_is_warned(tmp_path, caplog):
    """Held open across many warning periods (the old watcher read it after a bounded wait)."""
    folder = write_config(tmp_path / "cfg")
    seen, record = recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.1, open_wait=0.2, warn_every=0.3)
    watcher.start()
    try:
        text = CLIENTS.format(ip="192.0.2.9", assigned="lab")
        with caplog.at_level(logging.WARNING, logger="knoxcall"), open(folder / "clients.yaml", "w") as f:
            f.write(text[:40])
            f.flush()
            assert wait_until(lambda: len([r for r in caplog.records if "still open" in r.getMessage()]) >= 3)
            assert seen == []
            [(path, seconds)] = watcher.open_for_writing()
            assert path == str((folder / "clients.yaml").resolve()) and seconds > 0.5
            f.write(text[40:])
        assert wait_until(lambda: len(seen) == 1)
        assert seen == [folder_version(folder)]
        assert watcher.open_for_writing() == []
        assert "clients.yaml is still open for writing" in caplog.records[0].getMessage()
    finally:
        watcher.stop()


def test_a_file_left_open_in_a_release_that_is_swapped_away_does_not_hold_reloads(tmp_path):
    """current -> release-1 with release-1/clients.yaml open for good; swapping current to
    release-2 makes that file no part of the config: the swap is read."""
    write_config(tmp_path / "release-1")
    write_config(tmp_path / "release-2", assigned="lab")
    current = tmp_path / "current"
    os.symlink("release-1", current)
    seen, record = recorder(current)
    watcher = FolderWatcher(current, record, debounce=0.1, open_wait=60)
    watcher.start()
    try:
        with open(tmp_path / "release-1" / "clients.yaml", "a") as f:
            f.write("# being written\n")
            f.flush()
            assert wait_until(lambda: watcher.open_for_writing() != [])
            os.symlink("release-2", tmp_path / "current.tmp")
            os.replace(tmp_path / "current.tmp", current)
            assert wait_until(lambda: seen and seen[-1] == folder_version(tmp_path / "release-2"))
            assert watcher.open_for_writing() == []
    finally:
        watcher.stop()


def test_the_reload_command_reads_nothing_while_a_file_is_open_for_writing(tmp_path):
    folder = write_config(tmp_path / "cfg")
    holder = Installed(load_policy(folder))
    good = holder.policy

    async def scenario() -> None:
        hot = HotReload(holder.install, lambda: holder.policy, debounce=0.1)
        hot.set_folder(folder, good)
        hot.start(asyncio.get_running_loop())
        try:
            with open(folder / "clients.yaml", "w") as f:
                f.write(CLIENTS.format(ip="192.0.2.9", assigned="lab")[:40])
                f.flush()
                for _ in range(500):
                    if hot.watcher.open_for_writing():
                        break
                    await asyncio.sleep(0.02)
                answer = hot.reload_now()
                assert answer.startswith("not reloaded:") and "clients.yaml" in answer, answer
                assert f"still serving {good.version}" in answer
                assert holder.policy is good
                assert any("still open for writing" in line for line in hot.status_notes(good.version))
        finally:
            hot.stop()

    asyncio.run(scenario())


def test_a_load_during_which_a_config_file_is_written_is_not_put_in_force(tmp_path, monkeypatch):
    """A writer that starts while the folder is being read: what was read may be its first
    half, so it is dropped; once the writer closes the file, the whole file is loaded."""
    folder = write_config(tmp_path / "cfg")
    holder = Installed(load_policy(folder))
    good = holder.policy
    writer: list = []
    real_load = reloader.load_policy

    def load_while_a_writer_starts(path):
        policy = real_load(path)  # what was read before the writer's first bytes
        if not writer:
            f = open(folder / "clients.yaml", "a")  # noqa: SIM115 - closed by the test below
            f.write("# a writer is adding something\n")
            f.flush()
            writer.append(f)
            time.sleep(0.3)  # the load goes on a little longer: its events arrive meanwhile
        return policy

    monkeypatch.setattr(reloader, "load_policy", load_while_a_writer_starts)

    async def scenario() -> None:
        hot = HotReload(holder.install, lambda: holder.policy, debounce=0.1)
        hot.set_folder(folder, good)
        hot.start(asyncio.get_running_loop())
        try:
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            for _ in range(500):
                if writer and hot.watcher.open_for_writing():
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            assert holder.policy is good, holder.notes  # the read during the write was dropped
            writer[0].close()
            for _ in range(500):
                if holder.policy.version == folder_version(folder):
                    break
                await asyncio.sleep(0.02)
            assert holder.policy.version == folder_version(folder)
            assert holder.policy.config.assigned_clients("api", "production") == ("lab",)
        finally:
            hot.stop()

    asyncio.run(scenario())


# -- 4. the watcher survives, and says so when it cannot ---------------------------------------


def test_watch_dirs_of_a_symlink_loop_is_empty_not_an_exception(tmp_path):
    os.symlink("current", tmp_path / "current")
    assert watch_dirs(tmp_path / "current") == set()


class ThreadKiller(BaseException):
    """Stands for whatever ends a thread past `except Exception` (here, raised on purpose)."""


def test_a_dead_watcher_thread_is_an_error_and_status_says_edits_are_no_longer_seen(tmp_path, caplog):
    folder = write_config(tmp_path / "cfg")

    async def scenario() -> None:
        addon = KnoxCall()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, knoxcall_config=str(folder))

            def killed(generation: int) -> None:
                raise ThreadKiller("boom")

            addon.reload._on_quiet = killed  # the watcher's first call ends its thread
            with caplog.at_level(logging.INFO, logger="knoxcall"):
                addon.running()
                for _ in range(500):
                    if not addon.reload.watching:
                        break
                    await asyncio.sleep(0.02)
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert any("ThreadKiller: boom" in e and "are no longer seen" in e for e in errors), errors
            status = tctx.master.commands.execute("knoxcall.status")
            assert "hot reload: off since " in status and "edits are no longer seen" in status, status
            assert "use knoxcall.reload after edits" in status
            addon.done()

    asyncio.run(scenario())


def test_a_dead_observer_is_replaced_and_edits_are_seen_again(tmp_path, caplog):
    folder = write_config(tmp_path / "cfg")
    seen, record = recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.1, health=0.1)
    watcher.start()
    try:
        first = watcher._observer
        first.stop()
        first.join(5)
        with caplog.at_level(logging.WARNING, logger="knoxcall"):
            assert wait_until(lambda: watcher._observer is not first and watcher.is_alive())
        assert any("had stopped; started a new one" in r.getMessage() for r in caplog.records)
        count = len(seen)
        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
        assert wait_until(lambda: len(seen) > count and seen[-1] == folder_version(folder))
    finally:
        watcher.stop()
    assert not watcher._observer.is_alive()


def test_an_observer_that_cannot_be_restarted_is_reported_until_it_can(tmp_path, caplog, monkeypatch):
    folder = write_config(tmp_path / "cfg")
    seen, record = recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.1, health=0.1)
    watcher.start()
    real_new = FolderWatcher._new_observer

    class NoInotify:
        """An observer whose start fails, as with the inotify instance limit (made to fail)."""

        def start(self) -> None:
            raise OSError(24, "inotify instance limit reached")

        def is_alive(self) -> bool:
            return False

        def stop(self) -> None:
            pass

    try:
        monkeypatch.setattr(FolderWatcher, "_new_observer", staticmethod(lambda: NoInotify()))
        with caplog.at_level(logging.INFO, logger="knoxcall"):
            watcher._observer.stop()
            assert wait_until(lambda: watcher.failure is not None)
            assert not watcher.is_alive()
            assert "inotify instance limit" in watcher.failure
            time.sleep(0.5)  # several failed health checks: one ERROR, not one each
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "are no longer seen" in errors[0], errors
            monkeypatch.setattr(FolderWatcher, "_new_observer", staticmethod(real_new))
            assert wait_until(watcher.is_alive)
        assert any("edits are seen again" in r.getMessage() for r in caplog.records)
        count = len(seen)
        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
        assert wait_until(lambda: len(seen) > count and seen[-1] == folder_version(folder))
    finally:
        watcher.stop()


def test_an_error_after_a_call_is_retried_and_warned_once(tmp_path, caplog, monkeypatch):
    """E.g. re-pointing the watches fails for a while: the thread goes on and retries."""
    folder = write_config(tmp_path / "cfg")
    seen, record = recorder(folder)
    failures = {"left": 3}
    real_watch_dirs = folderwatch.watch_dirs

    def flaky(path):
        if failures["left"] and threading.current_thread().name == "knoxcall-reload":
            failures["left"] -= 1
            raise RuntimeError("Symlink loop from 'current'")
        return real_watch_dirs(path)

    watcher = FolderWatcher(folder, record, debounce=0.1, health=60)
    watcher.start()
    try:
        with caplog.at_level(logging.WARNING, logger="knoxcall"):
            monkeypatch.setattr(folderwatch, "watch_dirs", flaky)
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            assert wait_until(lambda: failures["left"] == 0, timeout=20)
            assert wait_until(lambda: len(seen) >= 4, timeout=20)  # the call, then one per retry
        warnings = [r.getMessage() for r in caplog.records if "Symlink loop" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert watcher.is_alive()
        count = len(seen)
        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
        assert wait_until(lambda: len(seen) > count and seen[-1] == folder_version(folder))
    finally:
        watcher.stop()


# -- 3. unreadable entries -------------------------------------------------------------------


def test_reading_a_fifo_entry_never_blocks_and_names_what_it_is(tmp_path):
    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    with pytest.raises(Unreadable, match="is a FIFO"):
        read_config_file(fifo)  # no writer: an open() would block here for ever


def test_each_mishap_is_its_own_version_so_each_is_reported(tmp_path):
    folder = write_config(tmp_path / "cfg")
    versions = set()
    for make in (
        lambda p: os.symlink("gone.yaml", p),
        lambda p: os.symlink(p.name, p),
        lambda p: p.mkdir(),
        lambda p: os.mkfifo(p),
    ):
        path = folder / "extra.yaml"
        make(path)
        versions.add(folder_version(folder))
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    assert len(versions) == 4


def test_a_folder_that_is_a_symlink_loop_says_so(tmp_path):
    os.symlink("current", tmp_path / "current")
    with pytest.raises(ConfigError, match="config folder is a symlink loop"):
        load_config(tmp_path / "current")


# -- 5. aliases and bounded messages ---------------------------------------------------------


def test_ordinary_anchors_and_aliases_still_load(tmp_path):
    (tmp_path / "k.yaml").write_text(
        """\
environments:
  - name: production
  - name: staging
clients:
  - name: office
    ip_address: &office_ranges [192.0.2.0/28, 198.51.100.7]
    description: &who the office
  - name: office-v2
    ip_address: *office_ranges
    description: *who
routes:
  - name: api
    allowed_methods: &methods [GET, POST]
    match: &v1 {path_prefix: /v1}
  - name: api2
    allowed_methods: *methods
    match: {<<: *v1, hosts: [api2.example.com]}
assignments:
  api: &everywhere
    production: [office]
    staging: [office]
  api2: *everywhere
"""
    )
    config = load_config(tmp_path)
    assert config.clients["office-v2"].networks == config.clients["office"].networks
    assert config.routes["api2"].allowed_methods == frozenset({"GET", "POST"})
    assert config.routes["api2"].match.path_prefix == "/v1"
    assert config.assigned_clients("api2", "staging") == ("office",)


def _repeated(times: int, size: int) -> str:
    items = ", ".join(str(i) for i in range(size))
    return "base: &big [" + items + "]\nuses:\n" + "".join("  - *big\n" for _ in range(times))


@pytest.mark.parametrize("loader", ["fast", "pure"])
def test_aliases_may_add_up_to_the_bound_and_no_more(loader):
    def parse(text: str):
        if loader == "fast":
            return parse_yaml(text, "k.yaml")
        pure = _LocatingLoader(text)
        pure.source_name = "k.yaml"
        try:
            return pure.get_single_data()
        finally:
            pure.dispose()

    size = 1000
    within = MAX_ALIAS_EXPANSION // (size + 1)  # each alias adds the list and its items
    assert len(parse(_repeated(within, size))["uses"]) == within
    with pytest.raises(ConfigError, match=r"k\.yaml:\d+: invalid YAML: aliases expand the document"):
        parse(_repeated(within + 2, size))


def test_a_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="an alias refers to a collection that contains it"):
        parse_yaml("a: &a [1, *a]\n", "k.yaml")


def test_shown_is_bounded_in_size_and_work():
    nested: list = ["lol"] * 9
    for _ in range(30):  # 9**30 strings once expanded: a full repr would never finish
        nested = [nested] * 9
    text = shown(nested)
    assert len(text) <= SHOWN_CHARS + 30 and text.endswith("...]")
    assert shown("x" * 10_000).startswith("'xxx") and len(shown("x" * 10_000)) < SHOWN_CHARS + 30
    assert elide("y" * 10_000) == "y" * SHOWN_CHARS + f"…(+{10_000 - SHOWN_CHARS} chars)"
    assert shown("short") == "'short'"


def test_format_problems_bounds_each_problem(tmp_path):
    (tmp_path / "k.yaml").write_text("environments:\n  - name: production\nclients:\n  - name: " + "a" * 50_000 + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    line = format_problems(error.value)
    assert len(line) < 2000 and "k.yaml:4:" in line


# -- 6. dangerous findings: the lint's errors, computed at each load ------------------------------


def _config(tmp_path: Path, data: dict) -> Path:
    folder = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "k.yaml").write_text(yaml.safe_dump(data))
    return folder


DANGEROUS = [
    {
        "environments": [{"name": "production"}, {"name": "staging"}],
        "settings": {"trusted_proxies": ["0.0.0.0/0", "::/0", "10.0.0.0/8"]},
        "clients": [
            {"name": "any", "ip_address": "0.0.0.0/0, ::/0"},
            {"name": "any-off", "ip_address": "::/0", "enabled": False},
            {"name": "elsewhere", "ip_address": "0.0.0.0/0"},
            {"name": "wide", "ip_address": "10.0.0.0/8"},
        ],
        "routes": [
            {"name": "api"},
            {"name": "open", "requires_clients": False},
            {"name": "open-off", "requires_clients": False, "enabled": False},
        ],
        "assignments": {"api": {"production": ["any", "any-off"], "staging": ["elsewhere"]}},
        "api_keys": [{"name": "t", "key_sha256": "0" * 64, "type": "test"}],
    },
    {"environments": [{"name": "production"}], "routes": [{"name": "api"}]},
]


@pytest.mark.parametrize("data", DANGEROUS)
def test_error_findings_are_exactly_the_errors_of_lint(tmp_path, data):
    config = load_config(_config(tmp_path, data))
    assert error_findings(config) == [f for f in lint(config) if f.severity == "error"]


def test_the_dangerous_config_has_the_expected_errors(tmp_path):
    config = load_config(_config(tmp_path, DANGEROUS[0]))
    assert sorted(f.rule for f in error_findings(config)) == [
        "open-forward", "open-range", "open-range", "trusted-proxies", "trusted-proxies",
    ]  # fmt: skip


def test_unassigned_route_names_each_environment_and_the_test_key_exception(tmp_path):
    data = {
        "environments": [{"name": "production"}, {"name": "staging"}, {"name": "dev"}],
        "clients": [
            {"name": "app", "ip_address": "10.1.2.3", "description": "x"},
            {"name": "old", "ip_address": "10.1.2.4", "description": "x", "enabled": False},
        ],
        "routes": [
            {"name": "api", "target_base_url": "http://127.0.0.1:9"},
            {"name": "off", "target_base_url": "http://127.0.0.1:9", "enabled": False},
            {"name": "pub", "target_base_url": "http://127.0.0.1:9", "requires_clients": False},
        ],
        "assignments": {"api": {"production": ["app"], "staging": ["old"]}},
    }
    findings = [f for f in lint(load_config(_config(tmp_path, data))) if f.rule == "unassigned-route"]
    assert [f.message for f in findings] == [
        'route "api" requires clients but no enabled client is assigned to it in staging, dev: '
        "every caller is refused there"
    ]
    data["api_keys"] = [{"name": "t", "key_sha256": "0" * 64, "type": "test"}]
    findings = [f for f in lint(load_config(_config(tmp_path, data))) if f.rule == "unassigned-route"]
    assert findings[0].message.endswith("(except callers with a test key)")


def test_many_dangerous_findings_are_capped_in_the_log_and_status(tmp_path, caplog):
    clients = [{"name": f"c{i}", "ip_address": "0.0.0.0/0"} for i in range(25)]
    data = {
        "environments": [{"name": "production"}],
        "clients": clients,
        "routes": [{"name": "api"}],
        "assignments": {"api": {"production": [c["name"] for c in clients]}},
    }
    folder = _config(tmp_path, data)
    policy = load_policy(folder)
    holder = Installed(policy)
    hot = HotReload(holder.install, lambda: holder.policy)
    with caplog.at_level(logging.WARNING, logger="knoxcall"):
        hot.set_folder(folder, policy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 21 and "and 5 more" in warnings[-1]
    notes = hot.status_notes(policy.version)
    assert notes[0] == "dangerous settings (knoxcall check errors): 25, served as written"
    assert len(notes) == 22 and "and 5 more" in notes[-1]
