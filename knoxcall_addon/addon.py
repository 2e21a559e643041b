"""Entry point for ``mitmdump -s knoxcall_addon/addon.py``.

mitmproxy calls any module-level function named like an event (load, request, ...)
as a hook. This module holds KnoxCall's: `hooktable.expose` puts them here, bound to one
KnoxCall (and the lifecycle ones to it and the connectivity monitor), instead of an
``addons`` list that mitmproxy would walk for every event of every flow. No other name
here is a hook.
"""

import sys
from pathlib import Path

try:
    from knoxcall_addon import hooktable
except ModuleNotFoundError as missing:  # run from a checkout that is not installed
    if missing.name != "knoxcall_addon":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from knoxcall_addon import hooktable

knoxcall, monitor = hooktable.expose(globals())
