"""Hot reload in process: debounce, errors that keep the old policy, commands, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mitmproxy.test import taddons
from watchdog.utils import BaseThread

from knoxcall_addon.folderwatch import FolderWatcher, watch_dirs
from knoxcall_addon.loader import load_config
from knoxcall_addon.policy import load_policy
from knoxcall_addon.proxy_addon import KnoxCall
from knoxcall_addon.reloader import HotReload, timed_load
from knoxcall_addon.yamlsource import folder_version

CLIENTS = """\
clients:
  - name: office
    ip_address: {ip}
  - name: lab
    ip_address: 192.0.2.10
assignments:
  api:
    production: [{assigned}]
"""
BASE = """\
environments:
  - name: production
routes:
  - name: api
"""


def write_config(folder: Path, ip: str = "192.0.2.9", assigned: str = "office, lab") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip=ip, assigned=assigned))
    return folder


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


_EARLIER: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_of_earlier_tests() -> None:
    """A test answers for its own threads: a watchdog thread another test left behind (seen
    once in CI: an InotifyEmitter of unknown origin) must not fail every test after it."""
    _EARLIER.clear()
    _EARLIER.update(threading.enumerate())


def knoxcall_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in _EARLIER and (isinstance(t, BaseThread) or t.name.startswith("knoxcall"))
    ]


# -- the watcher ---------------------------------------------------------------------------


def test_a_burst_of_pokes_gives_one_call(tmp_path):
    calls: list[float] = []
    watcher = FolderWatcher(tmp_path, lambda: calls.append(time.monotonic()), debounce=1.0, max_delay=60)
    watcher.start()
    try:
        for _ in range(50):
            watcher.poke()
        assert wait_until(lambda: len(calls) >= 1)
        time.sleep(1.5)  # quiet: nothing else may come
        assert len(calls) == 1
    finally:
        watcher.stop()


def test_a_burst_of_file_writes_gives_one_call(tmp_path):
    """Several saves in a row (in place and renamed over) are one reload, after they end."""
    folder = write_config(tmp_path / "cfg")
    calls: list[str] = []
    # A generous quiet time: the machine is shared, a burst must not be cut by a stall.
    watcher = FolderWatcher(
        folder, lambda: calls.append(folder_version(folder)), debounce=1.5, max_delay=60, settle=1.5
    )
    watcher.start()
    try:
        for i in range(10):
            (folder / "clients.yaml").write_text(CLIENTS.format(ip=f"192.0.2.{i + 20}", assigned="office"))
            tmp = folder / ".clients.yaml.tmp"
            tmp.write_text(CLIENTS.format(ip=f"192.0.2.{i + 40}", assigned="office"))
            os.replace(tmp, folder / "clients.yaml")
        assert wait_until(lambda: len(calls) >= 1)
        time.sleep(2.0)
        assert len(calls) == 1
        assert calls[0] == folder_version(folder)  # it read the final content
    finally:
        watcher.stop()
    assert not watcher.is_alive()


def calls_recorder(folder: Path) -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []

    def record() -> None:
        seen.append(folder_version(folder))

    return seen, record


@pytest.mark.parametrize("how", ["in_place", "rename_over"])
def test_a_completed_save_is_read_without_the_full_debounce(tmp_path, how):
    """A save that ends with the file closed (or renamed into place) needs no long quiet time.
    The debounce here is 60 s: only the short settle time can bring the call in time."""
    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=60, max_delay=120, settle=0.05)
    watcher.start()
    try:
        text = CLIENTS.format(ip="192.0.2.9", assigned="lab")
        if how == "in_place":
            (folder / "clients.yaml").write_text(text)
        else:
            (folder / ".clients.yaml.tmp").write_text(text)
            os.replace(folder / ".clients.yaml.tmp", folder / "clients.yaml")
        assert wait_until(lambda: len(seen) == 1, timeout=30)
        assert seen[0] == folder_version(folder)
    finally:
        watcher.stop()


def test_an_unfinished_change_waits_for_the_full_debounce(tmp_path):
    """A new folder, a deleted file or a swap file is no completed save: the debounce holds."""
    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=3.0, max_delay=120, settle=0.05)
    watcher.start()
    try:
        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
        (folder / "base.yaml").unlink()  # after the save: the burst is not over
        (folder / ".base.yaml.swp").write_text("swap")  # closed, but never read
        time.sleep(1.0)
        assert seen == []
        assert wait_until(lambda: len(seen) == 1)
    finally:
        watcher.stop()


def test_a_file_still_open_for_writing_is_not_read_half_written(tmp_path):
    """A slow writer pausing mid-file: the reload waits for the close, then reads it whole."""
    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.2, open_wait=30)
    watcher.start()
    try:
        text = CLIENTS.format(ip="192.0.2.9", assigned="lab")
        with open(folder / "clients.yaml", "w") as f:
            f.write(text[:40])  # valid YAML on its own: "clients:\n  - name: office\n    ip_..."
            f.flush()
            time.sleep(1.0)  # far longer than the debounce
            assert seen == []
            f.write(text[40:])
        assert wait_until(lambda: len(seen) == 1)
        assert seen[0] == folder_version(folder)
        assert (folder / "clients.yaml").read_text() == text
    finally:
        watcher.stop()


def test_an_open_editor_swap_file_does_not_hold_reloads_back(tmp_path):
    """vim keeps .clients.yaml.swp open and written while you edit: not a config file being written."""
    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.2, open_wait=60)
    watcher.start()
    try:
        with open(folder / ".clients.yaml.swp", "w") as swap:
            swap.write("swap")
            swap.flush()
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            assert wait_until(lambda: seen == [folder_version(folder)])
    finally:
        watcher.stop()


def test_a_replaced_folder_is_watched_again(tmp_path):
    """rm -rf + recreate, or mv new into place: the new folder's edits are seen too."""
    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.2)
    watcher.start()
    try:
        os.rename(folder, tmp_path / "cfg.old")
        write_config(tmp_path / "cfg.new", assigned="lab")
        os.rename(tmp_path / "cfg.new", folder)
        assert wait_until(lambda: seen and seen[-1] == folder_version(folder))
        count = len(seen)
        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
        assert wait_until(lambda: len(seen) > count and seen[-1] == folder_version(folder))
        assert watcher.watched == [folder.resolve()]
    finally:
        watcher.stop()


def test_a_swapped_folder_symlink_is_followed(tmp_path):
    """knoxcall_config=/srv/knoxcall/current, current -> release-N swapped like `ln -sfn`."""
    write_config(tmp_path / "release-1")
    write_config(tmp_path / "release-2", assigned="lab")
    current = tmp_path / "current"
    os.symlink("release-1", current)
    seen, record = calls_recorder(current)
    watcher = FolderWatcher(current, record, debounce=0.2)
    watcher.start()
    try:
        assert watcher.watched == [(tmp_path / "release-1").resolve()]
        os.symlink("release-2", tmp_path / "current.tmp")
        os.replace(tmp_path / "current.tmp", current)
        assert wait_until(lambda: seen and seen[-1] == folder_version(tmp_path / "release-2"))
        assert wait_until(lambda: watcher.watched == [(tmp_path / "release-2").resolve()])
        count = len(seen)
        (tmp_path / "release-2" / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
        assert wait_until(lambda: len(seen) > count and seen[-1] == folder_version(current))
    finally:
        watcher.stop()


def test_watch_dirs_follow_configmap_symlinks(tmp_path):
    folder = tmp_path / "cm"
    folder.mkdir()
    (folder / "..2026_a").mkdir()
    (folder / "..2026_a" / "clients.yaml").write_text("clients: []\n")
    os.symlink("..2026_a", folder / "..data")
    os.symlink("..data/clients.yaml", folder / "clients.yaml")
    assert watch_dirs(folder) == {folder, (folder / "..2026_a").resolve()}


# -- HotReload without mitmproxy ------------------------------------------------------------


class Installed:
    """Stands in for the addon: holds the policy in force, records install calls."""

    def __init__(self, policy):
        self.policy = policy
        self.notes: list[str] = []

    def install(self, policy, note: str) -> None:
        self.policy = policy
        self.notes.append(note)


def test_invalid_edit_keeps_the_policy_and_names_file_and_line(tmp_path, caplog):
    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)

    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9/24", assigned="office"))
    with caplog.at_level(logging.INFO, logger="knoxcall"):
        message = hot.reload_now()
        again = hot.reload_now()  # same content: not logged twice
    assert holder.policy is good
    assert holder.notes == []
    assert f"{folder / 'clients.yaml'}:3:" in message
    assert "host bits set" in message
    assert hot.last_error is not None and "clients.yaml:3:" in hot.last_error
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "clients.yaml:3:" in errors[0].getMessage()
    assert f"still serving {good.version}" in errors[0].getMessage()
    assert "unchanged since the last error" in again

    # Fixed: picked up, error cleared, change summarised.
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
    message = hot.reload_now()
    assert holder.policy is not good
    assert holder.policy.version == folder_version(folder)
    assert hot.last_error is None
    assert "assignments ~api/production(-office)" in message
    assert "assignments ~api/production(-office)" in holder.notes[0]


def test_unknown_client_in_assignment_is_reported_with_its_line(tmp_path):
    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="ofice"))
    message = hot.reload_now()
    assert holder.policy is good
    assert "clients.yaml:8:" in message and "unknown client 'ofice'" in message


def test_revert_to_the_good_content_clears_the_error(tmp_path):
    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)
    original = (folder / "clients.yaml").read_text()
    (folder / "clients.yaml").write_text("clients: [\n")
    assert "invalid YAML" in hot.reload_now()
    (folder / "clients.yaml").write_text(original)
    assert hot.reload_now() == f"config {good.version} unchanged"
    assert hot.last_error is None
    assert holder.policy is good and holder.notes == []


def test_an_older_result_never_replaces_a_newer_one(tmp_path):
    """Two loads race (watcher thread and command): the one read last wins on the loop."""
    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
    older = hot.attempt()
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
    newer = hot.attempt()
    hot.apply(newer)
    assert "a newer reload was applied already" in hot.apply(older)
    assert holder.policy is newer.policy
    assert holder.policy.config.assigned_clients("api", "production") == ("office",)


def test_timed_load_for_the_benchmark(tmp_path):
    folder = write_config(tmp_path / "cfg")
    loaded = timed_load(folder)
    assert loaded.policy.version == load_config(folder).version == folder_version(folder)
    assert loaded.seconds >= 0


# -- the addon: watcher lifecycle, commands --------------------------------------------------


def test_addon_reloads_on_edit_and_done_stops_every_thread(tmp_path):
    folder = write_config(tmp_path / "cfg")

    async def scenario() -> None:
        addon = KnoxCall()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, knoxcall_config=str(folder))
            first = addon.current.policy.version
            addon.running()
            assert addon.reload.watching
            assert any(t.name == "knoxcall-reload" for t in knoxcall_threads())
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            for _ in range(500):  # up to ~10 s, polling without blocking the loop
                if addon.current.policy.version != first:
                    break
                await asyncio.sleep(0.02)
            assert addon.current.policy.version == folder_version(folder) != first
            assert addon.current.policy.config.assigned_clients("api", "production") == ("lab",)
            addon.done()
            assert not addon.reload.watching

    asyncio.run(scenario())
    assert wait_until(lambda: not knoxcall_threads(), timeout=5), knoxcall_threads()


def test_option_off_means_no_watcher_and_changing_the_folder_repoints_it(tmp_path):
    one = write_config(tmp_path / "one")
    two = write_config(tmp_path / "two", assigned="lab")

    async def scenario() -> None:
        addon = KnoxCall()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, knoxcall_config=str(one), knoxcall_reload=False)
            addon.running()
            assert not addon.reload.watching
            tctx.configure(addon, knoxcall_reload=True)
            assert addon.reload.watching and addon.reload.watcher.folder == one
            tctx.configure(addon, knoxcall_config=str(two))
            assert addon.reload.watching and addon.reload.watcher.folder == two
            assert addon.current.policy.config.folder == str(two)
            # Edits in the old folder no longer matter; edits in the new one do.
            (one / "clients.yaml").write_text("broken: [\n")
            (two / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
            for _ in range(500):
                if addon.current.policy.version == folder_version(two):
                    break
                await asyncio.sleep(0.02)
            assert addon.current.policy.version == folder_version(two)
            assert addon.reload.last_error is None
            addon.done()

    asyncio.run(scenario())
    assert wait_until(lambda: not knoxcall_threads(), timeout=5), knoxcall_threads()


def test_invalid_folder_option_at_runtime_keeps_the_policy(tmp_path):
    one = write_config(tmp_path / "one")
    bad = write_config(tmp_path / "bad", ip="not-an-ip")
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(one))
        policy = addon.current.policy
        with pytest.raises(Exception, match="not-an-ip"):
            tctx.configure(addon, knoxcall_config=str(bad))
        assert addon.current.policy is policy
        assert tctx.options.knoxcall_config == str(one)


class FakeMonitor:
    def status_lines(self) -> list[str]:
        return ["monitor: office 192.0.2.9 up (1.2 ms)"]


class ConnectivityMonitor(FakeMonitor):
    """Named like the real addon so that ctx.master.addons.get finds it."""


def test_status_and_reload_commands(tmp_path):
    folder = write_config(tmp_path / "cfg")
    addon = KnoxCall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, knoxcall_config=str(folder), knoxcall_reload=False)
        version = addon.current.policy.version
        status = tctx.master.commands.execute("knoxcall.status")
        assert f"config folder {folder}" in status
        assert f"version: {version}" in status
        assert "2 clients, 2 ranges, 1 routes, 1 environments, 1 assignments, 0 api keys" in status
        assert "last reload error: none" in status
        assert "hot reload: off" in status

        assert tctx.master.commands.execute("knoxcall.reload") == f"knoxcall: config {version} unchanged"

        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.0/33", assigned="office"))
        answer = tctx.master.commands.execute("knoxcall.reload")
        assert answer.startswith(f"knoxcall: config invalid, still serving {version}")
        assert "clients.yaml:3:" in answer
        status = tctx.command(addon.status_command)
        assert "last reload error" in status and "clients.yaml:3:" in status
        assert addon.current.policy.version == version

        (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="office"))
        answer = tctx.master.commands.execute("knoxcall.reload")
        assert answer.startswith(f"knoxcall: config {folder_version(folder)} loaded (was {version})")
        assert "assignments ~api/production(-lab)" in answer
        assert "last reload error: none" in tctx.master.commands.execute("knoxcall.status")

        tctx.master.addons.add(ConnectivityMonitor())
        assert "monitor: office 192.0.2.9 up" in tctx.master.commands.execute("knoxcall.status")


def test_a_folder_that_cannot_be_watched_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    """E.g. the per-user inotify instance limit: keep serving, say so, reload on command."""
    from watchdog.observers import Observer

    def no_inotify(*args, **kwargs):
        raise OSError(24, "inotify instance limit reached")

    monkeypatch.setattr(Observer, "schedule", no_inotify)
    folder = write_config(tmp_path / "cfg")

    async def scenario() -> None:
        addon = KnoxCall()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, knoxcall_config=str(folder))
            with caplog.at_level(logging.INFO, logger="knoxcall"):
                addon.running()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("cannot watch" in r.getMessage() for r in caplog.records)
            status = tctx.master.commands.execute("knoxcall.status")
            assert "the folder cannot be watched" in status
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            assert "loaded" in tctx.master.commands.execute("knoxcall.reload")
            assert addon.current.policy.version == folder_version(folder)
            addon.done()

    asyncio.run(scenario())
    assert wait_until(lambda: not knoxcall_threads(), timeout=5), knoxcall_threads()


def test_a_deleted_folder_or_an_unexpected_error_keeps_the_policy(tmp_path, monkeypatch):
    import shutil

    from knoxcall_addon import reloader

    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)

    shutil.rmtree(folder)
    assert "config folder does not exist" in hot.reload_now()
    assert holder.policy is good
    write_config(folder)  # the same files again
    assert hot.reload_now() == f"config {good.version} unchanged"
    assert hot.last_error is None

    def broken(folder):
        raise RuntimeError("bug in the loader")

    monkeypatch.setattr(reloader, "load_policy", broken)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
    answer = hot.reload_now()
    assert "cannot load: RuntimeError: bug in the loader" in answer
    assert holder.policy is good and holder.notes == []


def test_the_diff_is_computed_off_the_loop(tmp_path, monkeypatch):
    """Diffing a large config takes long: the watcher thread does it, apply only installs."""
    from knoxcall_addon import configdiff, reloader

    calls: list[str] = []

    def recording_diff(old, new):
        calls.append(threading.current_thread().name)
        return configdiff.diff_configs(old, new)

    monkeypatch.setattr(reloader, "diff_configs", recording_diff)
    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
    results = []
    worker = threading.Thread(target=lambda: results.append(hot.attempt()), name="knoxcall-reload")
    worker.start()
    worker.join()
    calls_before_apply = list(calls)
    message = hot.apply(results[0])
    assert calls_before_apply == ["knoxcall-reload"]
    assert calls == calls_before_apply  # nothing recomputed on the loop
    assert "assignments ~api/production(-office)" in message


def test_reload_command_on_a_slow_load_finishes_in_the_background(tmp_path, monkeypatch):
    """mitmproxy commands are synchronous: the loop waits a bounded time, the rest is handed over."""
    from knoxcall_addon import reloader

    release = threading.Event()

    def slow_load(folder):
        release.wait(10)
        return load_policy(folder)

    folder = write_config(tmp_path / "cfg")
    good = load_policy(folder)
    holder = Installed(good)
    hot = HotReload(holder.install, lambda: holder.policy)
    hot.set_folder(folder, good)
    monkeypatch.setattr(reloader, "load_policy", slow_load)
    (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))

    async def scenario() -> None:
        answer = hot.reload_now(wait=0.05)
        assert "still running" in answer
        assert holder.policy is good
        release.set()
        for _ in range(500):
            if holder.policy is not good:
                break
            await asyncio.sleep(0.02)
        assert holder.policy.version == folder_version(folder)
        assert "assignments ~api/production(-office)" in holder.notes[0]

    asyncio.run(scenario())
    hot.stop()
    assert not any(t.name == "knoxcall-reload-command" for t in threading.enumerate())


def test_new_and_deleted_files_and_sed_in_place_are_seen(tmp_path):
    import subprocess

    folder = write_config(tmp_path / "cfg")
    seen, record = calls_recorder(folder)
    watcher = FolderWatcher(folder, record, debounce=0.2)
    watcher.start()
    try:
        (folder / "extra.yaml").write_text("clients:\n  - name: extra\n    ip_address: 192.0.2.77\n")
        assert wait_until(lambda: seen and seen[-1] == folder_version(folder))
        (folder / "extra.yaml").unlink()
        assert wait_until(lambda: seen and seen[-1] == folder_version(folder))
        subprocess.run(["sed", "-i", "s/office, lab/lab/", str(folder / "clients.yaml")], check=True)
        assert "[lab]" in (folder / "clients.yaml").read_text()
        assert wait_until(lambda: seen and seen[-1] == folder_version(folder))
        assert len(set(seen)) == 3
    finally:
        watcher.stop()


def test_the_replaced_policy_is_freed_off_the_loop_and_its_memory_released(tmp_path, monkeypatch):
    """Dropping a 100k-range policy takes a while: the watcher thread does it, after the
    loop installed the new one, and then hands the memory back (malloc_trim)."""
    import asyncio
    import weakref

    from knoxcall_addon import reloader

    released: list[str] = []
    monkeypatch.setattr(reloader, "release_free_memory", lambda: released.append(threading.current_thread().name))
    folder = write_config(tmp_path / "cfg")
    holder = Installed(load_policy(folder))
    old = weakref.ref(holder.policy)
    freed_in: list[str] = []
    weakref.finalize(holder.policy, lambda: freed_in.append(threading.current_thread().name))

    async def scenario() -> None:
        hot = HotReload(holder.install, lambda: holder.policy, debounce=0.1)
        hot.set_folder(folder, holder.policy)
        hot.start(asyncio.get_running_loop())
        try:
            (folder / "clients.yaml").write_text(CLIENTS.format(ip="192.0.2.9", assigned="lab"))
            for _ in range(500):  # bounded: 10 s
                if released:
                    break
                await asyncio.sleep(0.02)
        finally:
            hot.stop()

    asyncio.run(scenario())
    assert holder.notes and "reloaded" in holder.notes[0]
    assert released and released[0].startswith("knoxcall")
    assert old() is None
    assert freed_in and freed_in[0].startswith("knoxcall")  # the watcher's thread, not the loop's


def test_after_a_load_the_full_collection_comes_at_once_not_at_a_later_request():
    """release_free_memory runs the collector's full pass (generation 2), which the load's
    surviving objects would otherwise set off at some request a few hundred requests later."""
    import gc

    from knoxcall_addon import reloader

    generations: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        reloader.release_free_memory()
    finally:
        gc.callbacks.remove(seen)
    assert 2 in generations
