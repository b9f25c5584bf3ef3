"""Regenerate ``examples/traffic-capture.txt`` from the test samples.

    cd /work/main && .venv/bin/python examples/make_traffic_capture.py > examples/traffic-capture.txt

The frames are numbered exactly as ``qtap-devtools run --output`` writes them
(``event:``, ``data:``, then ``id:``), from the same typed events the tests use.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtap_devtools.broadcast import Broadcaster  # noqa: E402
from tests import samples  # noqa: E402


INSTANCE = "d4u4dhg7p3qk26l90000"


def main() -> None:
    # A fixed instance id (an agent run's id prefixes its event ids), so the
    # file is reproducible.
    bc = Broadcaster(instance=INSTANCE)
    bc.add_listener(lambda item: sys.stdout.buffer.write(item.frame))
    for event in samples.session_events():
        bc.publish(event.envelope())


if __name__ == "__main__":
    main()
