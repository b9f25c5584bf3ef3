// The full transaction (decoded only when needed), copy as cURL, and HAR 1.2.

const utf8 = new TextDecoder("utf-8", { fatal: true });
const utf8Lossy = new TextDecoder("utf-8");

export function base64Bytes(b64) {
  if (!b64) return new Uint8Array(0);
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
  return out;
}

export function textOf(bytes) {
  // UTF-8 text, or null for binary.
  try {
    const text = utf8.decode(bytes);
    // NUL and most C0 controls mean binary even when the bytes are valid UTF-8.
    // eslint-disable-next-line no-control-regex
    return /[\u0000-\u0008\u000e-\u001a\u001c-\u001f]/.test(text) ? null : text;
  } catch {
    return null;
  }
}

// The transaction JSON of a row, decoded from base64 on first use and kept.
export function transactionOf(row) {
  if (row.tx === undefined) {
    try {
      row.tx = JSON.parse(utf8Lossy.decode(base64Bytes(row.data)));
    } catch (err) {
      row.tx = null;
      row.txError = String(err);
    }
  }
  return row.tx;
}

export function headerList(headers) {
  // [[name, value], ...]; a list value (Set-Cookie) becomes one pair per item.
  const out = [];
  for (const [name, value] of Object.entries(headers || {})) {
    for (const v of Array.isArray(value) ? value : [value]) out.push([name, String(v)]);
  }
  return out;
}

export function findHeader(headers, name) {
  const want = name.toLowerCase();
  for (const [k, v] of headerList(headers)) if (k.toLowerCase() === want) return v;
  return null;
}

// ------------------------------------------------------------------ cURL

function shellQuote(text) {
  // POSIX single quotes unless there are control bytes, then bash's $'...'.
  // eslint-disable-next-line no-control-regex
  if (!/[\u0000-\u001f\u007f]/.test(text)) return `'${text.replace(/'/g, "'\\''")}'`;
  let out = "$'";
  for (const ch of text) {
    const c = ch.codePointAt(0);
    if (ch === "\\" || ch === "'") out += `\\${ch}`;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, "0")}`;
    else out += ch;
  }
  return `${out}'`;
}

function bytesQuote(bytes) {
  let out = "$'";
  for (const b of bytes) {
    if (b >= 0x20 && b < 0x7f && b !== 0x27 && b !== 0x5c) out += String.fromCharCode(b);
    else out += `\\x${b.toString(16).padStart(2, "0")}`;
  }
  return `${out}'`;
}

const CURL_SKIP = new Set(["content-length", "connection", "transfer-encoding", "expect"]);

export function curlCommand(row) {
  const tx = transactionOf(row) || {};
  const req = tx.request || {};
  const url = req.url || row.url;
  const method = (req.method || row.method || "GET").toUpperCase();
  const parts = [`curl ${shellQuote(url)}`];
  const body = base64Bytes(req.body);
  const hasBody = body.length > 0;
  if (method !== "GET" && !(method === "POST" && hasBody)) parts.push(`-X ${shellQuote(method)}`);
  let compressed = false;
  for (const [name, value] of headerList(req.headers)) {
    const lower = name.toLowerCase();
    if (CURL_SKIP.has(lower)) continue;
    if (lower === "host" && url.includes(`://${value}/`)) continue;
    if (lower === "accept-encoding") {
      compressed = true;
      continue;
    }
    parts.push(`-H ${shellQuote(`${name}: ${value}`)}`);
  }
  if (hasBody) {
    const text = textOf(body);
    parts.push(text === null ? `--data-binary ${bytesQuote(body)}` : `--data-raw ${shellQuote(text)}`);
  }
  if (compressed) parts.push("--compressed");
  if (req.http_version === "HTTP/1.0") parts.push("--http1.0");
  return parts.join(" \\\n  ");
}

// ------------------------------------------------------------------ HAR 1.2
// Mirrors qtap_devtools/har.py so a download from the page and
// /devtools/api/har describe a transaction the same way.

function harHeaders(headers) {
  return headerList(headers).map(([name, value]) => ({ name, value }));
}

function harContent(b64) {
  const bytes = base64Bytes(b64);
  const text = textOf(bytes);
  if (text !== null || !bytes.length) return { text: text || "", encoding: null, size: bytes.length };
  return { text: b64, encoding: "base64", size: bytes.length };
}

function queryString(url) {
  try {
    return [...new URL(url).searchParams].map(([name, value]) => ({ name, value }));
  } catch {
    return [];
  }
}

export function harEntry(row) {
  const tx = transactionOf(row) || {};
  const req = tx.request || {};
  const resp = tx.response || {};
  const meta = tx.metadata || {};
  const timing = tx.timing || {};
  const url = req.url || row.url;
  const duration = Number(tx.duration_ms ?? row.duration ?? 0);
  const reqBody = harContent(req.body);
  const request = {
    method: req.method || row.method || "",
    url,
    httpVersion: req.http_version || "HTTP/1.1",
    cookies: [],
    headers: harHeaders(req.headers),
    queryString: queryString(url),
    headersSize: -1,
    bodySize: req.body_size ?? reqBody.size,
  };
  if (reqBody.size) {
    request.postData = { mimeType: req.content_type || "", text: reqBody.text };
    if (reqBody.encoding) request.postData.encoding = reqBody.encoding;
  }
  const respBody = harContent(resp.body);
  const content = { size: respBody.size, mimeType: resp.content_type || "", text: respBody.text };
  if (respBody.encoding) content.encoding = respBody.encoding;
  const entry = {
    startedDateTime: tx.started_at || row.ts,
    time: duration,
    request,
    response: {
      status: resp.status || 0,
      statusText: resp.reason || "",
      httpVersion: req.http_version || "HTTP/1.1",
      cookies: [],
      headers: harHeaders(resp.headers),
      content,
      redirectURL: findHeader(resp.headers, "location") || "",
      headersSize: -1,
      bodySize: tx.response ? (resp.body_size ?? -1) : -1,
    },
    cache: {},
    timings: {
      send: Number(timing.send_ms ?? 0),
      wait: Number(timing.wait_ms ?? duration),
      receive: Number(timing.receive_ms ?? 0),
    },
    connection: meta.connection_id || row.connectionId || "",
    _process: { pid: meta.process_id ?? String(row.pid ?? ""), exe: meta.process_exe ?? row.exe },
    _requestId: row.id,
  };
  if (meta.remote_address && meta.remote_address.ip) entry.serverIPAddress = meta.remote_address.ip;
  if (meta.container_name) entry._container = meta.container_name;
  if (tx.error || row.error) entry._error = tx.error || row.error;
  return entry;
}

export function harDocument(rows, version) {
  return {
    log: {
      version: "1.2",
      creator: { name: "qtap-devtools", version: version || "" },
      pages: [],
      entries: rows.map(harEntry),
    },
  };
}
