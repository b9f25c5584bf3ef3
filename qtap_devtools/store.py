"""What the REST API answers from: the state the event stream implies.

The store listens to every published envelope and keeps live processes, open and
recently closed connections, and recent transactions, each bounded with a count
of what it evicted.  Because it reads only envelopes, a replayed capture file
fills it exactly as live capture does (a transaction the agent made is read
from its values, one from a file from its parsed body: a test holds the two
to the same result).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Final, Iterable

from qtap_devtools import events as ev
from qtap_devtools.events import Envelope

# Distinct event types counted by name (the agent has a handful); past it, as "other".
MAX_EVENT_TYPES: Final = 64
# Nesting of /process-tree: orjson refuses past 255 levels, and a tree that
# deep is a loop of parents or a crafted file, not a process tree.
MAX_TREE_DEPTH: Final = 64
OTHER_TYPES: Final = "other"

if TYPE_CHECKING:
    from qtap_devtools.broadcast import Published


class BoundedDict:
    """Insertion-ordered map that evicts its oldest entry beyond ``limit``
    entries or, when ``max_bytes`` is given, beyond that many bytes of summed
    :meth:`_size`.

    Holds an OrderedDict rather than being one: mypyc compiles this module,
    and a compiled class cannot extend OrderedDict."""

    def __init__(self, limit: int, max_bytes: int = 0) -> None:
        self.entries: OrderedDict = OrderedDict()
        self.limit = limit
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.evicted = 0

    def _size(self, value: Any) -> int:
        """An entry's bytes, for ``max_bytes`` (a native method: a size
        callable cost two generic calls per transaction)."""
        return 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Any, default: Any = None) -> Any:
        return self.entries.get(key, default)

    def values(self) -> Any:
        return self.entries.values()

    def items(self) -> Any:
        return self.entries.items()

    def put(self, key: Any, value: Any) -> None:
        entries, sized = self.entries, self.max_bytes > 0
        if key in entries:
            if sized:
                self.used_bytes -= self._size(entries[key])
            entries.move_to_end(key)
        if sized:
            self.used_bytes += self._size(value)
        entries[key] = value
        if len(entries) > self.limit or (sized and self.used_bytes > self.max_bytes):
            self._evict()

    def _evict(self) -> None:
        entries, sized = self.entries, self.max_bytes > 0
        while len(entries) > self.limit or (sized and len(entries) > 1 and self.used_bytes > self.max_bytes):
            _, gone = entries.popitem(last=False)
            if sized:
                self.used_bytes -= self._size(gone)
            self.evicted += 1

    def pop(self, key: Any, default: Any = None) -> Any:
        entries = self.entries
        if key not in entries:
            return default
        value = entries.pop(key)
        if self.max_bytes > 0:
            self.used_bytes -= self._size(value)
        return value


class _Frames(BoundedDict):
    """Envelopes, sized by their frames."""

    def _size(self, value: Any) -> int:
        env: Envelope = value  # checked once, then read natively
        return len(env.frame)


class Store:
    def __init__(
        self,
        *,
        transactions: int = 10_000,
        transaction_bytes: int = 128 << 20,
        processes: int = 65_536,
        connections: int = 65_536,
        closed_connections: int = 4096,
        endpoints: int = 4096,  # a side
    ) -> None:
        # Bodies up to 1 MiB each: a count alone would let 10,000 of them
        # hold gigabytes.  A published transaction keeps only its frame.
        self.transactions: BoundedDict = _Frames(transactions, transaction_bytes)
        self.processes: BoundedDict = BoundedDict(processes)
        self.open_connections: BoundedDict = BoundedDict(connections)
        self.closed_connections: BoundedDict = BoundedDict(closed_connections)
        # An index a side (endpoints each): a request both of whose ends run
        # here alternates them, and each side's last endpoint stays its most
        # recently used.
        self.client_endpoints: BoundedDict = BoundedDict(endpoints)
        self.server_endpoints: BoundedDict = BoundedDict(endpoints)
        self._last_client: _Endpoint | None = None  # the one each side's last transaction counted in
        self._last_server: _Endpoint | None = None
        # Plain dicts, not Counters: Counter defines __delitem__ in Python, which
        # sends every item set through a slot wrapper (~900 instructions).
        self.by_type: dict[str, int] = {}
        self.process_events: dict[int, int] = {}
        self.process_counts_dropped = 0  # request counts of live processes let go (the bound)

    def _prune_process_counts(self) -> None:
        """Let go the counts of pids whose stop we never saw, then, if most are
        of processes still known (a replayed file can make it so), the oldest:
        down to three quarters of the limit, so this scan comes rarely."""
        counts, keep = self.process_events, self.processes.limit * 3 // 4
        for gone in [p for p in counts if self.processes.get(p) is None]:
            del counts[gone]
        for oldest in list(counts)[: max(0, len(counts) - keep)]:
            del counts[oldest]
            self.process_counts_dropped += 1

    def on_published(self, item: "Published") -> None:
        self.on_event(item.envelope)

    def on_event(self, env: Envelope) -> None:
        t = env.type
        by_type = self.by_type
        if t not in by_type and len(by_type) >= MAX_EVENT_TYPES:  # a replayed file can name any number
            t_counted = OTHER_TYPES
        else:
            t_counted = t
        by_type[t_counted] = by_type.get(t_counted, 0) + 1
        if t == ev.HTTP_TRANSACTION:  # nearly every event: first
            v = env.values
            if v is not None:  # made here: its values, read without building its body
                us = v[ev.EV_DURATION_US]
                self._add_transaction(env, v[ev.EV_REQUEST_ID], v[ev.EV_PID], v[ev.EV_HOST] or v[ev.EV_ENDPOINT],
                                      v[ev.EV_METHOD], v[ev.EV_PATH], v[ev.EV_STATUS], us / 1000,
                                      v[ev.EV_DIRECTION] == "ingress")
                return
            d = env.inner
            s = d.get("summary")
            if type(s) is not dict:  # a capture file's: anything
                s = {}
            us = s.get("duration_us")
            self._add_transaction(env, d.get("requestId"), s.get("process_pid"),
                                  s.get("request_host") or d.get("endpointId"), s.get("request_method"),
                                  s.get("request_path"), s.get("response_status"),
                                  us / 1000 if type(us) is int else s.get("duration_ms") or 0,
                                  s.get("direction") == "ingress")
        elif t == ev.PROCESS_STARTED:
            d = env.body.get("data") or {}
            pid = d.get("pid")
            if isinstance(pid, int):
                if self.processes.get(pid) != d:  # a new process (a reused pid): its own count
                    self.process_events.pop(pid, None)
                self.processes.put(pid, d)
        elif t == ev.PROCESS_STOPPED:
            d = env.body.get("data") or {}
            pid = d.get("pid")
            self.processes.pop(pid, None)
            if isinstance(pid, int):
                self.process_events.pop(pid, None)
        elif t.startswith("connection."):
            d = env.inner
            cid = (d.get("meta") or {}).get("connectionId")
            if not cid:
                return
            if t == ev.CONNECTION_CLOSED:
                self.open_connections.pop(cid, None)
                self.closed_connections.put(cid, d)
            else:
                self.open_connections.put(cid, d)

    def _add_transaction(self, env: Envelope, rid: Any, pid: Any, host: Any, method: Any, path: Any, status: Any,
                         ms: Any, server: bool) -> None:
        """Keep a transaction and count it (its process's, its endpoint's); the
        facts are its summary's, any of them anything when a capture file's.
        ``server``: seen on the side that accepted the connection (ingress).  An
        endpoint is counted per side: a request both of whose ends run here is
        one request on each side, not two of one endpoint."""
        if not rid or rid in self.transactions.entries:  # (a capture file may hold one twice: counted once)
            return
        self.transactions.put(rid, env)
        if isinstance(pid, int):
            counts = self.process_events
            counts[pid] = counts.get(pid, 0) + 1
            if len(counts) > self.processes.limit:
                self._prune_process_counts()
        host, route = host or "?", _route(path or "/")
        entry = self._last_server if server else self._last_client
        # The side's last endpoint is its index's most recently used (it was
        # moved last), and traffic comes in runs to one endpoint: then no key is
        # built, hashed, looked up and moved (~1,700 instructions).
        if entry is None or entry.path != route or entry.method != method or entry.host != host:
            key = (host, method, route)
            endpoints = self.server_endpoints if server else self.client_endpoints
            entry = endpoints.get(key)
            if entry is None:
                entry = _Endpoint(key, server)
                endpoints.put(key, entry)
            else:
                endpoints.entries.move_to_end(key)  # the most recently used is evicted last
            if server:
                self._last_server = entry
            else:
                self._last_client = entry
        entry.add(status, ms)

    # ---- queries

    def recent_transactions(self) -> list[Envelope]:
        """Oldest first."""
        return list(self.transactions.values())

    def process_list(self) -> list[dict]:
        out = []
        for pid, d in self.processes.items():
            out.append({**d, "event_count": self.process_events.get(pid, 0)})
        return out

    def process_tree(self) -> list[dict]:
        """Processes nested under their parents.  A chain deeper than
        MAX_TREE_DEPTH goes on as a new root, and a loop of parents (pids
        reused, or a crafted capture file) is cut: the JSON stays finite and
        shallow enough to encode, whatever the parent links say."""
        procs: dict[int, dict] = dict(self.processes.items())
        kids: dict[int, list[int]] = {}
        tops: deque[int] = deque()
        for pid, d in procs.items():
            ppid = d.get("ppid")
            if ppid in procs and ppid != pid:
                kids.setdefault(ppid, []).append(pid)
            else:
                tops.append(pid)

        def node(pid: int) -> dict:
            d = procs[pid]
            out = {"pid": pid, "name": d.get("binary"), "path": d.get("path")}
            # Which container (and pod) a process runs in, in brief: the
            # tree's point is where each process sits (/processes has the rest).
            c = d.get("container")
            if isinstance(c, dict):
                out["container"] = {k: c.get(k) for k in ("id", "name", "image")}
            pod = d.get("pod")
            if isinstance(pod, dict):
                out["pod"] = {k: pod.get(k) for k in ("name", "namespace")}
            out["children"] = []
            return out

        roots: list[dict] = []
        placed: set[int] = set()
        while len(placed) < len(procs):
            if not tops:  # only loops are left: no parentless process leads to them
                tops.append(next(pid for pid in procs if pid not in placed))
            top = tops.popleft()
            if top in placed:
                continue
            root = node(top)
            placed.add(top)
            roots.append(root)
            stack = [(root, top, 1)]
            while stack:
                parent, pid, depth = stack.pop()
                for child in kids.get(pid, ()):
                    if child in placed:
                        continue
                    if depth >= MAX_TREE_DEPTH:
                        tops.append(child)
                        continue
                    n = node(child)
                    placed.add(child)
                    parent["children"].append(n)
                    stack.append((n, child, depth + 1))
        return roots

    def connection_list(self, state: str = "all") -> list[dict]:
        out: list[dict] = []
        if state in ("all", "open"):
            out += [{**d, "state": "open"} for d in self.open_connections.values()]
        if state in ("all", "closed"):
            out += [{**d, "state": "closed"} for d in self.closed_connections.values()]
        return out

    def endpoint_list(self, side: str | None = None) -> list[dict]:
        """Busiest first; ``side``: "client" or "server" alone."""
        sides = [self.client_endpoints] if side == "client" else [self.server_endpoints] if side == "server" \
            else [self.client_endpoints, self.server_endpoints]
        out = [e.json() for endpoints in sides for e in endpoints.values()]
        out.sort(key=lambda e: -e["count"])
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "events": {"total": sum(self.by_type.values()), "by_type": dict(self.by_type)},
            "processes": len(self.processes),
            "connections": {"open": len(self.open_connections), "closed_kept": len(self.closed_connections)},
            "transactions_kept": len(self.transactions),
            "transaction_bytes_kept": self.transactions.used_bytes,
            "evicted": {
                "transactions": self.transactions.evicted,
                "processes": self.processes.evicted,
                "connections": self.open_connections.evicted,
                "endpoints": self.client_endpoints.evicted + self.server_endpoints.evicted,
                "process_request_counts": self.process_counts_dropped,
                "route_memo": _routes_cleared[0],  # path -> route, remembered to save time only
            },
        }

    def snapshot_processes(self) -> Iterable[Envelope]:
        for d in list(self.processes.values()):
            yield Envelope.of(ev.PROCESS_STARTED, d, ev.now_ns())


class _Endpoint:
    """One (host, method, route)'s counts: a class, not a dict, because every
    transaction updates one (statuses are counted by number, named at read)."""

    def __init__(self, key: tuple, server: bool) -> None:
        self.host, self.method, self.path = key
        self.server = server
        self.count = 0
        self.errors = 0
        self.statuses: dict[Any, int] = {}
        self.total_ms: Any = 0  # int or float, as the summaries give them
        self.max_ms: Any = 0

    def add(self, status: Any, ms: Any) -> None:
        if type(ms) is not int and type(ms) is not float:  # a capture file's: anything
            ms = 0
        self.count += 1
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        if not isinstance(status, int) or status >= 400:
            self.errors += 1
        self.total_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def json(self) -> dict:
        return {
            "side": "server" if self.server else "client",
            "host": self.host, "method": self.method, "path": self.path, "count": self.count,
            "errors": self.errors, "max_ms": round(self.max_ms, 3),
            "statuses": self._named_statuses(),
            "avg_ms": round(self.total_ms / self.count, 3) if self.count else 0,
        }

    def _named_statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for status, n in self.statuses.items():  # 200 and "200" (a capture file's) are one
            name = str(status)
            out[name] = out.get(name, 0) + n
        return out


_ROUTES: Final[dict[str, str]] = {}  # path -> route: most traffic repeats a few paths
_ROUTES_MAX: Final = 4096
_routes_cleared: Final = [0]  # paths let go by the clear below (each costs one more _route_of)


def _route(path: str) -> str:
    """Collapse IDs in a path so /users/42 and /users/43 index together."""
    route = _ROUTES.get(path)
    if route is None:
        if len(_ROUTES) >= _ROUTES_MAX:
            _routes_cleared[0] += len(_ROUTES)
            _ROUTES.clear()  # unique paths (ids in query strings): start over, stay bounded
        route = _ROUTES[path] = _route_of(path)
    return route


def _route_of(path: str) -> str:
    path = path.split("?", 1)[0]
    parts = []
    for seg in path.split("/"):
        if seg.isdigit() or (len(seg) >= 16 and all(c in "0123456789abcdefABCDEF-" for c in seg)):
            seg = "{id}"
        parts.append(seg)
    return "/".join(parts) or "/"
