"""A test-only mitmproxy script: writes the output of ``knoxcall.status`` to a file every 0.1 s.

mitmdump has no way to run a command from outside; end-to-end tests load this beside the
addon (``-s tests/status_probe.py --set status_probe_file=PATH``) to see what an operator
would see. Bounded: it stops after an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from mitmproxy import ctx


class StatusProbe:
    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option("status_probe_file", str, "", "File to write knoxcall.status to, every 0.1 s.")

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.write_forever())

    async def write_forever(self) -> None:
        for _ in range(36_000):
            path = ctx.options.status_probe_file
            if path:
                with contextlib.suppress(Exception):
                    text = ctx.master.commands.execute("knoxcall.status")
                    with open(path + ".tmp", "w", encoding="utf-8") as f:
                        f.write(text)
                    os.replace(path + ".tmp", path)
            await asyncio.sleep(0.1)

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()


addons = [StatusProbe()]
