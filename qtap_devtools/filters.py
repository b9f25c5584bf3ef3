"""Server-side event filters, parsed from query parameters.

``/devtools/api/events?type=request.http_transaction&status=4xx&exe=curl`` sends
only what matches, so a terminal user does not have to pipe through grep.
Query parameters are untrusted: a bad value is a :class:`FilterError` whose
message names the parameter and what it accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final, Mapping

from qtap_devtools.events import EVENT_TYPES, Envelope

_STATUS = re.compile(r"^(?:([1-5])xx|([1-5]\d\d)|(>=|<=|>|<)([1-5]\d\d))$")  # a status is 100-599
MAX_VALUES = 32
MAX_VALUE_LEN = 256
MAX_PID: Final = (1 << 31) - 1  # pid_t


# The query parameters a filter reads (a route may take others besides).
FILTER_KEYS = ("type", "pid", "exe", "container", "host", "method", "status", "q", "side")
SIDES = ("client", "server")


class FilterError(ValueError):
    pass


def checked_side(side: str | None) -> str | None:
    """``side=``, any case, as "client" or "server" (None: not given)."""
    if side is None:
        return None
    if side.lower() not in SIDES:
        raise FilterError(f"side={side!r}: expected client or server")
    return side.lower()


@dataclass(frozen=True)
class EventFilter:
    types: tuple[str, ...] = ()
    pids: frozenset[int] = frozenset()
    exe: str | None = None
    container: str | None = None
    host: str | None = None
    methods: frozenset[str] = frozenset()
    status: tuple[str, ...] = ()
    text: str | None = None
    # Both ends of a request between two local processes are captured: the
    # client's side (it connected) or the server's (it accepted).
    side: str | None = None
    _status_preds: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def from_query(cls, params: Mapping[str, str] | Any) -> "EventFilter":
        def values(key: str) -> list[str]:
            raw = params.getlist(key) if hasattr(params, "getlist") else [params[key]] if key in params else []
            out = [v.strip() for item in raw for v in item.split(",") if v.strip()]
            if raw and not out:  # "?type=": a filter meant and mistyped, not every event
                raise FilterError(f"{key}= is empty: give a value, or leave {key} out")
            if len(out) > MAX_VALUES or any(len(v) > MAX_VALUE_LEN for v in out):
                raise FilterError(f"{key}: at most {MAX_VALUES} values of at most {MAX_VALUE_LEN} characters")
            return out

        types = values("type")
        for t in types:
            if not any(e == t or e.startswith(t + ".") or e.startswith(t) for e in EVENT_TYPES):
                raise FilterError(f"type={t!r} matches no event type; known: {', '.join(EVENT_TYPES)}")
        pid_values = values("pid")
        # A pid is a pid_t: ASCII digits only (int() also takes "+5", "1_0",
        # other scripts' digits) and within its range, which a JSON writer
        # that stops at 64 bits must never be handed more than.
        if not all(v.isascii() and v.isdigit() and 0 < int(v) <= MAX_PID for v in pid_values):
            raise FilterError(f"pid: expected process ids from 1 to {MAX_PID}, e.g. pid=1234 or pid=1234,5678")
        pids = frozenset(int(v) for v in pid_values)
        preds = []
        statuses = [s.lower() for s in values("status")]  # 4XX as 4xx
        for s in statuses:
            m = _STATUS.match(s)
            if not m:
                raise FilterError(f"status={s!r}: expected 404, 4xx, >=400 or <300")
            preds.append(_status_pred(m))

        def one(key: str) -> str | None:
            v = values(key)
            if len(v) > 1:
                raise FilterError(f"{key}: give one value")
            return v[0].lower() if v else None

        side = checked_side(one("side"))

        return cls(
            types=tuple(types),
            pids=pids,
            exe=one("exe"),
            container=one("container"),
            host=one("host"),
            methods=frozenset(v.upper() for v in values("method")),
            status=tuple(statuses),
            text=one("q"),
            side=side,
            _status_preds=tuple(preds),
        )

    @property
    def active(self) -> bool:
        return bool(
            self.types or self.pids or self.exe or self.container or self.host or self.methods or self.status
            or self.text or self.side
        )

    def describe(self) -> dict:
        out: dict[str, Any] = {}
        if self.types:
            out["type"] = list(self.types)
        if self.pids:
            out["pid"] = sorted(self.pids)
        for key in ("exe", "container", "host", "text", "side"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.methods:
            out["method"] = sorted(self.methods)
        if self.status:
            out["status"] = list(self.status)
        return out

    @property
    def reads_content(self) -> bool:
        """Whether :meth:`matches` reads what an event says, beyond its type."""
        return bool(self.pids or self.exe or self.container or self.host or self.methods or self.status or self.text
                    or self.side)

    def matches(self, env: Envelope) -> bool:
        t = env.type
        if t.startswith("system."):
            return True
        if self.types and not any(t == x or t.startswith(x) for x in self.types):
            return False
        if not self.reads_content:
            return True
        facts = _facts(env)
        if self.side and facts.get("side") != self.side:  # process events have no side
            return False
        if self.pids and facts.get("pid") not in self.pids:
            return False
        if self.exe and self.exe not in (facts.get("exe") or "").lower():
            return False
        if self.container and not _container_matches(self.container, facts):
            return False
        if self.host and self.host not in (facts.get("host") or "").lower():
            return False
        if self.methods or self._status_preds:
            if t != "request.http_transaction":
                return False
            if self.methods and facts.get("method") not in self.methods:
                return False
            status = facts.get("status")
            if self._status_preds and not (isinstance(status, int) and any(p(status) for p in self._status_preds)):
                return False
        if self.text and self.text not in " ".join(str(v) for k, v in facts.items()
                                                  if v and k != "side" and k != "_container").lower():
            return False
        return True


def _status_pred(m: re.Match):
    klass, exact, op, num = m.groups()
    if klass:
        lo = int(klass) * 100
        return lambda s: lo <= s < lo + 100
    if exact:
        n = int(exact)
        return lambda s: s == n
    n = int(num)
    return {
        ">=": lambda s: s >= n,
        "<=": lambda s: s <= n,
        ">": lambda s: s > n,
        "<": lambda s: s < n,
    }[op]


def _facts(env: Envelope) -> dict[str, Any]:
    """The few fields filters look at, from any event type's JSON."""
    t = env.type
    if t.startswith("process."):
        d = env.body.get("data") or {}
        c = d.get("container") or {}
        return {"pid": d.get("pid"), "exe": d.get("path") or d.get("binary"), "container": _cname(c),
                "_container": c}
    d = env.inner
    if t == "request.http_transaction":
        s = d.get("summary") or {}
        return {
            "pid": s.get("process_pid"),
            "exe": s.get("process_exe"),
            "container": _cname({"name": s.get("container_name"), "id": s.get("container_id")}),
            "_container": {"name": s.get("container_name"), "id": s.get("container_id")},
            "host": s.get("request_host") or d.get("endpointId"),
            "method": s.get("request_method"),
            "status": s.get("response_status"),
            "url": s.get("request_url"),
            "side": "server" if s.get("direction") == "ingress" else "client",
        }
    if t.startswith("connection."):
        local = d.get("destination") if d.get("direction") == "ingress" else d.get("source")
        local = local or {}
        return {
            "pid": d.get("pid") or local.get("pid"),
            "exe": local.get("exe"),
            "container": _cname(local.get("container") or {}),
            "_container": local.get("container") or {},
            "host": (d.get("meta") or {}).get("endpointId"),
            "side": "server" if d.get("direction") == "ingress" else "client",
        }
    return {}


def _cname(c: Mapping[str, Any]) -> str:
    return " ".join(str(c.get(k) or "") for k in ("name", "id"))


def _container_matches(want: str, facts: Mapping[str, Any]) -> bool:
    """Part of the container's name, or its id as docker takes one: a prefix
    of the full id (12 characters, 64, or any length between).  Not a part of
    "name id" joined, which matched across the two ("c 9355") and never the
    full id (a transaction's summary has only the short one)."""
    c = facts.get("_container")
    if not isinstance(c, Mapping):
        return False
    name, short, full = (str(c.get(k) or "").lower() for k in ("name", "id", "fullId"))
    if want in name:
        return True
    if full:
        return full.startswith(want)
    return bool(short) and (short.startswith(want) or (len(want) > len(short) and want.startswith(short)))
