"""The typed output of the HTTP/1 reassembler: one ``HttpExchange`` per request/response pair.

The assembler builds these once, when an exchange is emitted, and nothing changes
them after; the event model downstream derives its wire form from them.  They are
not frozen only because a frozen dataclass's ``__init__`` costs about a
microsecond more, three times per transaction.

Each writes its ``__init__`` out (the dataclass still gives ``repr`` and ``==``):
mypyc compiles this module, but a dataclass-generated ``__init__`` would run as
interpreted Python.  Written out for these and the event model's two per-transaction
classes, the pipeline went from 27 to 21 µs per transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Final, Sequence

from qtap_devtools.mypyc_attrs import mypyc_attr

Headers = tuple[tuple[str, str], ...]
# 1xx responses kept per exchange (a server may send any number; the rest are not listed).
MAX_INFORMATIONAL: Final = 16
# In place of "connection closed before …" for a message the capture shed:
# whatever ended it was in bytes the probes left out (a body-only call keeps
# nothing while shedding), so the close is all that was seen, not a failure.
SHED_END_UNSEEN: Final = "its end was in bytes shed while the agent was behind (not captured)"


@mypyc_attr(acyclic=True)  # scalars, bytes, headers: in no cycle (mypyc_attrs)
@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers  # original case and order, duplicates kept
    body: bytes = b""  # decoded when Content-Encoding is known and decoding worked, else raw
    body_wire_size: int = 0  # after de-chunking, before content decoding
    content_encoding: str | None = None
    body_truncated: bool = False
    body_decode_error: str | None = None
    chunked: bool = False
    trailers: Headers = ()

    def __init__(
        self,
        method: str, target: str, version: str, headers: Headers, body: bytes = b"",
        body_wire_size: int = 0, content_encoding: str | None = None, body_truncated: bool = False,
        body_decode_error: str | None = None, chunked: bool = False, trailers: Headers = (),
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.body_wire_size = body_wire_size
        self.content_encoding = content_encoding
        self.body_truncated = body_truncated
        self.body_decode_error = body_decode_error
        self.chunked = chunked
        self.trailers = trailers

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)


@mypyc_attr(acyclic=True)
@dataclass(slots=True)
class HttpResponse:
    status: int
    reason: str
    version: str
    headers: Headers
    body: bytes = b""
    body_wire_size: int = 0
    content_encoding: str | None = None
    body_truncated: bool = False
    body_decode_error: str | None = None
    chunked: bool = False
    trailers: Headers = ()

    def __init__(
        self,
        status: int, reason: str, version: str, headers: Headers, body: bytes = b"",
        body_wire_size: int = 0, content_encoding: str | None = None, body_truncated: bool = False,
        body_decode_error: str | None = None, chunked: bool = False, trailers: Headers = (),
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.body = body
        self.body_wire_size = body_wire_size
        self.content_encoding = content_encoding
        self.body_truncated = body_truncated
        self.body_decode_error = body_decode_error
        self.chunked = chunked
        self.trailers = trailers

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)


@mypyc_attr(acyclic=True)  # the two above and scalars
@dataclass(slots=True)
class HttpExchange:
    request: HttpRequest | None
    response: HttpResponse | None
    start_ns: int  # first request byte (first response byte when the request is unknown)
    request_end_ns: int | None
    response_start_ns: int | None  # first byte of the first response head, 1xx included
    end_ns: int  # last response byte (or the close / last request byte without a response)
    error: str | None = None
    partial: bool = False  # emitted before the response completed (body or time limit)
    incomplete: bool = False  # a capture gap touched it, or it could not be paired because of one
    upgraded: bool = False  # 101 Switching Protocols, or a CONNECT tunnel
    informational: tuple[int, ...] = ()  # 1xx statuses seen before the final response
    shed: bool = False  # bytes of it were left out on purpose while the agent was behind
    request_bytes: int = 0  # head + body framing bytes as captured
    response_bytes: int = 0  # 1xx heads included

    def __init__(
        self,
        request: HttpRequest | None, response: HttpResponse | None, start_ns: int,
        request_end_ns: int | None, response_start_ns: int | None, end_ns: int, error: str | None = None,
        partial: bool = False, incomplete: bool = False, upgraded: bool = False,
        informational: tuple[int, ...] = (), shed: bool = False, request_bytes: int = 0,
        response_bytes: int = 0,
    ) -> None:
        self.request = request
        self.response = response
        self.start_ns = start_ns
        self.request_end_ns = request_end_ns
        self.response_start_ns = response_start_ns
        self.end_ns = end_ns
        self.error = error
        self.partial = partial
        self.incomplete = incomplete
        self.upgraded = upgraded
        self.informational = informational
        self.shed = shed
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


def combined_headers_py(headers: Sequence[tuple[str, str]], by_lower: dict | None = None) -> dict[str, str | list[str]]:
    """Combine repeated fields as RFC 9110 §5.3 allows: comma-joined in order.

    Names match case-insensitively and keep the case they were first sent in
    (what a user sees in DevTools). ``Set-Cookie`` is the exception the RFC
    names (§5.3, RFC 6265 §3): its values may contain commas, so repeats stay a
    list.  Repeated ``Cookie`` fields are joined with "; ", the separator of
    its pairs (RFC 6265 §4.2.1), as HTTP/2's cookie crumbs are (RFC 9113 §8.2.3).

    ``by_lower``, when given, is filled with lower-case name → combined value
    (the same objects), so callers look fields up without another pass.
    """
    combined: dict[str, str | list[str]] = {}
    first_case: dict[str, str] = {}
    for name, value in headers:
        low = name.lower()
        key = first_case.setdefault(low, name)
        seen = combined.get(key)
        if seen is None:
            combined[key] = value
        elif low == "set-cookie":
            combined[key] = [*seen, value] if isinstance(seen, list) else [seen, value]
        elif low == "cookie":
            combined[key] = f"{seen}; {value}"
        else:
            combined[key] = f"{seen}, {value}"
    if by_lower is not None:
        for low, key in first_case.items():
            by_lower[low] = combined[key]
    return combined


# The same in C for the usual input (str pairs, ASCII names); anything else
# is handed back to combined_headers_py.  Built by ``make setup``.
try:
    from qtap_devtools.assemble import _headparse  # type: ignore[attr-defined]
except ImportError:
    _headparse = None
else:
    _headparse.configure_combine(combined_headers_py)
combined_headers: Final[Callable[..., dict[str, str | list[str]]]] = (  # typed: see http1_parse.head_end
    combined_headers_py if _headparse is None else _headparse.combined_headers)
