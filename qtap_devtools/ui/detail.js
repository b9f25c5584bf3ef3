// The detail pane of one transaction: Headers, Payload, Response, Timing, Source.
// The transaction JSON is decoded here, on selection, never for the table.

import { h, clear, formatBytes, formatMs, formatDateTime, mimeOf, statusClass, addressText } from "./dom.js";
import { base64Bytes, textOf, transactionOf, headerList, findHeader } from "./export.js";

const TABS = [
  ["headers", "Headers"],
  ["payload", "Payload"],
  ["response", "Response"],
  ["timing", "Timing"],
  ["source", "Source"],
];

const TEXT_LIMIT = 512 * 1024; // characters drawn in a text view
const HEX_LIMIT = 64 * 1024; // bytes drawn in a hex view
const FIELD_LIMIT = 5000; // form fields or query parameters drawn
const JSON_CHILD_LIMIT = 500; // children drawn per object before "show more"
const JSON_STRING_LIMIT = 10_000; // characters of one string drawn before "more characters"

export class DetailPane {
  constructor(el, { onClose, onCopyCurl, onCopyResponse, connectionOf }) {
    this.el = el;
    this.row = null;
    this.tab = "headers";
    this.onClose = onClose;
    this.connectionOf = connectionOf || (() => null);
    this.tabButtons = new Map();
    const tabs = h("div", { class: "tabs", role: "tablist" });
    for (const [id, label] of TABS) {
      const b = h("button", { class: "tab", role: "tab", testid: `tab-${id}`, onclick: () => this.show(id) }, label);
      this.tabButtons.set(id, b);
      tabs.append(b);
    }
    this.title = h("span", { class: "detail-title", testid: "detail-title" });
    this.body = h("div", { class: "detail-body", testid: "detail-body", tabindex: "-1" });
    el.append(
      h("div", { class: "detail-head" },
        h("button", { class: "icon-btn close", title: "Close (Esc)", "aria-label": "Close", testid: "detail-close", onclick: () => this.onClose() }, h("span", { class: "i-close", "aria-hidden": "true" })),
        tabs,
        h("span", { class: "spacer" }),
        h("button", { class: "btn small", testid: "copy-curl", title: "Copy this request as a curl command", onclick: () => onCopyCurl(this.row) }, "Copy as cURL"),
        h("button", { class: "btn small", testid: "copy-response", title: "Copy the response body", onclick: () => onCopyResponse(this.row) }, "Copy response"),
      ),
      this.title,
      this.body,
    );
    el.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.preventDefault();
        this.onClose();
      }
    });
  }

  open(row) {
    this.row = row;
    this.render();
  }

  show(tab) {
    this.tab = tab;
    this.render();
  }

  render() {
    const row = this.row;
    if (!row) return;
    for (const [id, b] of this.tabButtons) {
      b.setAttribute("aria-selected", String(id === this.tab));
      b.classList.toggle("active", id === this.tab);
    }
    this.title.textContent = row.url;
    this.title.title = row.url;
    const tx = transactionOf(row);
    clear(this.body);
    this.body.scrollTop = 0;
    if (!tx) {
      this.body.append(notice("error", `The transaction data could not be decoded: ${row.txError || "no data"}`));
      return;
    }
    const panel = h("div", { class: `panel panel-${this.tab}`, testid: `panel-${this.tab}` });
    const render = {
      headers: () => this.headers(panel, row, tx),
      payload: () => this.payload(panel, row, tx),
      response: () => this.response(panel, row, tx),
      timing: () => this.timing(panel, row, tx),
      source: () => this.source(panel, row, tx),
    }[this.tab];
    try {
      render();
    } catch (err) {
      // A transaction of a damaged capture file (a body that is not base64):
      // say so in the pane rather than leave it blank with an uncaught error.
      this.body.append(notice("error", `This tab cannot show the transaction: ${err && err.message ? err.message : err}`));
      return;
    }
    this.body.append(panel);
  }

  headers(panel, row, tx) {
    const req = tx.request || {};
    const resp = tx.response;
    const meta = tx.metadata || {};
    problems(panel, row, tx);
    const status = resp ? h("span", { class: "status-value" }, h("span", { class: `status-dot ${statusClass(resp.status)}` }), `${resp.status}${resp.reason ? ` ${resp.reason}` : ""}`) : "(no response)";
    panel.append(
      section("General", "general", kvTable([
        ["Request URL", req.url || row.url],
        ["Request Method", req.method || row.method],
        ["Status Code", status],
        // Chrome's Remote Address is the server's: on the server's own side, that is the local one.
        tx.direction === "ingress"
          ? ["Server Address", addressText(meta.local_address)]
          : ["Remote Address", addressText(meta.remote_address)],
        tx.direction === "ingress" ? ["Client Address", addressText(meta.remote_address)] : null,
        ["Protocol", [req.http_version, req.scheme === "https" || row.scheme === "https" ? meta.tls_version || "TLS" : null].filter(Boolean).join(" over ")],
        ["Direction", DIRECTION_TEXT[tx.direction] || tx.direction],
        ["Process", row.exe ? `${row.exe} (pid ${row.pid})` : ""],
      ])),
      section(`Response Headers (${headerList(resp && resp.headers).length})`, "response-headers", headerTable(resp && resp.headers, "No response headers")),
      section(`Request Headers (${headerList(req.headers).length})`, "request-headers", headerTable(req.headers, "No request headers")),
    );
    // A chunked body's trailer fields, after it (RFC 9112 §7.1.2): only where there are some.
    for (const [msg, name, key] of [[resp, "Response Trailers", "response-trailers"], [req, "Request Trailers", "request-trailers"]]) {
      const n = headerList(msg && msg.trailers).length;
      if (n) panel.append(section(`${name} (${n})`, key, headerTable(msg.trailers, "")));
    }
  }

  payload(panel, row, tx) {
    const req = tx.request || {};
    let params = [];
    try {
      params = [...new URL(req.url || row.url).searchParams];
    } catch {
      /* not a URL we can parse: no query section */
    }
    if (params.length) {
      panel.append(section(`Query String Parameters (${params.length})`, "query-params", fieldTable(params)));
    }
    const bytes = base64Bytes(req.body);
    if (!bytes.length && !req.body_size) {
      if (!params.length) panel.append(h("div", { class: "empty-note" }, "This request has no payload."));
      return;
    }
    const ctype = req.content_type || findHeader(req.headers, "content-type") || "";
    const label = mimeOf(ctype) === "application/x-www-form-urlencoded" ? "Form Data" : "Request Payload";
    panel.append(section(label, "request-body", bodyView(bytes, ctype, req, "request", tx)));
  }

  response(panel, row, tx) {
    const resp = tx.response;
    if (!resp) {
      panel.append(h("div", { class: "empty-note" }, tx.error ? `No response: ${tx.error}` : "This request has no response."));
      return;
    }
    const bytes = base64Bytes(resp.body);
    if (!bytes.length && !resp.body_size) {
      const upgrade = findHeader(resp.headers, "upgrade");
      panel.append(h("div", { class: "empty-note" }, resp.status === 101 || tx.upgraded
        ? `The connection switched to ${upgrade || "another protocol"}: what it carries next (WebSocket frames, a tunnel) is not decoded.`
        : "This response has no body."));
      return;
    }
    const ctype = resp.content_type || findHeader(resp.headers, "content-type") || "";
    panel.append(h("div", { testid: "response-body" }, bodyView(bytes, ctype, resp, "response", tx)));
  }

  timing(panel, row, tx) {
    const t = tx.timing || {};
    // duration_us is precise; duration_ms is whole milliseconds, as the seed has it.
    const total = tx.duration_us != null ? Number(tx.duration_us) / 1000 : Number(tx.duration_ms ?? row.duration ?? 0);
    const send = Number(t.send_ms ?? 0);
    const wait = Number(t.wait_ms ?? Math.max(0, total - send));
    const receive = Number(t.receive_ms ?? Math.max(0, total - send - wait));
    const span = Math.max(total, send + wait + receive, 0.001);
    const phases = [
      ["Request sent", send, "ph-send", "send"],
      ["Waiting for server response", wait, "ph-wait", "wait"],
      ["Content download", receive, "ph-receive", "receive"],
    ];
    const started = Date.parse(tx.started_at || row.ts);
    const grid = h("div", { class: "timing-grid", testid: "timing" });
    let offset = 0;
    for (const [label, ms, cls, phase] of phases) {
      const bar = h("span", { class: `tbar ${cls}`, testid: `timing-bar-${phase}` });
      bar.style.left = `${(offset / span) * 100}%`;
      bar.style.width = `${Math.max((ms / span) * 100, 0.4)}%`;
      grid.append(h("span", { class: "tlabel" }, label), h("span", { class: "ttrack" }, bar), h("span", { class: "tvalue", testid: `timing-${phase}` }, formatMs(ms)));
      offset += ms;
    }
    grid.append(h("span", { class: "tlabel total" }, "Total"), h("span"), h("span", { class: "tvalue total", testid: "timing-total" }, formatMs(total)));
    panel.append(
      kvTable([
        ["Started at", formatDateTime(started)],
        ["Captured at", formatDateTime(row.tsMs)],
      ]),
      section("Request/Response", "timing-phases", grid),
      h("p", { class: "hint" }, "Measured by the agent from the first request byte to the last response byte seen on the socket."),
    );
  }

  source(panel, row, tx) {
    const m = tx.metadata || {};
    const conn = this.connectionOf(m.connection_id || row.connectionId) || {};
    const src = conn.source || {};
    const dst = conn.destination || {};
    const tlsLibs = conn.meta && conn.meta.tlsProbeTypesDetected;
    panel.append(
      section("Process", "source-process", kvTable([
        ["PID", m.process_id ?? row.pid],
        ["Executable", m.process_exe || row.exe],
        ["User", m.user || src.user],
        ["Hostname", m.hostname || src.hostname],
      ])),
      section("Container", "source-container", kvTable([
        ["Name", m.container_name || row.container],
        ["ID", m.container_id],
        ["Image", m.container_image],
        ["Pod", m.pod_name || row.pod],
        ["Namespace", m.pod_namespace],
      ])),
      section("Connection", "source-connection", kvTable([
        ["Connection ID", m.connection_id || row.connectionId],
        ["Request ID", row.id],
        ["Endpoint", m.endpoint_id || row.endpoint],
        ["Direction", tx.direction],
        ["Local address", addressText(m.local_address) || addressText(src.address)],
        ["Remote address", addressText(m.remote_address) || addressText(dst.address)],
        ["TLS version", m.tls_version || conn.tlsVersion || (row.scheme === "https" ? "unknown" : "none (plain HTTP)")],
        ["TLS library", m.tls_library || (tlsLibs && tlsLibs.join(", "))],
        ["Bytes sent", byteCount(m.bytes_sent)],
        ["Bytes received", byteCount(m.bytes_received)],
      ])),
    );
  }
}

// ------------------------------------------------------------------ pieces

// "1.8 kB (1840 B)", or "300 B" where the exact count adds nothing.
function byteCount(n) {
  if (n === null || n === undefined) return "";
  return n < 1000 ? formatBytes(n) : `${formatBytes(n)} (${n} B)`;
}

function notice(kind, text) {
  return h("div", { class: `notice ${kind}`, testid: `notice-${kind}` }, text);
}

// What `incomplete` can mean (the transaction does not say which): the
// probes' own limit named too, or a 2 MB upload in one write reads as a loss.
const GAP_CAUSES = "some of its bytes were not captured: not copied by the probes (a single read or write over " +
  "1 MiB copies its first 1 MiB; sendfile copies none), lost (the ring overflowed), or sent before the agent " +
  "joined the connection";

function problems(panel, row, tx) {
  if (tx.error) panel.append(notice("error", `Error: ${tx.error}`));
  if (tx.partial) {
    const cut = tx.response && tx.response.body_truncated;
    panel.append(notice("warn", cut
      ? "Partial: sent when its body passed the size limit (--max-body-bytes), before the response finished; the rest was followed, not kept."
      : "Partial: sent when the response had been streaming for the time limit, before it finished (a stream: server-sent events, a long download)."));
  }
  if (tx.shed) panel.append(notice("warn", "Body cut: the agent was behind or over its capture rate limit (--max-capture-rate), and kept only message heads for a while (stats: capture.shed_calls)."));
  else if (tx.incomplete) panel.append(notice("warn", `Incomplete: ${GAP_CAUSES}.`));
}

function section(title, testid, content) {
  const d = h("details", { class: "section", open: true, testid },
    h("summary", null, title),
    content);
  return d;
}

const DIRECTION_TEXT = {
  "ingress": "ingress (this process is the server)",
  "egress-internal": "egress-internal (a client, to a private or loopback address)",
  "egress-external": "egress-external (a client, to a public address)",
};

function kvTable(pairs) {
  const t = h("div", { class: "kv" });
  for (const [k, v] of pairs.filter(Boolean)) {
    if (v === null || v === undefined || v === "") continue;
    t.append(h("div", { class: "k", testid: "field-name" }, k), h("div", { class: "v", testid: "field-value" }, v instanceof Node ? v : String(v)));
  }
  if (!t.childElementCount) t.append(h("div", { class: "k muted" }, "—"));
  return t;
}

function headerTable(headers, emptyText) {
  const pairs = headerList(headers);
  if (!pairs.length) return h("div", { class: "empty-note" }, emptyText);
  const t = h("div", { class: "kv headers" });
  for (const [k, v] of pairs) t.append(h("div", { class: "k" }, k), h("div", { class: "v" }, v));
  return t;
}

function fieldTable(pairs) {
  // Drawn up to what a text view draws (TEXT_LIMIT characters, and at most
  // FIELD_LIMIT fields): a 16 MB form upload (curl --data-binary sends
  // form-urlencoded by default) was drawn whole and froze the page for seconds.
  const t = h("div", { class: "kv fields" });
  let budget = TEXT_LIMIT;
  let shown = 0;
  let cut = false;
  for (const [k, v] of pairs) {
    if (budget <= 0 || shown >= FIELD_LIMIT) break;
    const key = k.length > budget ? k.slice(0, budget) : k;
    const value = v.length > budget - key.length ? v.slice(0, Math.max(0, budget - key.length)) : v;
    if (key.length < k.length || value.length < v.length) cut = true;
    budget -= key.length + value.length;
    t.append(h("div", { class: "k" }, key), h("div", { class: "v" }, v === "" ? h("span", { class: "muted" }, "(empty)") : value));
    shown += 1;
  }
  if (shown === pairs.length && !cut) return t;
  const total = pairs.length.toLocaleString("en-US");
  return h("div", null, notice("info", `Showing the first ${shown.toLocaleString("en-US")} of ${total} fields, ` +
    `${TEXT_LIMIT.toLocaleString("en-US")} characters at most: Raw shows the start of the body, Copy as cURL all of it.`), t);
}

// A body, shown the way its type and bytes allow.
// Why a body is not all here, in the words of what happened.
function cutReason(tx, msg, kept) {
  if (!msg.body_truncated) return "sent before the response ended (a stream): the rest was followed, not kept";
  if (!kept && tx.incomplete) return "none of its bytes were copied: sent with sendfile, or lost in a capture gap";
  if (tx.shed) return "cut while the agent was behind or over its capture rate (--max-capture-rate)";
  if (tx.incomplete) return GAP_CAUSES;
  return "the agent keeps the first --max-body-bytes of a body";
}

function bodyView(bytes, contentType, msg, side, tx = {}) {
  const wrap = h("div", { class: "body-view" });
  const mime = mimeOf(contentType);
  const size = msg.body_size ?? bytes.length;
  // The capture's own word, not fewer bytes kept than sent: a decoded gzip
  // body is smaller than its wire size (body_size) and whole.  A partial
  // transaction's response went out before its body ended.
  const streaming = side === "response" && tx.partial && !msg.body_truncated;
  if (msg.body_truncated || streaming) {
    // A partial transaction went out before its body ended: its Content-Length says the whole.
    const declared = Number(findHeader(msg.headers, "content-length"));
    const whole = Number.isFinite(declared) && declared > size ? declared : size;
    const coded = msg.content_encoding && !msg.body_decode_error; // kept decoded, counted on the wire
    let of = whole > size ? ` of ${formatBytes(whole)} (its Content-Length)` : ` of ${formatBytes(whole)}${coded ? " on the wire" : ""}`;
    if (streaming && !(whole > size)) of = ""; // so far: the whole is not known
    wrap.append(notice("warn", `Truncated: ${formatBytes(bytes.length)}${coded ? " (decoded)" : ""}${of} captured: ${cutReason(tx, msg, bytes.length)}.`));
  }
  if (msg.body_decode_error) wrap.append(notice("warn", `Could not decode ${msg.content_encoding || "the body"}: ${msg.body_decode_error}; showing the bytes as captured.`));
  const info = [mime || "no content type", formatBytes(bytes.length)];
  if (msg.content_encoding) info.push(`decoded from ${msg.content_encoding}`);

  if (!bytes.length) {
    wrap.append(h("div", { class: "empty-note" }, size ? "The body was not captured." : "Empty body."));
    return wrap;
  }
  if (mime.startsWith("image/") && /^image\/[a-z0-9.+-]+$/.test(mime)) {
    const img = h("img", { class: "preview", alt: `${side} image`, testid: `${side}-image` });
    const dims = h("span", { class: "muted" });
    img.addEventListener("load", () => { dims.textContent = ` · ${img.naturalWidth} × ${img.naturalHeight}`; });
    img.addEventListener("error", () => { img.replaceWith(hexView(bytes)); });
    img.src = `data:${mime};base64,${msg.body}`;
    wrap.append(h("div", { class: "body-info" }, h("span", null, info.join(" · "), dims)), h("div", { class: "image-box" }, img));
    return wrap;
  }
  let text = textOf(bytes);
  const charset = (/;\s*charset="?([\w.:-]+)/i.exec(contentType) || [])[1];
  if (text === null && charset && !/^utf-?8$/i.test(charset)) {
    try {
      text = new TextDecoder(charset, { fatal: true }).decode(bytes); // ISO-8859-1, Shift_JIS…
      info.push(`decoded from ${charset}`);
    } catch {
      text = null; // an unknown label, or bytes that are not that charset
    }
  }
  if (text === null) {
    wrap.append(h("div", { class: "body-info" }, `${info.join(" · ")} · binary`), hexView(bytes));
    return wrap;
  }
  const views = [];
  if (mime === "application/x-www-form-urlencoded") {
    views.push(["Fields", () => fieldTable([...new URLSearchParams(text)])]);
  }
  const json = looksJson(mime, text) ? parseJson(text) : undefined;
  if (json !== undefined) views.push(["Pretty", () => jsonView(json)]);
  views.push(["Raw", () => textView(text)]);
  views.push(["Hex", () => hexView(bytes)]);

  const holder = h("div", { class: "body-holder" });
  const switcher = h("div", { class: "seg", role: "tablist" });
  const pick = (i) => {
    [...switcher.children].forEach((b, j) => b.setAttribute("aria-pressed", String(i === j)));
    clear(holder).append(views[i][1]());
  };
  views.forEach(([name], i) => switcher.append(h("button", { class: "seg-btn", testid: `${side}-view-${name.toLowerCase()}`, onclick: () => pick(i) }, name)));
  wrap.append(h("div", { class: "body-info" }, h("span", null, info.join(" · ")), switcher), holder);
  pick(0);
  return wrap;
}

function looksJson(mime, text) {
  if (mime.includes("json")) return true;
  const t = text.trimStart();
  return t.startsWith("{") || t.startsWith("[");
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function textView(text) {
  const shown = text.length > TEXT_LIMIT ? text.slice(0, TEXT_LIMIT) : text;
  const pre = h("pre", { class: "text-view", testid: "text-view" }, shown);
  if (shown.length < text.length) {
    return h("div", null, notice("info", `Showing the first ${TEXT_LIMIT.toLocaleString("en-US")} characters of ${text.length.toLocaleString("en-US")}.`), pre);
  }
  return pre;
}

export function hexView(bytes) {
  const n = Math.min(bytes.length, HEX_LIMIT);
  const lines = [];
  for (let off = 0; off < n; off += 16) {
    let hex = "";
    let ascii = "";
    for (let i = 0; i < 16; i += 1) {
      if (off + i < n) {
        const b = bytes[off + i];
        hex += b.toString(16).padStart(2, "0") + (i === 7 ? "  " : " ");
        ascii += b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".";
      } else {
        hex += i === 7 ? "    " : "   ";
      }
    }
    lines.push(`${off.toString(16).padStart(8, "0")}  ${hex} ${ascii}`);
  }
  const pre = h("pre", { class: "hex-view", testid: "hex-view" }, lines.join("\n"));
  if (n < bytes.length) {
    return h("div", null, notice("info", `Showing the first ${formatBytes(n)} of ${formatBytes(bytes.length)}.`), pre);
  }
  return pre;
}

// ------------------------------------------------------------------ JSON tree
// Pretty-printed JSON whose objects and arrays fold.  Children are built when
// a node is first expanded, so a large document opens instantly.

export function jsonView(value) {
  const root = h("div", { class: "json", testid: "json-view", role: "tree" });
  root.append(jsonNode(null, value, 0, true));
  return root;
}

function scalar(value) {
  if (value === null) return h("span", { class: "j-null" }, "null");
  switch (typeof value) {
    case "string": return stringPart(JSON.stringify(value));
    case "number": return h("span", { class: "j-num" }, String(value));
    case "boolean": return h("span", { class: "j-bool" }, String(value));
    default: return h("span", null, String(value));
  }
}

// A string's start, and a button for more: a file carried in JSON as one
// string (base64) was drawn whole, seconds of a frozen page for megabytes.
function stringPart(text) {
  if (text.length <= JSON_STRING_LIMIT) return h("span", { class: "j-str" }, text);
  const str = h("span", { class: "j-str" }, text.slice(0, JSON_STRING_LIMIT));
  let drawn = JSON_STRING_LIMIT;
  const label = () => `… ${(text.length - drawn).toLocaleString("en-US")} more characters`;
  const more = h("button", { class: "j-more-str", onclick: () => {
    const next = Math.min(text.length, drawn + TEXT_LIMIT);
    str.append(text.slice(drawn, next));
    drawn = next;
    if (drawn >= text.length) more.remove();
    else more.textContent = label();
  } }, label());
  return h("span", null, str, more);
}

function keyPart(key) {
  if (key === null) return null;
  return [h("span", { class: "j-key" }, typeof key === "number" ? String(key) : JSON.stringify(key)), h("span", { class: "j-punct" }, ": ")];
}

function jsonNode(key, value, depth, last) {
  const comma = last ? null : h("span", { class: "j-punct" }, ",");
  const isArray = Array.isArray(value);
  if (value === null || typeof value !== "object") {
    return h("div", { class: "j-line" }, h("span", { class: "j-toggle none" }), keyPart(key), scalar(value), comma);
  }
  const entries = isArray ? value.map((v, i) => [i, v]) : Object.entries(value);
  const [open, close] = isArray ? ["[", "]"] : ["{", "}"];
  if (!entries.length) {
    return h("div", { class: "j-line" }, h("span", { class: "j-toggle none" }), keyPart(key), h("span", { class: "j-punct" }, open + close), comma);
  }
  const toggle = h("button", { class: "j-toggle", "aria-label": "Expand or collapse", tabindex: "-1" });
  const count = isArray ? `${entries.length} item${entries.length === 1 ? "" : "s"}` : `${entries.length} key${entries.length === 1 ? "" : "s"}`;
  const summary = h("span", { class: "j-summary" }, `…${close}`, h("span", { class: "j-count" }, ` ${count}`), comma && comma.cloneNode(true));
  const children = h("div", { class: "j-children" });
  const closing = h("div", { class: "j-line" }, h("span", { class: "j-toggle none" }), h("span", { class: "j-punct" }, close), comma);
  const node = h("div", { class: "j-node", role: "treeitem" },
    h("div", { class: "j-line opener" }, toggle, keyPart(key), h("span", { class: "j-punct" }, open), summary),
    children, closing);
  let built = 0;
  const build = (upto) => {
    const more = children.querySelector(":scope > .j-more");
    if (more) more.remove();
    for (; built < Math.min(upto, entries.length); built += 1) {
      const [k, v] = entries[built];
      children.append(jsonNode(isArray ? null : k, v, depth + 1, built === entries.length - 1));
    }
    if (built < entries.length) {
      children.append(h("button", { class: "j-more", onclick: () => build(built + JSON_CHILD_LIMIT) }, `Show ${Math.min(JSON_CHILD_LIMIT, entries.length - built)} more of ${entries.length - built}…`));
    }
  };
  const setOpen = (isOpen) => {
    if (isOpen && !built) build(JSON_CHILD_LIMIT);
    node.classList.toggle("collapsed", !isOpen);
    node.setAttribute("aria-expanded", String(isOpen));
  };
  toggle.addEventListener("click", () => setOpen(node.classList.contains("collapsed")));
  node.querySelector(".opener").addEventListener("dblclick", () => setOpen(node.classList.contains("collapsed")));
  setOpen(depth < 4 && entries.length <= 200);
  return node;
}

