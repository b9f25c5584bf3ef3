"""HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/) from transactions.

Built from the events' wire JSON, so a live stream and a replayed capture file
export the same way (the page's Export HAR, ``ui/export.js``, follows the same
rules).  Response bodies are text when they are UTF-8 without control
characters, else base64 with ``encoding: "base64"`` as HAR 1.2 allows; such a
request body is base64 too (HAR has no encoding field for ``postData``:
``_encoding`` says so).

A capture file is untrusted: a field of the wrong JSON type leaves its entry
out, counted in the log's ``comment``, rather than making an invalid HAR.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import re
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from qtap_devtools import __version__
from qtap_devtools.events import HTTP_TRANSACTION, Envelope, decode_transaction, parse_rfc3339, rfc3339


def _num(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is not a number")
    return float(value)


def _int(value: Any, what: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is not an integer")
    return value


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} is not text")
    return value


def _headers(headers: Mapping[str, Any]) -> list[dict]:
    out = []
    for name, value in headers.items():
        for v in value if isinstance(value, list) else [value]:
            out.append({"name": name, "value": str(v)})
    return out


def _values(headers: Mapping[str, Any], name: str) -> list[str]:
    out: list[str] = []
    for key, value in headers.items():
        if key.lower() == name:
            out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return out


def _request_cookies(headers: Mapping[str, Any]) -> list[dict]:
    out = []
    for line in _values(headers, "cookie"):
        for pair in line.split(";"):
            name, eq, value = pair.strip().partition("=")
            if name and eq:
                out.append({"name": name, "value": value})
    return out


def _http_date(text: str) -> str | None:
    """A cookie's Expires (an HTTP date, RFC 6265's loose reading aside) in ISO 8601, or None."""
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.isoformat().replace("+00:00", "Z")


def _response_cookies(headers: Mapping[str, Any]) -> list[dict]:
    out = []
    for line in _values(headers, "set-cookie"):
        first, *attrs = line.split(";")
        name, eq, value = first.strip().partition("=")
        if not (name and eq):
            continue
        cookie: dict[str, Any] = {"name": name, "value": value}
        for attr in attrs:
            key, _, val = attr.strip().partition("=")
            key = key.lower()
            if key in ("path", "domain"):
                cookie[key] = val
            elif key == "expires":
                # HAR 1.2 wants ISO 8601; an unreadable date is left out.
                when = _http_date(val)
                if when is not None:
                    cookie["expires"] = when
            elif key == "httponly":
                cookie["httpOnly"] = True
            elif key == "secure":
                cookie["secure"] = True
        out.append(cookie)
    return out


def _content(body_b64: Any, what: str) -> tuple[str, str | None, int]:
    try:
        raw = base64.b64decode(_str(body_b64, what), validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return body_b64, "base64", len(raw)
    # NUL and most C0 controls mean binary even in valid UTF-8 (as the page's textOf).
    return (body_b64, "base64", len(raw)) if _BINARY.search(text) else (text, None, len(raw))


_BINARY = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f]")


def _body_comment(side: Mapping[str, Any], size: int) -> str | None:
    """What a body in the HAR is not: whole, or decoded."""
    notes = []
    if side.get("body_truncated"):
        notes.append(f"cut: the first {size} bytes were kept (--max-body-bytes, or not all captured)")
    if side.get("body_decode_error"):
        notes.append(f"not decoded: {side['body_decode_error']}")
    return "; ".join(notes) or None


def _location(headers: Mapping[str, Any]) -> str:
    values = _values(headers, "location")
    return values[0] if values else ""


def entry(ts: str, tx: Mapping[str, Any], request_id: str | None = None) -> dict:
    """One HAR entry; ``request_id`` (the event's requestId) names it in ``_requestId``, as the page's do."""
    req = _obj(tx.get("request"), "request")
    if not req.get("method"):  # JSON, but not a transaction: no entry of empty strings
        raise ValueError("not a transaction: it has no request.method")
    resp = _obj(tx.get("response"), "response")
    meta = _obj(tx.get("metadata"), "metadata")
    timing = _obj(tx.get("timing"), "timing")
    req_headers = _obj(req.get("headers"), "request.headers")
    resp_headers = _obj(resp.get("headers"), "response.headers")
    url = _str(req.get("url"), "request.url")

    us = _num(tx.get("duration_us"), "duration_us")
    duration = us / 1000 if us is not None else (_num(tx.get("duration_ms"), "duration_ms") or 0.0)
    send, wait, receive = (_num(timing.get(k), f"timing.{k}") for k in ("send_ms", "wait_ms", "receive_ms"))
    if send is None and wait is None and receive is None:
        send, wait, receive = 0.0, duration, 0.0  # only the whole is known
    send, wait, receive = (max(0.0, v or 0.0) for v in (send, wait, receive))
    started = tx.get("started_at")
    if started is None:  # Qtap's own files: the event is stamped at the transaction's end
        started = rfc3339(parse_rfc3339(ts) - int(duration * 1e6)) if ts else ""
    started = _str(started, "started_at")

    text, encoding, size = _content(req.get("body"), "request.body")
    version = _str(req.get("http_version"), "request.http_version") or "HTTP/1.1"
    request: dict[str, Any] = {
        "method": _str(req.get("method"), "request.method"),
        "url": url,
        "httpVersion": version,
        "cookies": _request_cookies(req_headers),
        "headers": _headers(req_headers),
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)],
        "headersSize": -1,
        "bodySize": _int(req.get("body_size"), "request.body_size", size),
    }
    if size:
        mime = _str(req.get("content_type"), "request.content_type")
        post: dict[str, Any] = {"mimeType": mime, "text": text}
        if encoding:
            post["_encoding"] = encoding
        elif mime.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            post["params"] = [{"name": k, "value": v} for k, v in parse_qsl(text, keep_blank_values=True)]
        comment = _body_comment(req, size)
        if comment:
            post["comment"] = comment
        request["postData"] = post

    rtext, rencoding, rsize = _content(resp.get("body"), "response.body")
    content: dict[str, Any] = {"size": rsize, "mimeType": _str(resp.get("content_type"), "response.content_type"),
                               "text": rtext}
    if rencoding:
        content["encoding"] = rencoding
    comment = _body_comment(resp, rsize)
    if comment:
        content["comment"] = comment
    response = {
        "status": _int(resp.get("status"), "response.status", 0),
        "statusText": _str(resp.get("reason"), "response.reason"),
        "httpVersion": _str(resp.get("http_version"), "response.http_version") or version,
        "cookies": _response_cookies(resp_headers),
        "headers": _headers(resp_headers),
        "content": content,
        "redirectURL": _location(resp_headers),
        "headersSize": -1,
        "bodySize": _int(resp.get("body_size"), "response.body_size", rsize) if resp else -1,
    }
    out: dict[str, Any] = {
        "startedDateTime": started,
        # HAR: the sum of the timings (exact to the µs, as the transaction's).
        "time": round(send + wait + receive, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": send, "wait": wait, "receive": receive},
        "connection": _str(meta.get("connection_id"), "metadata.connection_id"),
        "_process": {"pid": meta.get("process_id"), "exe": meta.get("process_exe")},
    }
    if request_id is not None:
        out["_requestId"] = request_id
    # The server's address: the peer, unless this side is the server.
    server = meta.get("local_address") if tx.get("direction") == "ingress" else meta.get("remote_address")
    if isinstance(server, dict) and isinstance(server.get("ip"), str):
        out["serverIPAddress"] = server["ip"]
    if meta.get("container_name"):
        out["_container"] = meta["container_name"]
    if tx.get("error"):
        out["_error"] = tx["error"]
    flags = [f for f in ("partial", "incomplete", "shed") if tx.get(f)]
    if flags or tx.get("error"):
        out["comment"] = "; ".join(flags + ([str(tx["error"])] if tx.get("error") else []))
    return out


def _start_ns(e: dict) -> int:
    try:
        return parse_rfc3339(e["startedDateTime"])
    except ValueError:
        return 0


def from_envelopes(envelopes: Iterable[Envelope], note: str | None = None) -> dict:
    """A HAR log of the transactions among ``envelopes``, in the order they
    started (each request once, however often a file repeats it).

    A transaction that cannot be converted (a capture file's: its base64 JSON
    is not a transaction, or a field has the wrong type) is left out, and the
    log's ``comment`` says how many and why the first one was; the rest of
    the export is still made.  ``note`` is added to that comment.
    """
    entries: list[dict] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for env in envelopes:
        if env.type != HTTP_TRANSACTION:
            continue
        body = env.body
        rid = env.inner.get("requestId") or "?"
        if rid != "?":
            if rid in seen:
                continue
            seen.add(rid)
        tx = decode_transaction(body)
        if tx is None:
            skipped.append(f"{rid}: its data is not a base64-encoded JSON transaction")
            continue
        try:
            entries.append(entry(body.get("ts") or "", tx, rid if rid != "?" else None))
        except (ValueError, TypeError, AttributeError) as exc:  # a field of the wrong type
            skipped.append(f"{rid}: {exc}")
    entries.sort(key=_start_ns)
    log: dict[str, Any] = {
        "version": "1.2",
        "creator": {"name": "qtap-devtools", "version": __version__},
        "entries": entries,
    }
    comments = [note] if note else []
    if skipped:
        n = len(skipped)
        comments.append(f"{n} transaction{'s' if n > 1 else ''} left out, not convertible (first: {skipped[0]})")
    if comments:
        log["comment"] = "; ".join(comments)
    return {"log": log}
