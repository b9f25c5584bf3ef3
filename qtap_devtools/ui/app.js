// qtap DevTools: a Network panel for every process on the machine.
//
// Events arrive over SSE (/devtools/api/events).  A transaction's summary has
// all the table needs; its base64 JSON is decoded only when the row is opened
// or exported.  Rows are kept oldest first, capped, and drawn by a virtual
// table.  Reconnects resume after the last event id, and rows are deduplicated
// by requestId, so nothing shown is lost or doubled across a reconnect.

import { h, clear, formatBytes, formatMs, formatClock, formatDateTime, basename, mimeOf, statusClass, addressText, copyText, toast } from "./dom.js";
import { VirtualTable } from "./vtable.js";
import { DetailPane } from "./detail.js";
import { curlCommand, harDocument, transactionOf, base64Bytes, textOf } from "./export.js";

const API = "/devtools/api";
const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");
const ROW_CAP = clampInt(params.get("cap"), 10000, 10, 1000000);
// Rows hold their transaction (bodies base64 twice): with megabyte bodies a
// count alone would hold gigabytes, so the rows and the paused buffer are also
// bounded in MB (?capmb=), the oldest let go first.
const BYTES_CAP = clampInt(params.get("capmb"), 256, 1, 4096) * 1048576;
const OTHER_CAP = 5000; // processes and connections kept for their views
const PAUSE_BUFFER_CAP = ROW_CAP * 2;

function clampInt(text, dflt, lo, hi) {
  const n = Number.parseInt(text ?? "", 10);
  return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : dflt;
}

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

// ------------------------------------------------------------------ state

const state = {
  rows: [], // every transaction kept, oldest first, at most ROW_CAP and BYTES_CAP of their data
  rowBytes: 0,
  badEvents: 0, // events the page could not read (a damaged capture file's), skipped
  rowsLetGo: 0, // oldest rows let go for the caps (not lost by the agent: see system.dropped)
  byId: new Map(), // requestId -> row
  shown: [], // rows passing the filter, oldest first
  filter: { terms: [], status: new Set(), methods: new Set(), errorsOnly: false },
  paused: false,
  pausedEvents: [],
  pausedBytes: 0,
  pausedDiscarded: 0,
  processes: new Map(), // key -> process entry
  connections: new Map(), // connectionId -> connection entry
  view: "network",
  agent: null,
  eventTimes: [],
  dropped: 0,
  range: { min: 0, max: 0 },
};

// ------------------------------------------------------------------ rows

// What an event holds, near enough: its transaction text and a little more.
function dataBytes(body) {
  const d = body && body.data && body.data.data;
  return 512 + (d && typeof d.data === "string" ? d.data.length : 0);
}

// A summary's text field as text: a capture file is untrusted, and a number
// where a method or a path belongs must not stop its row (a string's methods
// are called on these).
function asText(value) {
  return value == null ? "" : String(value);
}

function rowFromEvent(body) {
  const d = (body.data && body.data.data) || {};
  const s = d.summary || {};
  const tsMs = Date.parse(body.ts) || Date.now();
  const row = {
    id: d.requestId || `${body.ts}-${Math.random()}`,
    data: d.data,
    bytes: dataBytes(body),
    ts: body.ts,
    tsMs,
    method: asText(s.request_method).toUpperCase(),
    host: s.request_host || d.endpointId || "",
    scheme: s.request_scheme || "",
    path: s.request_path,
    url: s.request_url,
    // Chrome's spelling in its Protocol column (h2, http/1.1).
    protocol: s.request_http_version === "HTTP/2" ? "h2" : asText(s.request_http_version).toLowerCase(),
    status: s.response_status || 0,
    ctype: asText(s.response_content_type),
    size: s.response_body_size,
    reqSize: s.request_body_size,
    // duration_us where the agent sends it: duration_ms is whole milliseconds.
    duration: s.duration_us != null ? Number(s.duration_us) / 1000 : Number(s.duration_ms ?? 0),
    pid: s.process_pid,
    exe: asText(s.process_exe),
    container: s.container_name || "",
    pod: s.pod_name || "",
    error: s.error || "",
    direction: s.direction || "",
    connectionId: d.connectionId || "",
    endpoint: d.endpointId || "",
  };
  if (row.path == null || row.url == null || row.pid == null) {
    // An event from an agent whose summary lacks our additions: the full
    // transaction has them, so this (rare) row is decoded up front.
    const tx = transactionOf(row) || {};
    const req = tx.request || {};
    const meta = tx.metadata || {};
    row.path = row.path ?? req.path ?? "";
    row.url = row.url ?? req.url ?? `${row.scheme || "http"}://${row.host}${row.path}`;
    row.pid = row.pid ?? (meta.process_id ? Number(meta.process_id) : null);
    if (row.size == null && tx.response) {
      try {
        row.size = tx.response.body_size ?? base64Bytes(tx.response.body).length;
      } catch {
        row.size = null; // a body that is not base64 (a damaged file's): the row without its size
      }
    }
  }
  row.mime = mimeOf(row.ctype);
  row.start = tsMs - row.duration;
  row.isError = Boolean(row.error) || !row.status || row.status >= 400;
  row.proc = row.exe ? `${basename(row.exe)}${row.pid != null ? ` · ${row.pid}` : ""}` : row.pid != null ? `pid ${row.pid}` : "";
  row.hay = [row.url, row.host, row.exe, row.pid, row.container, row.pod].join("\n").toLowerCase();
  return row;
}

// ------------------------------------------------------------------ filters

// Free text: words must all match (URL, host, process, container).  `-word`
// excludes; `method:`, `status:`, `host:`, `pid:`, `container:`, `process:`,
// `side:` (client or server), `conn:` (a connection's id) match one field,
// like Chrome's filter box.
// `status:` takes what the API's status= takes (404, 4xx, >=400, <300) and,
// as `method:`, `pid:`, `side:` and `direction:`, a list: status:4xx,5xx.
function parseTerms(text) {
  const terms = [];
  for (const raw of text.trim().toLowerCase().split(/\s+/)) {
    if (!raw) continue;
    const negate = raw.startsWith("-") && raw.length > 1;
    const word = negate ? raw.slice(1) : raw;
    const m = /^(method|status|host|pid|container|process|path|type|pod|side|direction|conn):(.*)$/.exec(word);
    // `status:` with no value yet is being typed: it filters nothing (as a
    // word it matched no row, and the table went blank at each keystroke).
    if (m && !m[2]) continue;
    terms.push(m ? { negate, field: m[1], value: m[2] } : { negate, field: null, value: word });
  }
  return terms;
}

// What a field's value must look like (as the API's filters check theirs):
// status:abc matched nothing and said nothing.
const FIELD_VALUES = {
  status: [/^(\d{3}|\dx{1,2}|(>=|<=|>|<)\d{1,3})$/, "404, 4xx, >=400 or <300"],
  pid: [/^\d+$/, "a process id, e.g. pid:1234"],
  side: [/^(client|server)$/, "client or server"],
  direction: [/^(ingress|egress|egress-internal|egress-external)$/, "ingress, egress-internal or egress-external"],
  method: [/^[a-z]+$/, "a method, e.g. get or post"],
};

function termProblem(t) {
  const rule = FIELD_VALUES[t.field];
  if (!rule) return null;
  const bad = t.value.split(",").filter((v) => v && !rule[0].test(v));
  return bad.length ? `${t.field}:${bad[0]} — expected ${rule[1]}` : null;
}

function fieldText(row, field) {
  switch (field) {
    case "method": return row.method.toLowerCase();
    case "status": return String(row.status || "");
    case "host": return row.host.toLowerCase();
    case "pid": return String(row.pid ?? "");
    case "container": return row.container.toLowerCase();
    case "pod": return row.pod.toLowerCase();
    case "process": return row.exe.toLowerCase();
    case "path": return (row.path || "").toLowerCase();
    case "type": return row.mime;
    // Both ends of a loopback request are captured: side:client or side:server keeps one.
    case "side": return row.direction === "ingress" ? "server" : "client";
    case "direction": return row.direction;
    case "conn": return row.connectionId;
    default: return row.hay;
  }
}

const COMMON_METHODS = new Set(["GET", "POST", "PUT", "PATCH", "DELETE"]);
const LISTS = new Set(["status", "pid", "method", "side", "direction"]);

function oneOf(field, text, value) {
  if (field === "method" || field === "side" || field === "direction") return text.includes(value);
  // status:404 is exact; status:4xx (or 4x) is a class; >=400, <300 compare.
  const cmp = field === "status" && /^(>=|<=|>|<)(\d+)$/.exec(value);
  if (cmp) {
    if (!text) return false; // no response: no status to compare
    const a = Number(text), b = Number(cmp[2]);
    return { ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b }[cmp[1]];
  }
  return /x$/.test(value) ? text.startsWith(value.replace(/x+$/, "")) : text === value;
}

function matches(row) {
  const f = state.filter;
  if (f.errorsOnly && !row.isError) return false;
  if (f.status.size && !f.status.has(String(Math.floor((row.status || 0) / 100)))) return false;
  if (f.methods.size) {
    const m = COMMON_METHODS.has(row.method) ? row.method : "OTHER";
    if (!f.methods.has(m)) return false;
  }
  for (const t of f.terms) {
    const text = fieldText(row, t.field);
    let hit;
    if (LISTS.has(t.field)) {
      hit = t.value.split(",").some((v) => v && oneOf(t.field, text, v));
    } else {
      hit = text.includes(t.value);
    }
    if (hit === t.negate) return false;
  }
  return true;
}

function textMatches(values) {
  const terms = state.filter.terms;
  if (!terms.length) return true;
  const hay = values.join("\n").toLowerCase();
  return terms.every((t) => hay.includes(t.value) !== t.negate);
}

// ------------------------------------------------------------------ network table

const WATERFALL_COL = {
  key: "waterfall", label: "Waterfall", width: 200, min: 120, flex: true, cls: "c-waterfall", sort: (r) => r.start,
  render(row, cell) {
    const { min, max } = state.range;
    const span = Math.max(max - min, 1);
    const bar = h("span", { class: `wf-bar ${statusClass(row.status)}` });
    bar.style.left = `${((row.start - min) / span) * 100}%`;
    bar.style.width = `${Math.max((row.duration / span) * 100, 0.6)}%`;
    cell.append(h("span", { class: "wf-track" }, bar));
    cell.title = `Started ${formatClock(row.start)}, took ${formatMs(row.duration)}`;
  },
};

const statusCol = {
  key: "status", label: "Status", width: 64, cls: "c-status", sort: (r) => r.status || null,
  render(row, cell) {
    const text = row.status ? String(row.status) : row.error ? "(failed)" : "(pending)";
    cell.append(h("span", { class: `st ${statusClass(row.status)}` }, text));
    cell.title = row.error || text;
  },
};

const FULL_COLUMNS = [
  { key: "time", label: "Time", width: 104, cls: "c-time mono", value: (r) => formatClock(r.start), sort: (r) => r.start },
  { key: "method", label: "Method", width: 74, cls: "c-method", value: (r) => r.method },
  statusCol,
  { key: "host", label: "Host", width: 156, min: 96, flex: true, value: (r) => r.host },
  { key: "path", label: "Path", width: 220, min: 140, flex: true, cls: "c-path", value: (r) => r.path },
  { key: "type", label: "Type", width: 120, min: 80, flex: true, value: (r) => r.mime },
  { key: "size", label: "Size", width: 72, cls: "num", value: (r) => formatBytes(r.size), sort: (r) => r.size },
  { key: "duration", label: "Duration", width: 76, cls: "num", value: (r) => formatMs(r.duration), sort: (r) => r.duration },
  { key: "process", label: "Process", width: 160, min: 96, flex: true, value: (r) => r.proc },
  { key: "container", label: "Container", width: 120, min: 80, flex: true, value: (r) => r.container || r.pod },
  { key: "protocol", label: "Protocol", width: 68, value: (r) => r.protocol },
  WATERFALL_COL,
];

const COMPACT_COLUMNS = [
  { key: "method", label: "Method", width: 72, cls: "c-method", value: (r) => r.method },
  statusCol,
  { key: "host", label: "Host", width: 140, value: (r) => r.host },
  { key: "path", label: "Path", width: 160, flex: true, cls: "c-path", value: (r) => r.path },
  { key: "duration", label: "Duration", width: 72, cls: "num", value: (r) => formatMs(r.duration), sort: (r) => r.duration },
];

function makeRequestTable(columns) {
  return new VirtualTable({
    columns,
    testid: "requests-table",
    rowTestid: "request-row",
    rowKey: (r) => r.id,
    rowClass: (r) => (r.isError ? "err" : ""),
    onSelect: (r) => { if (detailOpen()) openDetail(r, false); },
    onOpen: (r) => openDetail(r, true),
    onClose: () => closeDetail(),
    onContextMenu: (r, e) => showMenu(r, e),
    emptyText: () => (state.rows.length ? "No requests match the filter." : state.paused ? "Recording is paused." : "Recording network activity… Traffic from every process on this machine appears here."),
  });
}

const wrap = $("requests-wrap");
let table = makeRequestTable(FULL_COLUMNS);
wrap.append(table.el);

function setTableColumns(columns) {
  const scrollTop = table.el.scrollTop;
  const selected = table.selected;
  const hadFocus = document.activeElement === table.el;
  const next = makeRequestTable(columns);
  table.el.replaceWith(next.el);
  next.setSort(table.sortKey, table.sortDir); // a column the other set lacks: unsorted
  table = next;
  table.selected = selected;
  table.setRows(state.shown);
  table.el.scrollTop = scrollTop;
  if (selected) table.reveal(table.indexOf(selected));
  if (hadFocus) table.el.focus();
}

// ------------------------------------------------------------------ detail pane

const detailEl = $("detail");
const splitter = $("splitter");
const detail = new DetailPane(detailEl, {
  onClose: () => closeDetail(),
  onCopyCurl: (r) => r && copyText(curlCommand(r), "as cURL"),
  onCopyResponse: (r) => r && copyResponse(r),
  connectionOf: (id) => { const c = state.connections.get(id); return c && c.json; },
});

function detailOpen() {
  return !detailEl.hidden;
}

function openDetail(row, focusTable) {
  if (!detailOpen()) {
    detailEl.hidden = false;
    splitter.hidden = false;
    setTableColumns(COMPACT_COLUMNS);
  }
  table.selected = row;
  table.schedule();
  detail.open(row);
  if (focusTable) table.el.focus();
}

function closeDetail() {
  if (!detailOpen()) return;
  detailEl.hidden = true;
  splitter.hidden = true;
  setTableColumns(FULL_COLUMNS);
  table.el.focus();
}

splitter.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  const section = splitter.parentElement;
  const move = (ev) => {
    const rect = section.getBoundingClientRect();
    const width = Math.min(rect.width - 240, Math.max(320, rect.right - ev.clientX));
    section.style.setProperty("--detail-width", `${width}px`);
  };
  const up = () => {
    window.removeEventListener("pointermove", move);
    window.removeEventListener("pointerup", up);
  };
  window.addEventListener("pointermove", move);
  window.addEventListener("pointerup", up);
});

function copyResponse(row) {
  const tx = transactionOf(row);
  const resp = tx && tx.response;
  if (!resp || !resp.body) {
    toast("This response has no body to copy");
    return;
  }
  const bytes = base64Bytes(resp.body);
  const text = textOf(bytes);
  copyText(text === null ? resp.body : text, text === null ? "response (base64)" : "response");
}

// ------------------------------------------------------------------ context menu

const menu = $("context-menu");

function showMenu(row, e) {
  clear(menu);
  const item = (label, testid, fn) => h("button", { class: "menu-item", role: "menuitem", testid, onclick: () => { hideMenu(); fn(); } }, label);
  menu.append(
    item("Open", "menu-open", () => openDetail(row, true)),
    h("hr"),
    item("Copy URL", "menu-copy-url", () => copyText(row.url, "URL")),
    item("Copy as cURL", "menu-copy-curl", () => copyText(curlCommand(row), "as cURL")),
    item("Copy response", "menu-copy-response", () => copyResponse(row)),
    item("Copy request ID", "menu-copy-id", () => copyText(row.id, "request ID")),
    h("hr"),
    item(`Filter host: ${row.host}`, "menu-filter-host", () => setFilterText(`host:${row.host}`)),
    row.pid != null ? item(`Filter process: ${row.proc}`, "menu-filter-pid", () => setFilterText(`pid:${row.pid}`)) : null,
    row.connectionId ? item("Filter connection", "menu-filter-conn", () => setFilterText(`conn:${row.connectionId}`)) : null,
  );
  menu.hidden = false;
  const { innerWidth, innerHeight } = window;
  const rect = menu.getBoundingClientRect();
  menu.style.left = `${Math.min(e.clientX, innerWidth - rect.width - 4)}px`;
  menu.style.top = `${Math.min(e.clientY, innerHeight - rect.height - 4)}px`;
  menu.querySelector("button").focus();
}

function hideMenu() {
  menu.hidden = true;
}

window.addEventListener("pointerdown", (e) => { if (!menu.hidden && !menu.contains(e.target)) hideMenu(); });
window.addEventListener("keydown", (e) => { if (e.key === "Escape" && !menu.hidden) { hideMenu(); e.stopPropagation(); } }, true);
window.addEventListener("blur", hideMenu);

// ------------------------------------------------------------------ processes view

const processTable = new VirtualTable({
  testid: "processes-table",
  rowTestid: "process-row",
  rowKey: (p) => p.key,
  rowClass: (p) => (p.stopped ? "stopped" : ""),
  onOpen: (p) => { setFilterText(`pid:${p.pid}`); switchView("network"); },
  emptyText: () => (state.processes.size ? "No processes match the filter." : "No process events yet."),
  columns: [
    { key: "pid", label: "PID", width: 70, cls: "num mono", value: (p) => String(p.pid), sort: (p) => p.pid },
    { key: "state", label: "State", width: 96, sort: (p) => (p.stopped ? 1 : 0), render: (p, cell) => {
      cell.append(h("span", { class: `pill ${p.stopped ? "closed" : "open"}`, title: p.unseenExit ? "not running when the agent came back: it ended while the agent was down" : null },
        p.stopped ? `exited${p.exitCode != null ? ` (${p.exitCode})` : ""}` : "running"));
    } },
    { key: "binary", label: "Binary", width: 130, value: (p) => p.binary },
    { key: "path", label: "Command", width: 260, flex: true, cls: "mono", value: (p) => p.cmdline || p.path },
    { key: "user", label: "User", width: 90, value: (p) => p.user },
    { key: "container", label: "Container", width: 140, value: (p) => p.container },
    { key: "pod", label: "Pod", width: 140, value: (p) => p.pod },
    { key: "requests", label: "Requests", width: 80, cls: "num", value: (p) => String(p.requests || 0), sort: (p) => p.requests || 0 },
    { key: "started", label: "Started", width: 170, cls: "mono", value: (p) => formatDateTime(p.createdMs), sort: (p) => p.createdMs },
  ],
});
$("processes-view").append(processTable.el);
// pid -> the newest process with that pid: its requests are counted on it, so
// a process that reuses an old pid starts from none (bounded like the view).
const currentByPid = new Map();

function onProcess(type, body) {
  const d = body.data || {};
  const key = `${d.pid}@${d.createdAt || ""}`;
  let p = state.processes.get(key);
  if (!p) {
    p = { key, pid: d.pid };
    state.processes.set(key, p);
    trimMap(state.processes, OTHER_CAP);
  }
  Object.assign(p, {
    binary: d.binary || basename(d.path),
    path: d.path || "",
    cmdline: d.cmdline || "",
    user: d.user ? d.user.name ?? String(d.user.id ?? "") : "",
    container: d.container ? d.container.name || d.container.id || "" : "",
    pod: d.pod ? `${d.pod.namespace ? `${d.pod.namespace}/` : ""}${d.pod.name}` : "",
    createdMs: Date.parse(d.createdAt) || 0,
    stopped: type === "process.stopped",
    exitCode: d.exitCode,
    unseenExit: false,
  });
  if (type === "process.started" || !currentByPid.has(d.pid)) {
    currentByPid.delete(d.pid); // re-inserted as the newest
    currentByPid.set(d.pid, p);
    trimMap(currentByPid, OTHER_CAP);
  }
  processTable.refresh(p);
  otherDirty = true;
  return p;
}

// After an agent restart, a process that ended while it was down never gets
// its process.stopped: it stayed "running" for good.  A new run greets, then
// sends process.started for every process it finds running (its snapshot)
// before anything else: one it does not name has ended.  Markers in the event
// queue keep this in the stream's order, paused or not.
const RECONCILE_START = "page.reconcile-start";
const RECONCILE_END = "page.reconcile-end";
let reconcileGen = 0;
let unconfirmed = null; // { gen, keys }: processes shown running that the new run has not named yet

function startReconcile(gen) {
  const keys = new Set();
  for (const p of state.processes.values()) if (!p.stopped) keys.add(p.key);
  unconfirmed = { gen, keys };
}

function endReconcile() {
  for (const key of unconfirmed.keys) {
    const p = state.processes.get(key);
    if (!p || p.stopped) continue;
    p.stopped = true;
    p.unseenExit = true; // its exit code is not known
    processTable.refresh(p);
    otherDirty = true;
  }
  unconfirmed = null;
}

// ------------------------------------------------------------------ connections view

const connectionTable = new VirtualTable({
  testid: "connections-table",
  rowTestid: "connection-row",
  rowKey: (c) => c.id,
  rowClass: (c) => (c.closed ? "stopped" : ""),
  // Its own requests, not every connection's to the same endpoint.
  onOpen: (c) => { setFilterText(`conn:${c.id}`); switchView("network"); },
  emptyText: () => (state.connections.size ? "No connections match the filter." : "No connection events yet."),
  columns: [
    { key: "state", label: "State", width: 74, sort: (c) => (c.closed ? 1 : 0), render: (c, cell) => {
      cell.append(h("span", { class: `pill ${c.closed ? "closed" : "open"}` }, c.closed ? "closed" : "open"));
    } },
    { key: "process", label: "Process", width: 150, value: (c) => c.proc },
    { key: "endpoint", label: "Endpoint", width: 180, flex: true, value: (c) => c.endpoint },
    { key: "remote", label: "Remote", width: 150, cls: "mono", value: (c) => c.remote },
    { key: "local", label: "Local", width: 150, cls: "mono", value: (c) => c.local },
    { key: "direction", label: "Direction", width: 112, value: (c) => c.direction },
    { key: "proto", label: "Protocol", width: 70, value: (c) => c.l7 },
    { key: "tls", label: "TLS", width: 130, value: (c) => c.tls },
    { key: "sent", label: "Sent", width: 72, cls: "num", value: (c) => formatBytes(c.sent), sort: (c) => c.sent },
    { key: "received", label: "Received", width: 76, cls: "num", value: (c) => formatBytes(c.received), sort: (c) => c.received },
    { key: "tx", label: "Requests", width: 70, cls: "num", value: (c) => String(c.transactions ?? ""), sort: (c) => c.transactions },
    { key: "opened", label: "Opened", width: 104, cls: "mono", value: (c) => formatClock(c.openedMs), sort: (c) => c.openedMs },
    { key: "duration", label: "Duration", width: 76, cls: "num", value: (c) => (c.closed ? formatMs(c.durationMs) : ""), sort: (c) => (c.closed ? c.durationMs : null) },
    { key: "container", label: "Container", width: 120, value: (c) => c.container },
  ],
});
$("connections-view").append(connectionTable.el);

function onConnection(type, body) {
  const d = (body.data && body.data.data) || {};
  const meta = d.meta || {};
  const id = meta.connectionId;
  if (!id) return;
  let c = state.connections.get(id);
  if (!c) {
    c = { id };
    state.connections.set(id, c);
    trimMap(state.connections, OTHER_CAP);
  }
  const src = d.source || {};
  const dst = d.destination || {};
  const ingress = d.direction === "ingress";
  const localSide = ingress ? dst : src;
  const remoteSide = ingress ? src : dst;
  const libs = meta.tlsProbeTypesDetected || [];
  Object.assign(c, {
    json: d,
    endpoint: meta.endpointId || "",
    direction: d.direction || "",
    l7: d.l7Protocol || "",
    tls: [d.tlsVersion, libs.length ? `(${libs.join(", ")})` : ""].filter(Boolean).join(" "),
    local: addressText(localSide.address),
    remote: addressText(remoteSide.address),
    pid: localSide.pid ?? d.pid,
    proc: localSide.exe ? `${basename(localSide.exe)} · ${localSide.pid ?? d.pid ?? ""}` : d.pid != null ? `pid ${d.pid}` : "",
    container: localSide.container ? localSide.container.name || localSide.container.id || "" : "",
    sent: d.bytesSent,
    received: d.bytesReceived,
    transactions: d.transactions,
    openedMs: Date.parse(d.openedAt || body.ts) || 0,
    closed: type === "connection.closed" || Boolean(d.closedAt),
    durationMs: d.durationMs,
  });
  c.hay = [c.endpoint, c.proc, c.container, c.remote, c.local, c.l7, c.tls, c.direction, c.id];
  connectionTable.refresh(c);
  otherDirty = true;
}

function trimMap(map, cap) {
  // Maps iterate in insertion order: the first keys are the oldest.
  while (map.size > cap) map.delete(map.keys().next().value);
}

let otherDirty = false;

function renderOtherViews() {
  otherDirty = false;
  const procs = [...state.processes.values()].filter((p) => textMatches([p.pid, p.binary, p.path, p.cmdline, p.container, p.pod, p.user]));
  processTable.setRows(procs);
  const conns = [...state.connections.values()].filter((c) => textMatches(c.hay || []));
  connectionTable.setRows(conns);
  const running = [...state.processes.values()].filter((p) => !p.stopped).length;
  const open = [...state.connections.values()].filter((c) => !c.closed).length;
  // The badges count what is live; their titles say of how many.
  const procCount = $("process-count"), connCount = $("connection-count");
  procCount.textContent = state.processes.size ? String(running) : "";
  procCount.title = `${running} running of ${state.processes.size} seen`;
  connCount.textContent = state.connections.size ? String(open) : "";
  connCount.title = `${open} open of ${state.connections.size} seen`;
}

// ------------------------------------------------------------------ ingest

let incoming = [];
let flushScheduled = false;

function enqueue(type, body) {
  incoming.push([type, body]);
  if (!flushScheduled) {
    flushScheduled = true;
    // A frame, or a timer when the tab is hidden (rAF does not run then).
    const run = () => { if (flushScheduled) flush(); };
    requestAnimationFrame(run);
    setTimeout(run, 250);
  }
}

function flush() {
  flushScheduled = false;
  const batch = incoming;
  incoming = [];
  if (state.paused) {
    for (const item of batch) {
      state.pausedEvents.push(item);
      state.pausedBytes += dataBytes(item[1]);
    }
    let over = Math.max(0, state.pausedEvents.length - PAUSE_BUFFER_CAP);
    let bytes = state.pausedBytes;
    for (let i = 0; i < over; i++) bytes -= dataBytes(state.pausedEvents[i][1]);
    while (bytes > BYTES_CAP && over < state.pausedEvents.length - 1) bytes -= dataBytes(state.pausedEvents[over++][1]);
    if (over > 0) {
      state.pausedEvents.splice(0, over);
      state.pausedBytes = bytes;
      state.pausedDiscarded += over;
    }
    updatePausedNote();
    return;
  }
  apply(batch);
}

function apply(batch) {
  const added = [];
  for (const [type, body] of batch) {
    // An event the page cannot read (a damaged capture file's: a body that is
    // not base64, a number for a method) costs its own row, not its batch's:
    // thrown from here, every event after it in the batch was lost unshown.
    try {
      applyOne(type, body, added);
    } catch (err) {
      state.badEvents += 1;
      if (state.badEvents <= 10) console.warn(`qtap DevTools: skipped a ${type} event it could not read: ${err}`);
    }
  }
  let removed = 0;
  let over = Math.max(0, state.rows.length - ROW_CAP);
  let bytes = state.rowBytes;
  for (let i = 0; i < over; i++) bytes -= state.rows[i].bytes;
  while (bytes > BYTES_CAP && over < state.rows.length - 1) bytes -= state.rows[over++].bytes;
  if (over > 0) {
    const gone = state.rows.splice(0, over);
    state.rowBytes = bytes;
    state.rowsLetGo += over;
    for (const row of gone) {
      state.byId.delete(row.id);
      row.dropped = true;
    }
    while (removed < state.shown.length && state.shown[removed].dropped) removed += 1;
    if (removed) state.shown.splice(0, removed);
  }
  for (const row of added) if (!row.dropped && matches(row)) state.shown.push(row);
  if (added.length || removed) refreshNetwork(removed);
  if (otherDirty) renderOtherViews();
}

function applyOne(type, body, added) {
  // The snapshot is over at the first event that is not part of it.
  if (unconfirmed && type !== "process.started" && type !== RECONCILE_END) endReconcile();
  if (type === RECONCILE_START) {
    startReconcile(body.gen);
  } else if (type === RECONCILE_END) {
    if (unconfirmed && unconfirmed.gen === body.gen) endReconcile();
  } else if (type === "request.http_transaction") {
    const id = body.data && body.data.data && body.data.data.requestId;
    if (id && state.byId.has(id)) return; // already shown (a resumed or repeated stream)
    const row = rowFromEvent(body);
    state.byId.set(row.id, row);
    state.rows.push(row);
    state.rowBytes += row.bytes;
    const proc = row.pid != null ? currentByPid.get(row.pid) : undefined;
    if (proc) proc.requests = (proc.requests || 0) + 1;
    added.push(row);
  } else if (type.startsWith("process.")) {
    const p = onProcess(type, body);
    if (unconfirmed) unconfirmed.keys.delete(p.key); // named by the new run: still running
  } else if (type.startsWith("connection.")) {
    onConnection(type, body);
  }
}

function refreshNetwork(removedFromTop = 0) {
  const before = state.range;
  let min = Infinity;
  let max = -Infinity;
  let bytes = 0;
  let errors = 0;
  for (const r of state.shown) {
    if (r.start < min) min = r.start;
    if (r.tsMs > max) max = r.tsMs;
    bytes += r.size || 0;
    if (r.isError) errors += 1;
  }
  state.range = Number.isFinite(min) ? { min, max } : { min: 0, max: 0 };
  table.setRows(state.shown, { removedFromTop });
  if (state.range.min !== before.min || state.range.max !== before.max) table.refreshAll();
  const shown = state.shown.length;
  const total = state.rows.length;
  const req = $("summary-requests");
  req.textContent = shown === total ? `${total} request${total === 1 ? "" : "s"}` : `${shown} / ${total} requests`;
  req.dataset.shown = String(shown);
  req.dataset.total = String(total);
  req.dataset.letGo = String(state.rowsLetGo);
  const kept = `The page keeps the newest ${ROW_CAP} rows or ${BYTES_CAP / 1048576} MB of them`;
  req.title = state.rowsLetGo
    ? `${kept}: ${state.rowsLetGo} older let go (?cap= and ?capmb= change this)`
    : `${kept} (?cap= and ?capmb= change this); none let go so far`;
  $("summary-bytes").textContent = `${formatBytes(bytes) || "0 B"} transferred`;
  $("summary-bytes").dataset.bytes = String(bytes);
  const err = $("summary-errors");
  err.textContent = `${errors} error${errors === 1 ? "" : "s"}`;
  err.classList.toggle("has-errors", errors > 0);
  err.dataset.errors = String(errors);
  $("summary-duration").textContent = shown > 1 ? `span ${formatMs(state.range.max - state.range.min)}` : "";
  if (table.selected && table.selected.dropped) closeDetail();
}

function refilter() {
  state.shown = state.rows.filter(matches);
  refreshNetwork();
  if (table.selected) table.reveal(table.indexOf(table.selected));
  renderOtherViews();
}

// ------------------------------------------------------------------ toolbar

const filterInput = $("filter-text");
let filterTimer = 0;
filterInput.addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    filterTimer = 0;
    applyFilterText(filterInput.value);
  }, 80);
});
filterInput.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === "ArrowDown") {
    e.preventDefault();
    currentTable().el.focus();
  }
});

function setFilterText(text) {
  filterInput.value = text;
  applyFilterText(text);
}

const filterHint = $("filter-hint");

function applyFilterText(text) {
  state.filter.terms = parseTerms(text);
  const problem = state.filter.terms.map(termProblem).find(Boolean) || "";
  filterInput.setAttribute("aria-invalid", problem ? "true" : "false");
  filterInput.closest(".filter-box").classList.toggle("invalid", !!problem);
  filterHint.textContent = problem;
  filterHint.hidden = !problem;
  refilter();
}

for (const group of document.querySelectorAll(".chips")) {
  const set = group.dataset.group === "status" ? state.filter.status : state.filter.methods;
  group.addEventListener("click", (e) => {
    const chip = e.target.closest(".chip");
    if (!chip) return;
    const value = chip.dataset.value;
    const on = !set.has(value);
    if (on) set.add(value);
    else set.delete(value);
    chip.setAttribute("aria-pressed", String(on));
    refilter();
  });
}

$("toggle-errors").addEventListener("change", (e) => {
  state.filter.errorsOnly = e.target.checked;
  refilter();
});

const pauseBtn = $("pause");
pauseBtn.addEventListener("click", () => {
  state.paused = !state.paused;
  pauseBtn.setAttribute("aria-pressed", String(state.paused));
  pauseBtn.title = state.paused ? "Resume recording" : "Pause recording (events are kept and shown on resume)";
  if (!state.paused) {
    const buffered = state.pausedEvents;
    state.pausedEvents = [];
    state.pausedBytes = 0;
    if (state.pausedDiscarded) toast(`${state.pausedDiscarded} events were discarded while paused`);
    state.pausedDiscarded = 0;
    apply(buffered);
  }
  updatePausedNote();
  table.schedule();
});

function updatePausedNote() {
  const note = $("paused-note");
  note.hidden = !state.paused;
  const n = state.pausedEvents.filter(([t]) => t === "request.http_transaction").length;
  note.textContent = `Paused${n ? ` · ${n} new` : ""}`;
}

$("clear").addEventListener("click", () => clearRequests());

function clearRequests() {
  state.rows = [];
  state.rowBytes = 0;
  state.rowsLetGo = 0;
  state.shown = [];
  state.byId.clear();
  state.pausedEvents = [];
  state.pausedBytes = 0;
  for (const p of state.processes.values()) p.requests = 0;
  closeDetail();
  table.clear();
  refreshNetwork();
  updatePausedNote();
}

$("export-har").addEventListener("click", () => {
  if (filterTimer) {
    // Typed within the filter's 80 ms pause: export what the box says, not
    // the rows of the filter before it.
    clearTimeout(filterTimer);
    filterTimer = 0;
    applyFilterText(filterInput.value);
  }
  const doc = harDocument(state.shown, state.agent && state.agent.version);
  const blob = new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" });
  const a = h("a", { href: URL.createObjectURL(blob), download: `qtap-devtools-${stamp()}.har` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  const n = doc.log.entries.length;
  const left = state.shown.length - n;
  toast(`Exported ${n} request${n === 1 ? "" : "s"} as HAR` + (left ? ` (${left} left out: not a transaction)` : ""));
});

function stamp() {
  const d = new Date();
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

// ------------------------------------------------------------------ views

function currentTable() {
  return state.view === "processes" ? processTable : state.view === "connections" ? connectionTable : table;
}

function switchView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".topbar .tab")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  for (const section of document.querySelectorAll("main > .view")) section.hidden = section.dataset.view !== view;
  document.body.dataset.view = view;
  renderOtherViews();
  currentTable().schedule();
}

for (const tab of document.querySelectorAll(".topbar .tab")) {
  tab.addEventListener("click", () => switchView(tab.dataset.view));
}

document.addEventListener("keydown", (e) => {
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
  if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "f" && !e.shiftKey) {
    e.preventDefault();
    filterInput.focus();
    filterInput.select();
  } else if (e.key === "Escape" && typing && e.target === filterInput) {
    currentTable().el.focus();
  } else if (e.key === "Escape" && detailOpen() && !typing) {
    closeDetail();
  }
});

// ------------------------------------------------------------------ status strip

const connEl = $("status-connection");

function setConnection(stateName, text, title) {
  connEl.dataset.state = stateName;
  connEl.querySelector(".conn-text").textContent = text;
  connEl.title = title || "";
}

function onConnected(data) {
  const before = state.agent && state.agent.instance;
  state.agent = data;
  const mode = data.mode || "live";
  if (before && data.instance && before !== data.instance && String(before).startsWith("replay-")) {
    // Another capture file on the same address: what the last one showed
    // is not this one's (a live agent restarted keeps the page's history).
    clearRequests();
    state.processes.clear();
    state.connections.clear();
    renderOtherViews();
    toast(`Now showing ${basename((data.capture || {}).file || "another source")}: the previous file's requests were cleared`);
  } else if (before && data.instance && before !== data.instance) {
    // Another run of the agent: its snapshot follows this greeting.
    const gen = ++reconcileGen;
    enqueue(RECONCILE_START, { gen });
    // An agent with nothing else to say ends the snapshot only by silence.
    setTimeout(() => enqueue(RECONCILE_END, { gen }), 2000);
  }
  setConnection("connected", "Connected", `Agent ${data.agent || "qtap-devtools"} ${data.version || ""} on ${data.hostname || "?"} (kernel ${data.kernel || "?"})`);
  const info = $("agent-info");
  clear(info).append(
    h("span", { class: `badge ${mode}`, testid: "agent-mode" }, mode),
    h("span", null, `${data.hostname || ""}`),
    h("span", { class: "muted" }, data.version ? `v${data.version}` : ""),
  );
  info.title = `kernel ${data.kernel || "?"}`;
  renderCapture(data.capture || {});
}

// The greeting says how capture stood when this page connected; while it was
// still starting, ask again until it is not (a new stream is not needed for it).
let captureTimer = 0;

async function refreshCapture() {
  try {
    const resp = await fetch(`${API}/stats${TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : ""}`, { cache: "no-store" });
    if (resp.ok) renderCapture((await resp.json()).capture_state || {});
  } catch {
    // Unreachable: the stream's reconnect says so.
  }
}

function renderCapture(cap) {
  clearTimeout(captureTimer);
  const el = $("status-capture");
  const capState = cap.state || "unknown";
  el.dataset.state = capState;
  el.className = `capture cap-${capState}`;
  let text = `Capture: ${capState}`;
  if (capState === "replay" && cap.file) text = `Replay: ${basename(cap.file)} (${cap.events ?? "?"} events)`;
  if (capState === "running" && Array.isArray(cap.attached)) text = `Capture: running · ${cap.attached.length} probe${cap.attached.length === 1 ? "" : "s"}`;
  el.textContent = text;
  const details = [];
  if (cap.error) details.push(cap.error);
  if (cap.file) details.push(cap.file);
  if (Array.isArray(cap.attached)) details.push(...cap.attached.map((a) => `attached ${a.library || ""} ${a.path || ""} (${a.mode || ""})`));
  if (Array.isArray(cap.failed)) details.push(...cap.failed.map((a) => `failed ${a.library || ""} ${a.path || ""}: ${a.error || ""}`));
  if (cap.lostRecords) details.push(`${cap.lostRecords} kernel records lost`);
  if (cap.maxCaptureMiBPerSecond) details.push(`bodies cut past ${cap.maxCaptureMiBPerSecond} MiB/s of plaintext (--max-capture-rate)`);
  if (cap.badRecords) details.push(`${cap.badRecords} bad records in the file`);
  // What the file's reader should know (the stream it saved missed events).
  if (Array.isArray(cap.notes) && cap.notes.length) {
    details.push(...cap.notes.map(String));
    el.textContent = `${text} · incomplete`;
  }
  el.title = details.join("\n");
  if (capState === "starting" && source) captureTimer = setTimeout(refreshCapture, 1000);
}

function onDropped(data) {
  state.dropped += Number(data.missed || 0);
  renderDropped();
  toast(`The agent dropped ${data.missed} events for this page (it fell behind)`);
}

function renderDropped() {
  const el = $("status-dropped");
  el.textContent = `Dropped: ${state.dropped}`;
  el.dataset.dropped = String(state.dropped);
  el.classList.toggle("warn", state.dropped > 0);
  el.title = "Events the agent could not send to this page because it fell behind (system.dropped)";
}
renderDropped();

function renderRate() {
  const now = performance.now();
  const times = state.eventTimes;
  let i = 0;
  while (i < times.length && times[i] < now - 5000) i += 1;
  if (i) times.splice(0, i);
  const recent = times.filter((t) => t >= now - 1000).length;
  const el = $("status-rate");
  el.textContent = `${recent} events/s`;
  el.dataset.rate = String(recent);
}
renderRate();
setInterval(renderRate, 1000);

// ------------------------------------------------------------------ the stream

let source = null;
let lastEventId = null;
let retryMs = 500;
let retryTimer = 0;
let goodbye = null; // the last system.disconnected's reason, until the stream is back
let refused = null; // why the agent, reachable, refuses the stream (401, 403), until it takes it

const STREAM_TYPES = [
  "system.connected", "system.dropped", "system.disconnected",
  "process.started", "process.stopped",
  "connection.opened", "connection.updated", "connection.closed",
  "request.http_transaction",
];

function streamUrl() {
  const q = new URLSearchParams();
  if (TOKEN) q.set("token", TOKEN);
  // First connect: "after 0" asks for all the agent still holds (its recent
  // history), so a page opened after the traffic shows it; then, where we were.
  q.set("after", lastEventId || "0");
  const qs = q.toString();
  return `${API}/events${qs ? `?${qs}` : ""}`;
}

function connect() {
  clearTimeout(retryTimer);
  const es = new EventSource(streamUrl());
  source = es;
  for (const type of STREAM_TYPES) {
    es.addEventListener(type, (e) => onEvent(type, e));
  }
  es.addEventListener("open", () => { retryMs = 500; });
  es.addEventListener("error", () => {
    if (source !== es) return;
    // We reconnect ourselves (EventSource gives up for good on some errors);
    // `after=` carries the last event id, as Last-Event-ID would.
    es.close();
    source = null;
    const retry = `retrying in ${(retryMs / 1000).toFixed(1)} s`;
    if (refused) {
      showRefused(); // as the last retry found it, until this one's answer says otherwise
    } else if (goodbye) {
      // It said why it went (stopped): keep saying so while we retry.
      setConnection("disconnected", `Disconnected: ${goodbye}`, `The agent said: ${goodbye}; ${retry}`);
      renderCapture({ state: "unknown", error: `the agent stopped (${goodbye}): the page reconnects when it is back` });
    } else {
      setConnection("reconnecting", "Reconnecting…", `Retrying in ${(retryMs / 1000).toFixed(1)} s`);
      renderCapture({ state: "unknown", error: "the agent is not reachable: what it captures is not known until the page reconnects" });
    }
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
    // EventSource does not say why it failed.  An agent that is back but
    // refuses the page (restarted with --token, or with another one) answers
    // every retry 401, and the page said "Reconnecting…" (or the last
    // goodbye) forever: ask the stream's status, as HEAD (no stream opened).
    refusal().then((why) => {
      if (source !== null) return; // retried meanwhile: that attempt asks for itself
      refused = why;
      if (why) showRefused();
    });
  });
}

function showRefused() {
  setConnection("disconnected", `Refused: ${refused}`, `${refused}; the page keeps retrying`);
  renderCapture({ state: "unknown", error: `the agent refuses this page: ${refused}` });
}

async function refusal() {
  let status;
  try {
    status = (await fetch(streamUrl(), { method: "HEAD", cache: "no-store" })).status;
  } catch {
    return null; // not reachable: the agent is down, or the tunnel
  }
  if (status === 401) return "the agent asks for its token (started with --token): open the page with ?token=…";
  if (status === 403) return "the agent does not take this page's address (its Host check): open it as localhost or 127.0.0.1";
  return null;
}

function onEvent(type, e) {
  if (e.lastEventId) lastEventId = e.lastEventId;
  state.eventTimes.push(performance.now());
  let body;
  try {
    body = JSON.parse(e.data);
  } catch {
    return; // not JSON: nothing we can show
  }
  if (type === "system.connected") {
    retryMs = 500;
    goodbye = null;
    refused = null;
    onConnected((body && body.data) || {});
  } else if (type === "system.dropped") {
    onDropped((body && body.data) || {});
  } else if (type === "system.disconnected") {
    goodbye = (body && body.data && body.data.reason) || "the stream ended";
    setConnection("disconnected", `Disconnected: ${goodbye}`, `The agent said: ${goodbye}`);
  } else {
    enqueue(type, body);
  }
}

// Shown once at start, before any event.
refreshNetwork();
renderOtherViews();
document.body.dataset.view = "network";
connect();
table.el.focus();

// For debugging from the console; tests do not depend on it.
Object.defineProperty(window, "qtapDevtools", { value: { state, transactionOf } });
