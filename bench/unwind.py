"""A bench stopped by SIGTERM or SIGHUP unwinds as Ctrl-C does.

The default action for either kills Python on the spot: no ``finally`` or
``__exit__`` runs, so the agent, nginx (on its port) and wrk were left behind.
Raising SystemExit instead lets every context manager clean up.
"""

from __future__ import annotations

import signal
import sys
import time


def on_stop_signals(prog: str) -> None:
    def stop(signum: int, _frame: object) -> None:
        print(f"[{prog} {time.strftime('%H:%M:%S')}] stopped by {signal.Signals(signum).name}; cleaning up",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
