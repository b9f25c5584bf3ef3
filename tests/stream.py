"""Read an agent's SSE stream in the background and search what arrived."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from typing import Callable


class StreamReader:
    def __init__(self, port: int, path: str = "/devtools/api/events") -> None:
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=None)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.status
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        event_type = None
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    return
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    event_type = line[7:]
                elif line.startswith("data: ") and event_type:
                    with self.lock:
                        self.events.append((event_type, json.loads(line[6:])))
                    event_type = None
        except (OSError, ValueError, AttributeError):  # closed under us at teardown
            return

    def close(self) -> None:
        self.conn.close()

    def find(self, pred: Callable[[str, dict], bool], count: int = 1, timeout: float = 20) -> list[tuple[str, dict]]:
        """Wait until ``count`` events match; returns all matches (maybe fewer on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [(t, d) for t, d in self.events if pred(t, d)]
            if len(got) >= count or time.monotonic() > deadline:
                return got

            time.sleep(0.05)

    def transactions(self, marker: str, count: int = 1, timeout: float = 20) -> list[dict]:
        """Decoded transactions whose URL contains ``marker``, in arrival order."""
        def pred(t, d):
            return t == "request.http_transaction" and marker in (d["data"]["data"]["summary"].get("request_url") or "")

        return [tx_of(d) for _, d in self.find(pred, count, timeout)]

    def connection_events(self, connection_id: str) -> list[tuple[str, dict]]:
        with self.lock:
            return [(t, d["data"]["data"]) for t, d in self.events
                    if t.startswith("connection.") and d["data"]["data"]["meta"]["connectionId"] == connection_id]


def tx_of(body: dict) -> dict:
    inner = body["data"]["data"]
    full = json.loads(base64.b64decode(inner["data"]))
    full["_event"] = inner
    return full


def body_of(message: dict) -> bytes:
    return base64.b64decode(message.get("body") or "")
