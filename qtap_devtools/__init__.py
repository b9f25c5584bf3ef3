"""qtap-devtools: eBPF HTTP(S) capture streamed as Qpoint Qtap DevTools events."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("QTAP_INTERPRETED"):  # run the compiled modules' Python instead (compiled.py)
    from qtap_devtools import compiled as _compiled

    _compiled.prefer_source()
