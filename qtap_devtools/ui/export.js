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

// A printf format that writes exactly ``bytes``, in any POSIX shell: a NUL
// cannot be in a shell argument ($'\x00' ends bash's), but printf's octal
// escapes can write it, and dash's printf knows no \x.
function printfBytes(bytes) {
  let out = "printf '";
  for (const b of bytes) {
    if (b >= 0x20 && b < 0x7f && b !== 0x27 && b !== 0x5c && b !== 0x25) out += String.fromCharCode(b);
    else if (b === 0x25) out += "%%";
    else out += `\\${b.toString(8).padStart(3, "0")}`;
  }
  return `${out}'`;
}

const CURL_SKIP = new Set(["content-length", "connection", "transfer-encoding", "expect"]);
// Linux refuses an exec whose one argument passes 128 KiB ("Argument list too
// long"): a body past this goes through printf (a shell builtin, never exec'd).
const ARG_BODY_LIMIT = 64 * 1024;

// A leading comment when the capture cut the request's body: the command
// sends only what was kept.
function cutNote(req, kept) {
  if (!req.body_truncated) return "";
  // Numbers only: a capture file is untrusted, and a newline in this line would run.
  const captured = Number(req.body_captured ?? kept) || 0;
  // A request sent before its body ended: its Content-Length says the whole.
  const declared = Number(findHeader(req.headers, "content-length"));
  const size = Number(req.body_size ?? captured) || 0;
  const whole = Number.isFinite(declared) && declared > size ? declared : size;
  // A decoded body's size and the wire's are not the same bytes.
  const of = req.content_encoding ? ` (decoded) of ${whole} bytes on the wire` : ` of ${whole} bytes`;
  return `# the body was cut at capture: ${captured}${of}; this sends what was kept\n`;
}

export function curlCommand(row) {
  const tx = transactionOf(row) || {};
  const req = tx.request || {};
  const url = req.url || row.url;
  const method = (req.method || row.method || "GET").toUpperCase();
  const parts = [`curl ${shellQuote(url)}`];
  const body = base64Bytes(req.body);
  const hasBody = body.length > 0;
  // -X HEAD only renames the method: curl still waits for the body the
  // answer's Content-Length promises (and hangs); -I is curl's own HEAD.
  if (method === "HEAD") parts.push("-I");
  else if (method !== "GET" && !(method === "POST" && hasBody)) parts.push(`-X ${shellQuote(method)}`);
  // The agent keeps a coded body decoded (content_encoding names what it
  // undid): sent as captured, its Content-Encoding would label plain bytes gzip.
  // One it could not decode is the bytes as sent, and keeps its label.
  const decoded = Boolean(req.content_encoding) && !req.body_decode_error;
  let compressed = false;
  for (const [name, value] of headerList(req.headers)) {
    const lower = name.toLowerCase();
    if (CURL_SKIP.has(lower) || lower.startsWith(":")) continue; // HTTP/2 pseudo-headers: curl writes its own
    if (lower === "content-encoding" && decoded) continue;
    if (lower === "host" && url.includes(`://${value}/`)) continue;
    if (lower === "accept-encoding" && /gzip|deflate|br|zstd/i.test(value)) {
      compressed = true; // curl asks for what it can decode, and decodes it
      continue;
    }
    parts.push(`-H ${shellQuote(`${name}: ${value}`)}`);
  }
  let pipe = "";
  if (hasBody) {
    const text = textOf(body);
    // eslint-disable-next-line no-control-regex
    if (text === null || /[\u0000-\u001f\u007f]/.test(text) || body.length > ARG_BODY_LIMIT) {
      // Binary, text with control bytes, or too big for one argument: the exact bytes on stdin.
      pipe = `${printfBytes(body)} | `;
      parts.push("--data-binary @-");
    } else {
      parts.push(`--data-raw ${shellQuote(text)}`);
    }
  }
  if (compressed) parts.push("--compressed");
  if (req.http_version === "HTTP/1.0") parts.push("--http1.0");
  else if (req.http_version === "HTTP/2") parts.push("--http2");
  return cutNote(req, body.length) + pipe + parts.join(" \\\n  ");
}

// ------------------------------------------------------------------ HAR 1.2
// Mirrors qtap_devtools/har.py so a download from the page and
// /devtools/api/har describe a transaction the same way.

function harHeaders(headers) {
  return headerList(headers).map(([name, value]) => ({ name, value }));
}

function harContent(b64, what) {
  let bytes;
  try {
    bytes = base64Bytes(b64);
  } catch {
    throw new Error(`${what} is not valid base64`); // in har.py's words
  }
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

function headerValues(headers, name) {
  return headerList(headers).filter(([key]) => key.toLowerCase() === name).map(([, value]) => value);
}

function requestCookies(headers) {
  const out = [];
  for (const line of headerValues(headers, "cookie")) {
    for (const pair of line.split(";")) {
      const eq = pair.indexOf("=");
      const name = pair.slice(0, eq).trim();
      if (eq > 0 && name) out.push({ name, value: pair.slice(eq + 1) });
    }
  }
  return out;
}

function responseCookies(headers) {
  const out = [];
  for (const line of headerValues(headers, "set-cookie")) {
    const [first, ...attrs] = line.split(";");
    const eq = first.indexOf("=");
    const name = first.slice(0, eq).trim();
    if (eq <= 0 || !name) continue;
    const cookie = { name, value: first.slice(eq + 1) };
    for (const attr of attrs) {
      const at = attr.indexOf("=");
      const key = (at < 0 ? attr : attr.slice(0, at)).trim().toLowerCase();
      const val = at < 0 ? "" : attr.slice(at + 1);
      if (key === "path" || key === "domain" || key === "expires") cookie[key] = val;
      else if (key === "httponly") cookie.httpOnly = true;
      else if (key === "secure") cookie.secure = true;
    }
    out.push(cookie);
  }
  return out;
}

function bodyComment(side, size) {
  const notes = [];
  if (side.body_truncated) notes.push(`cut: the first ${size} bytes were kept (--max-body-bytes, or not all captured)`);
  if (side.body_decode_error) notes.push(`not decoded: ${side.body_decode_error}`);
  return notes.join("; ") || null;
}

function ms(value) {
  return value === null || value === undefined || !Number.isFinite(Number(value)) ? null : Math.max(0, Number(value));
}

// Qtap's own files: the event is stamped at the transaction's end.
function startOf(ts, duration) {
  const end = Date.parse(ts);
  return Number.isFinite(end) ? new Date(end - duration).toISOString() : ts || "";
}

export function harEntry(row) {
  const tx = transactionOf(row) || {};
  const req = tx.request || {};
  const resp = tx.response || {};
  const meta = tx.metadata || {};
  const timing = tx.timing || {};
  const url = req.url || row.url;
  const duration = tx.duration_us != null ? Number(tx.duration_us) / 1000 : Number(tx.duration_ms ?? row.duration ?? 0);
  let [send, wait, receive] = [ms(timing.send_ms), ms(timing.wait_ms), ms(timing.receive_ms)];
  if (send === null && wait === null && receive === null) [send, wait, receive] = [0, duration, 0];
  [send, wait, receive] = [send ?? 0, wait ?? 0, receive ?? 0];
  const version = req.http_version || "HTTP/1.1";
  const reqBody = harContent(req.body, "request.body");
  const request = {
    method: req.method || row.method || "",
    url,
    httpVersion: version,
    cookies: requestCookies(req.headers),
    headers: harHeaders(req.headers),
    queryString: queryString(url),
    headersSize: -1,
    bodySize: req.body_size ?? reqBody.size,
  };
  if (reqBody.size) {
    const mime = req.content_type || "";
    request.postData = { mimeType: mime, text: reqBody.text };
    if (reqBody.encoding) request.postData._encoding = reqBody.encoding;
    else if (mime.split(";")[0].trim().toLowerCase() === "application/x-www-form-urlencoded") {
      request.postData.params = [...new URLSearchParams(reqBody.text)].map(([name, value]) => ({ name, value }));
    }
    const note = bodyComment(req, reqBody.size);
    if (note) request.postData.comment = note;
  }
  const respBody = harContent(resp.body, "response.body");
  const content = { size: respBody.size, mimeType: resp.content_type || "", text: respBody.text };
  if (respBody.encoding) content.encoding = respBody.encoding;
  const note = bodyComment(resp, respBody.size);
  if (note) content.comment = note;
  const entry = {
    startedDateTime: tx.started_at || startOf(row.ts, duration),
    // HAR: the sum of the timings.
    time: Math.round((send + wait + receive) * 1000) / 1000,
    request,
    response: {
      status: resp.status || 0,
      statusText: resp.reason || "",
      httpVersion: resp.http_version || version,
      cookies: responseCookies(resp.headers),
      headers: harHeaders(resp.headers),
      content,
      redirectURL: findHeader(resp.headers, "location") || "",
      headersSize: -1,
      bodySize: tx.response ? (resp.body_size ?? respBody.size) : -1,
    },
    cache: {},
    timings: { send, wait, receive },
    connection: meta.connection_id || row.connectionId || "",
    _process: { pid: meta.process_id ?? String(row.pid ?? ""), exe: meta.process_exe ?? row.exe },
    _requestId: row.id,
  };
  // The server's address: the peer, unless this side is the server.
  const server = tx.direction === "ingress" ? meta.local_address : meta.remote_address;
  if (server && server.ip) entry.serverIPAddress = server.ip;
  if (meta.container_name) entry._container = meta.container_name;
  if (tx.error || row.error) entry._error = tx.error || row.error;
  const flags = ["partial", "incomplete", "shed"].filter((f) => tx[f]);
  if (flags.length || tx.error) entry.comment = [...flags, ...(tx.error ? [String(tx.error)] : [])].join("; ");
  return entry;
}

// Why a row cannot be a HAR entry (a capture file's: its data is not a
// transaction), in the words of the agent's own export (har.py); null if it can.
function unconvertible(row) {
  const tx = transactionOf(row);
  if (tx === null || typeof tx !== "object" || Array.isArray(tx)) {
    return `${row.id}: its data is not a base64-encoded JSON transaction`;
  }
  if (!tx.request || typeof tx.request !== "object" || !tx.request.method) {
    return `${row.id}: not a transaction: it has no request.method`;
  }
  return null;
}

export function harDocument(rows, version) {
  // As /devtools/api/har and `qtap-devtools har`: a row that is not a
  // transaction is left out and the log says so, not made an entry of
  // empty fields (a failed request, to a HAR viewer).
  const skipped = [];
  const entries = [];
  for (const row of rows) {
    const why = unconvertible(row);
    if (why) {
      skipped.push(why);
      continue;
    }
    // A field har.py cannot convert either (a body that is not base64): left
    // out and said, as there; thrown, it stopped the whole export.
    try {
      entries.push(harEntry(row));
    } catch (err) {
      skipped.push(`${row.id}: ${err && err.message ? err.message : err}`);
    }
  }
  entries.sort((a, b) => (Date.parse(a.startedDateTime) || 0) - (Date.parse(b.startedDateTime) || 0));
  const log = {
    version: "1.2",
    creator: { name: "qtap-devtools", version: version || "" },
    pages: [],
    entries,
  };
  if (skipped.length) {
    const n = skipped.length;
    log.comment = `${n} transaction${n > 1 ? "s" : ""} left out, not convertible (first: ${skipped[0]})`;
  }
  return { log };
}
