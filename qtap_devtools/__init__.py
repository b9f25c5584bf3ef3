"""qtap-devtools: eBPF HTTP(S) capture streamed as Qpoint Qtap DevTools events."""

import os as _os

from qtap_devtools import compiled as _compiled

__version__ = "0.1.0"

if _compiled.run_source_instead(_os.environ):  # the compiled modules' Python (see compiled.py)
    _compiled.prefer_source()
