"""Capture layer: eBPF probes → typed records.  Knows nothing about HTTP."""

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

__all__ = [
    "Attachment", "Capture", "CgroupCreated", "CaptureError", "ensure_tracefs", "DataChunk", "Endpoint",
    "ProcessExec", "ProcessExit", "ProcessFork", "Record", "SocketAccept", "SocketAddress",
    "SocketClose", "SocketConnect", "TlsServerName",
]
