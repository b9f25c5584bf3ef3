"""HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/) from transactions.

Built from the events' wire JSON, so a live stream and a replayed capture file
export the same way.  Bodies are text when they decode as UTF-8, else base64
with ``encoding: "base64"`` as HAR 1.2 allows.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from qtap_devtools import __version__
from qtap_devtools.events import HTTP_TRANSACTION, Envelope, decode_transaction


def _headers(headers: Mapping[str, Any]) -> list[dict]:
    out = []
    for name, value in (headers or {}).items():
        for v in value if isinstance(value, list) else [value]:
            out.append({"name": name, "value": str(v)})
    return out


def _content(body_b64: str | None) -> tuple[str, str | None, int]:
    try:
        raw = base64.b64decode(body_b64 or "", validate=True)
    except binascii.Error:
        raise ValueError("a body is not valid base64") from None
    try:
        return raw.decode("utf-8"), None, len(raw)
    except UnicodeDecodeError:
        return body_b64 or "", "base64", len(raw)


def _location(headers: Mapping[str, Any]) -> str:
    for name, value in headers.items():
        if name.lower() == "location":
            if isinstance(value, list):
                value = value[0] if value else ""
            return value if isinstance(value, str) else ""
    return ""


def entry(ts: str, tx: Mapping[str, Any]) -> dict:
    req = tx.get("request") or {}
    resp = tx.get("response") or {}
    url = req.get("url") or ""
    text, encoding, size = _content(req.get("body"))
    timing = tx.get("timing") or {}
    duration = float(tx.get("duration_ms") or 0)
    wait = float(timing.get("wait_ms", duration))
    receive = float(timing.get("receive_ms", 0))
    send = float(timing.get("send_ms", 0))
    request = {
        "method": req.get("method") or "",
        "url": url,
        "httpVersion": req.get("http_version") or "HTTP/1.1",
        "cookies": [],
        "headers": _headers(req.get("headers") or {}),
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)],
        "headersSize": -1,
        "bodySize": req.get("body_size", size),
    }
    if size:
        request["postData"] = {"mimeType": req.get("content_type") or "", "text": text}
        if encoding:
            request["postData"]["encoding"] = encoding
    rtext, rencoding, rsize = _content(resp.get("body"))
    content = {"size": rsize, "mimeType": resp.get("content_type") or "", "text": rtext}
    if rencoding:
        content["encoding"] = rencoding
    response = {
        "status": resp.get("status") or 0,
        "statusText": resp.get("reason") or "",
        "httpVersion": req.get("http_version") or "HTTP/1.1",
        "cookies": [],
        "headers": _headers(resp.get("headers") or {}),
        "content": content,
        "redirectURL": _location(resp.get("headers") or {}),
        "headersSize": -1,
        "bodySize": resp.get("body_size", -1) if resp else -1,
    }
    meta = tx.get("metadata") or {}
    out = {
        "startedDateTime": tx.get("started_at") or ts,
        "time": duration,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": send, "wait": wait, "receive": receive},
        "connection": meta.get("connection_id") or "",
        "_process": {"pid": meta.get("process_id"), "exe": meta.get("process_exe")},
    }
    remote = meta.get("remote_address")
    if isinstance(remote, dict) and remote.get("ip"):
        out["serverIPAddress"] = remote["ip"]
    if meta.get("container_name"):
        out["_container"] = meta["container_name"]
    if tx.get("error"):
        out["_error"] = tx["error"]
    return out


def from_envelopes(envelopes: Iterable[Envelope]) -> dict:
    """A HAR log of the transactions among ``envelopes``.

    A transaction that cannot be converted (a capture file's: its base64 JSON
    is not a transaction, or a field has the wrong type) is left out, and the
    log's ``comment`` says how many and why the first one was; the rest of
    the export is still made.
    """
    entries: list[dict] = []
    skipped: list[str] = []
    for env in envelopes:
        if env.type != HTTP_TRANSACTION:
            continue
        body = env.body
        tx = decode_transaction(body)
        rid = env.inner.get("requestId") or "?"
        if tx is None:
            skipped.append(f"{rid}: its data is not a base64-encoded JSON transaction")
            continue
        try:
            entries.append(entry(body.get("ts") or "", tx))
        except (ValueError, TypeError, AttributeError) as exc:  # a field of the wrong type
            skipped.append(f"{rid}: {exc}")
    log: dict[str, Any] = {
        "version": "1.2",
        "creator": {"name": "qtap-devtools", "version": __version__},
        "entries": entries,
    }
    if skipped:
        n = len(skipped)
        log["comment"] = f"{n} transaction{'s' if n > 1 else ''} left out, not convertible (first: {skipped[0]})"
    return {"log": log}
