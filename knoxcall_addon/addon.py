"""Entry point for ``mitmdump -s knoxcall_addon/addon.py``.

mitmproxy calls any module-level function named like an event (load, request, ...)
as a hook, so this file holds imports and ``addons`` only.
"""

import sys
from pathlib import Path

try:
    from knoxcall_addon.connectivity import ConnectivityMonitor
    from knoxcall_addon.proxy_addon import KnoxCall
except ModuleNotFoundError as missing:  # run from a checkout that is not installed
    if missing.name != "knoxcall_addon":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from knoxcall_addon.connectivity import ConnectivityMonitor
    from knoxcall_addon.proxy_addon import KnoxCall

addons = [KnoxCall(), ConnectivityMonitor()]
