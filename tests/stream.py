"""Read an agent's SSE stream in the background and search what arrived.

The machine may be busy (a benchmark pushing thousands of transactions a
second through the same agent), so the reader must keep up: searches scan
only what arrived since they last looked, connection events are indexed by
connection id, and ``keep`` can drop events a test will never ask about
before they are stored.  ``system.dropped`` is always kept, and ``missed``
says how many events the agent dropped for this client, so a test that
timed out can say whether its event was lost on the way.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from typing import Callable


class StreamReader:
    def __init__(self, port: int, path: str = "/devtools/api/events",
                 keep: Callable[[str, dict], bool] | None = None) -> None:
        self.events: list[tuple[str, dict]] = []
        self.by_connection: dict[str, list[tuple[str, dict]]] = {}
        self.seen = 0  # events received, kept or not
        self.missed = 0  # events the agent dropped for this client (system.dropped)
        self.keep = keep
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
                    self._add(event_type, json.loads(line[6:]))
                    event_type = None
        except (OSError, ValueError, AttributeError):  # closed under us at teardown
            return

    def _add(self, event_type: str, data: dict) -> None:
        self.seen += 1
        if event_type == "system.dropped":
            self.missed += data.get("data", {}).get("missed", 0)
        elif self.keep is not None and not self.keep(event_type, data):
            return
        with self.lock:
            self.events.append((event_type, data))
            if event_type.startswith("connection."):
                cid = data["data"]["data"]["meta"]["connectionId"]
                self.by_connection.setdefault(cid, []).append((event_type, data["data"]["data"]))

    def close(self) -> None:
        self.conn.close()

    def find(self, pred: Callable[[str, dict], bool], count: int = 1, timeout: float = 20) -> list[tuple[str, dict]]:
        """Wait until ``count`` events match; returns all matches (maybe fewer on timeout)."""
        deadline = time.monotonic() + timeout
        got: list[tuple[str, dict]] = []
        done = 0
        while True:
            with self.lock:
                fresh = self.events[done:]
            done += len(fresh)
            got += [(t, d) for t, d in fresh if pred(t, d)]
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
            return list(self.by_connection.get(connection_id, ()))

    def health(self) -> str:
        """For failure messages: how much arrived and whether any was lost."""
        return f"stream: {self.seen} events received, {len(self.events)} kept, {self.missed} dropped by the agent"


def tx_of(body: dict) -> dict:
    inner = body["data"]["data"]
    full = json.loads(base64.b64decode(inner["data"]))
    full["_event"] = inner
    return full


def body_of(message: dict) -> bytes:
    return base64.b64decode(message.get("body") or "")
