"""The page's Copy as cURL (ui/export.js), run for real: the command it
builds, pasted into sh (dash) and bash, must send the captured bytes again."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import threading
from pathlib import Path

import pytest

EXPORT_JS = Path(__file__).resolve().parent.parent / "qtap_devtools" / "ui" / "export.js"


def curl_command(tx: dict) -> str:
    row = {"data": base64.b64encode(json.dumps(tx).encode()).decode()}
    # The row on stdin: a megabyte body is past what one argument may hold.
    script = (f"import('{EXPORT_JS}').then(async (m) => {{ let s = ''; for await (const c of process.stdin) s += c;"
              " process.stdout.write(m.curlCommand(JSON.parse(s))); })")
    return subprocess.run(["node", "-e", script], input=json.dumps(row), capture_output=True, text=True, timeout=30,
                          check=True).stdout


@pytest.fixture
def echo():
    got: list[tuple[dict, bytes]] = []

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the connection stays open, as a real server's

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def do_HEAD(self):  # noqa: N802
            got.append((dict(self.headers), b""))
            self.send_response(200)
            self.send_header("Content-Length", "5")  # the GET's body, not sent: a HEAD's answer has none
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", got
    server.shutdown()


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("body", [bytes(range(256)), b"line one\r\nline 'two' 100% \\done\x00"])
def test_a_binary_body_is_sent_back_byte_for_byte(echo, shell, body):
    """A NUL ended bash's $'...' argument (241 of 1,188 bytes of a PNG upload
    reached curl), and sh did not know $'...' at all."""
    url, got = echo
    tx = {"request": {"method": "POST", "url": f"{url}/upload", "body": base64.b64encode(body).decode(),
                      "headers": {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"}}}
    command = curl_command(tx)
    subprocess.run([shell, "-c", command], check=True, capture_output=True, timeout=30)
    (headers, received), = got
    assert received == body
    # Accept-Encoding: identity is sent as it was, not turned into --compressed.
    assert headers.get("Accept-Encoding") == "identity" and "--compressed" not in command


def test_an_http2_request_is_sent_again_without_its_pseudo_headers(echo):
    """HTTP/2 carries method, path and host as pseudo-headers (":method"…);
    curl writes its own, and one passed with -H would go out as a bogus field."""
    url, got = echo
    tx = {"request": {"method": "POST", "url": f"{url}/h2", "http_version": "HTTP/2",
                      "body": base64.b64encode(b'{"a":1}').decode(),
                      "headers": {":method": "POST", ":scheme": "https", ":authority": "api.example.test",
                                  ":path": "/h2", "x-trace": "t-1"}}}
    command = curl_command(tx)
    assert "--http2" in command and "':" not in command
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=30)
    (headers, received), = got
    assert received == b'{"a":1}' and headers.get("x-trace") == "t-1"
    assert not [name for name in headers if name.startswith(":")]


@pytest.mark.parametrize("decode_error", [None, "gzip decoding failed: invalid header"])
def test_a_body_the_agent_decoded_is_sent_without_its_content_encoding(echo, decode_error):
    """The transaction keeps a gzip request body decoded (8 B of 28 on the
    wire): sent with its Content-Encoding: gzip, the server got plain bytes
    labelled gzip.  A body the agent could not decode is the bytes as sent,
    and keeps the label."""
    url, got = echo
    body = b"x=1&y=22" if decode_error is None else b"\x1f\x8bnot really gzip"
    tx = {"request": {"method": "POST", "url": f"{url}/coded", "body": base64.b64encode(body).decode(),
                      "body_size": 28, "body_captured": len(body), "body_truncated": False,
                      "content_encoding": "gzip", "body_decode_error": decode_error,
                      "headers": {"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip",
                                  "Content-Length": "28"}}}
    subprocess.run(["sh", "-c", curl_command(tx)], check=True, capture_output=True, timeout=30)
    (headers, received), = got
    assert received == body and headers.get("Content-Length") == str(len(body))
    assert headers.get("Content-Encoding") == (None if decode_error is None else "gzip")


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_a_large_cut_body_goes_through_stdin_and_the_command_says_it_was_cut(echo, shell, tmp_path):
    """1 MiB kept of a 4 MB POST, in one --data-raw argument: curl never ran
    ("Argument list too long": Linux takes at most 128 KiB in one argument),
    and nothing said the body sent again was not the whole."""
    url, got = echo
    # Plain text, no control bytes: what went as --data-raw.
    body = b",".join(b'{"row":%d,"note":"it\'s 100%% text"}' % i for i in range(40_000))[:1 << 20]
    tx = {"request": {"method": "POST", "url": f"{url}/big", "body": base64.b64encode(body).decode(),
                      "body_size": 4_000_000, "body_captured": len(body), "body_truncated": True,
                      "headers": {"Content-Type": "application/json", "Content-Length": "4000000"}}}
    command = curl_command(tx)
    assert command.startswith("# the body was cut at capture: 1048576 of 4000000 bytes")
    # Pasted, as a user would: a script file (sh -c would pass it all as one argument).
    script = tmp_path / "paste.sh"
    script.write_text(command + "\n")
    subprocess.run([shell, str(script)], check=True, capture_output=True, timeout=60)
    (_, received), = got
    assert received == body


def test_a_whole_body_says_nothing_of_a_cut(echo):
    url, _ = echo
    tx = {"request": {"method": "POST", "url": f"{url}/small", "body": base64.b64encode(b"a=1").decode(),
                      "body_size": 3, "body_captured": 3, "body_truncated": False, "headers": {}}}
    assert curl_command(tx).startswith("curl ")


def test_a_head_request_is_sent_as_curls_head_and_does_not_hang(echo):
    """`curl URL -X 'HEAD'` waited for the 5 bytes the answer's
    Content-Length promised, on a connection the server kept open."""
    url, got = echo
    tx = {"request": {"method": "HEAD", "url": f"{url}/file", "body": "", "headers": {"Accept": "*/*"}}}
    command = curl_command(tx)
    assert "-X" not in command and " -I" in command
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and "Content-Length: 5" in done.stdout
    (headers, _), = got
    assert headers.get("Accept") == "*/*"
