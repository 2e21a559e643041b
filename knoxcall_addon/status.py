"""What ``knoxcall.status`` says: the policy in force, hot reload, the last reload error."""

from __future__ import annotations

import time
from dataclasses import dataclass

from knoxcall_addon.accesslog import utc_timestamp
from knoxcall_addon.policy import Policy
from knoxcall_addon.reloader import HotReload
from knoxcall_addon.secretsource import secret_lines


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy and when it came into force; replaced by one assignment on reload."""

    policy: Policy
    loaded_at: float



def status_lines(current: LoadedPolicy | None, reload: HotReload, enabled: bool = True) -> list[str]:
    """What ``knoxcall.status`` says about the config, one fact per line."""
    if current is None:
        return ["knoxcall: no config loaded (every request is denied)"]
    policy, config = current.policy, current.policy.config
    age = max(0, round(time.time() - current.loaded_at))
    if reload.watching and reload.watcher is not None and reload.watcher.watched:
        watching = "on, watching " + ", ".join(str(p) for p in reload.watcher.watched)
    elif reload.watching:
        watching = "on, but the folder cannot be watched (see the event log); use knoxcall.reload after edits"
    elif enabled:
        watching = reload.failure_text() or (
            "off: the watcher could not start (see the event log); use knoxcall.reload after edits"
        )
    else:
        watching = "off (knoxcall_reload=false); use knoxcall.reload after edits"
    lines = [
        f"knoxcall: config folder {config.folder} ({len(config.files)} files)",
        f"version: {policy.version}, loaded {utc_timestamp(current.loaded_at)} ({age} s ago)",
        f"counts: {len(config.clients)} clients, {len(policy.clients_by_ip)} ranges, {len(config.routes)} routes, "
        f"{len(config.environments)} environments, {len(config.assignments)} assignments, "
        f"{len(config.api_keys)} api keys",
        f"hot reload: {watching}; {reload.reloads} reloads since start",
    ]
    if reload.last_error:
        when = utc_timestamp(reload.last_error_at) if reload.last_error_at else "?"
        lines.append(f"last reload error ({when}, still serving {policy.version}): {reload.last_error}")
    else:
        lines.append("last reload error: none")
    lines.extend(reload.status_notes(policy.version))  # files being written, dangerous findings
    lines.extend(secret_lines(config))  # sources and fingerprints, never a value
    return lines

