"""Capture layer: eBPF probes → typed records.  Knows nothing about HTTP.

Its names are imported on first use (PEP 562), not with the package: the
tuned-analysis child (``python -m qtap_devtools.capture.tuned``, plans.py)
imports this package too, and the loader, attacher and records it does not
need were ~0.14 s of its ~0.2 s start, on the path of every new OpenSSL
file's attach (a created container's libssl racing its first curl)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attach import Attachment
    from .loader import Capture, CaptureError, ensure_tracefs
    from .records import (
        CgroupCreated,
        DataChunk,
        Endpoint,
        ProcessExec,
        ProcessExit,
        ProcessFork,
        Record,
        SocketAccept,
        SocketAddress,
        SocketClose,
        SocketConnect,
        TlsServerName,
    )

_MODULE_OF = {
    "Attachment": "attach",
    **dict.fromkeys(("Capture", "CaptureError", "ensure_tracefs"), "loader"),
    **dict.fromkeys(("CgroupCreated", "DataChunk", "Endpoint", "ProcessExec", "ProcessExit", "ProcessFork", "Record",
                     "SocketAccept", "SocketAddress", "SocketClose", "SocketConnect", "TlsServerName"), "records"),
}

__all__ = [
    "Attachment", "Capture", "CgroupCreated", "CaptureError", "ensure_tracefs", "DataChunk", "Endpoint",
    "ProcessExec", "ProcessExit", "ProcessFork", "Record", "SocketAccept", "SocketAddress",
    "SocketClose", "SocketConnect", "TlsServerName",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups are the module's own
    return value
