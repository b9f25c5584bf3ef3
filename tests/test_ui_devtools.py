"""The DevTools page in a real browser (Debian's chromium), fed by `replay`."""

from __future__ import annotations

import json
import time

import pytest

from qtap_devtools.events import HttpMessage
from tests import samples
from tests.agentproc import free_port, get
from tests.uihelpers import (
    bulk_transactions,
    connection_state,
    copy_as_curl,
    detail_tab,
    open_devtools,
    replay_server,
    rich_session,
    row_ids,
    row_locator,
    rows,
    screenshot,
    screenshot_session,
    select_row,
    set_filter,
    shown_count,
    start_replay,
    total_count,
    wait_connected,
    wait_rows,
    wait_shown,
)

pytestmark = pytest.mark.browser

RICH_TRANSACTIONS = sum(1 for e in rich_session() if e.type == "request.http_transaction")


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """One replay server of the varied session, shared by the read-only tests."""
    with replay_server(tmp_path_factory.mktemp("rich")) as proc:
        yield proc


def opened(page, agent):
    open_devtools(page, agent.url)
    wait_rows(page, RICH_TRANSACTIONS)
    return page


def test_page_loads_without_console_errors(page, rich):
    opened(page, rich)
    # Visit every view and every detail tab: none may log an error.
    for text in ("/v1/users", "/login", "/img/logo.png", "/fonts/inter.woff2", "/api/stream"):
        select_row(page, text)
        for tab in ("headers", "payload", "response", "timing", "source"):
            detail_tab(page, tab).wait_for()
    page.click('[data-testid="view-processes"]')
    page.locator('[data-testid="process-row"]').first.wait_for()
    page.click('[data-testid="view-connections"]')
    page.locator('[data-testid="connection-row"]').first.wait_for()
    page.click('[data-testid="view-network"]')
    assert page.console.errors == []


def test_rows_appear_and_a_row_shows_headers_and_pretty_json(page, rich):
    opened(page, rich)
    texts = rows(page)
    assert len(texts) == RICH_TRANSACTIONS
    first = texts[0]
    for cell in ("POST", "200", "api.example.com", "/v1/users", "application/json", "python3.11 · 60895", "my-app"):
        assert cell in first

    select_row(page, "/v1/users")
    headers = detail_tab(page, "headers")
    request_headers = headers.locator('[data-testid="request-headers"]')
    assert "Authorization" in request_headers.inner_text()
    assert "Bearer token123" in request_headers.inner_text()
    assert "200 OK" in headers.locator('[data-testid="general"]').inner_text()

    payload = detail_tab(page, "payload")
    tree = payload.locator('[data-testid="json-view"]')
    assert tree.inner_text().split("\n") == ["{", '"user": "john"', "}"]

    response = detail_tab(page, "response")
    assert '"id": 123' in response.locator('[data-testid="json-view"]').inner_text()


def test_json_folds_and_other_bodies_have_their_viewers(page, rich):
    opened(page, rich)
    select_row(page, "/api/cart")
    tree = detail_tab(page, "response").locator('[data-testid="json-view"]')
    assert '"sku": "A-1"' in tree.inner_text()
    tree.locator(".j-toggle:not(.none)").first.click()  # fold the whole document
    assert tree.inner_text().replace("\n", "") == "{…} 2 keys"
    assert "sid=7f3a; HttpOnly; Secure" in detail_tab(page, "headers").inner_text()

    select_row(page, "/login")
    form = detail_tab(page, "payload").locator('[data-testid="request-body"]').inner_text()
    assert "Form Data" in form and "alice@example.com" in form and "hunter2" in form

    select_row(page, "/img/logo.png")
    img = detail_tab(page, "response").locator('[data-testid="response-image"]')
    img.wait_for()
    assert img.get_attribute("src").startswith("data:image/png;base64,iVBORw0KGgo")
    page.wait_for_function("() => document.querySelector('[data-testid=response-image]').naturalWidth === 24")

    select_row(page, "/fonts/inter.woff2")
    hexdump = detail_tab(page, "response").locator('[data-testid="hex-view"]').inner_text()
    assert hexdump.startswith("00000000  00 01 02 03 04 05 06 07  08 09 0a 0b")

    select_row(page, "/api/products")
    assert "Truncated" in detail_tab(page, "response").locator('[data-testid="notice-warn"]').inner_text()

    select_row(page, "/api/stream")
    assert "connection reset before response" in detail_tab(page, "headers").inner_text()
    source = detail_tab(page, "source").inner_text()
    for fact in ("4312", "/usr/bin/node", "app", "web", "web-7d9f8c6b5-x2x9q", "93.184.216.34:443", "TLS 1.3", "openssl"):
        assert fact in source


def test_text_filter_and_4xx_toggle_hide_exactly_the_right_rows(page, rich):
    opened(page, rich)
    set_filter(page, "shop.example.com")
    wait_shown(page, 6)
    assert all("shop.example.com" in r for r in rows(page))

    page.click('[data-testid="toggle-4xx"]')
    wait_shown(page, 1)
    assert [r.split(" | ")[4] for r in rows(page)] == ["/api/profile"]

    set_filter(page, "")  # the toggle alone: every 4xx, whatever the host
    wait_shown(page, 2)
    assert sorted(r.split(" | ")[2] for r in rows(page)) == ["404", "422"]

    set_filter(page, "node")  # process names are searched too
    wait_shown(page, 1)
    page.click('[data-testid="toggle-4xx"]')
    wait_shown(page, 8)  # node's 6 on shop.example.com and 2 on cdn.example.net
    set_filter(page, "my-app")  # and containers
    wait_shown(page, 3)
    set_filter(page, "-shop status:2xx")
    wait_shown(page, 5)
    assert not any("shop.example.com" in r for r in rows(page))
    assert page.get_attribute('[data-testid="summary-requests"]', "data-total") == str(RICH_TRANSACTIONS)


def test_har_export_holds_exactly_the_shown_rows(page, rich):
    opened(page, rich)
    set_filter(page, "api.example.com")
    wait_shown(page, 3)
    with page.expect_download() as info:
        page.click('[data-testid="export-har"]')
    download = info.value
    assert download.suggested_filename.endswith(".har")
    har = json.loads(open(download.path()).read())
    assert har["log"]["version"] == "1.2"
    assert har["log"]["creator"]["name"] == "qtap-devtools"
    entries = har["log"]["entries"]
    assert [e["request"]["url"] for e in entries] == [
        "https://api.example.com/v1/users",
        "https://api.example.com/v1/missing",
        "https://api.example.com/v1/crash",
    ]
    first = entries[0]
    assert first["request"]["method"] == "POST"
    assert first["request"]["postData"] == {"mimeType": "application/json", "text": '{"user": "john"}'}
    assert {"name": "Authorization", "value": "Bearer token123"} in first["request"]["headers"]
    assert first["response"]["status"] == 200
    assert first["response"]["content"]["text"] == '{"id": 123}'
    assert first["startedDateTime"].endswith("Z") and first["time"] == 81
    for key in ("cache", "timings"):
        assert key in first
    assert [e["response"]["status"] for e in entries] == [200, 404, 500]

    # The page and the agent's /devtools/api/har describe a transaction alike.
    _, server = get(f"{rich.url}/devtools/api/har")
    by_url = {e["request"]["url"]: e for e in server["log"]["entries"]}
    for entry in entries:
        theirs = by_url[entry["request"]["url"]]
        for key in ("startedDateTime", "time", "request", "timings", "connection", "serverIPAddress"):
            assert entry[key] == theirs[key], key
        assert {**entry["response"], "redirectURL": ""} == theirs["response"]


def test_copy_as_curl_rebuilds_the_request(page, rich):
    opened(page, rich)
    select_row(page, "/v1/users")
    command = copy_as_curl(page)
    assert command.startswith("curl 'https://api.example.com/v1/users'")
    assert "-H 'Authorization: Bearer token123'" in command
    assert "--data-raw '{\"user\": \"john\"}'" in command


def test_keyboard_moves_opens_and_closes(page, rich):
    opened(page, rich)
    table = page.locator('[data-testid="requests-table"]')
    table.focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.wait_for_selector('[data-testid="detail"]:not([hidden])')
    assert "/v1/missing" in page.inner_text('[data-testid="detail-title"]')
    page.keyboard.press("ArrowDown")  # the open pane follows the selection
    page.wait_for_function("() => document.querySelector('[data-testid=detail-title]').textContent.endsWith('/v1/crash')")
    page.keyboard.press("Escape")
    page.wait_for_selector('[data-testid="detail"]', state="hidden")


def test_processes_and_connections_views(page, rich):
    opened(page, rich)
    page.click('[data-testid="view-processes"]')
    procs = page.locator('[data-testid="process-row"]')
    procs.first.wait_for()
    assert procs.count() == 3
    assert "node server.js" in page.inner_text('[data-testid="processes-table"]')
    page.click('[data-testid="view-connections"]')
    conns = page.locator('[data-testid="connection-row"]')
    conns.first.wait_for()
    text = page.inner_text('[data-testid="connections-table"]')
    assert conns.count() == 5
    assert "closed" in text and "TLS 1.3 (openssl)" in text and "151.101.1.57:443" in text


def test_row_cap_drops_the_oldest_and_clear_empties(page, rich):
    open_devtools(page, rich.url, "?cap=10")
    wait_rows(page, 10)
    page.wait_for_timeout(300)  # every event has arrived: still 10
    assert total_count(page) == 10
    assert "/api/cart" in rows(page)[0]  # seed 003's three, the oldest, are gone
    page.click('[data-testid="clear"]')
    wait_shown(page, 0)
    assert total_count(page) == 0 and rows(page) == []


def test_pause_keeps_new_rows_until_resume(page, tmp_path):
    conn = samples.connection()
    events = [samples.transaction(conn, f"d4u9pause0000000000{i}", path=f"/tick/{i}", ts_offset_ms=36064 + i * 1500)
              for i in range(2)]
    with replay_server(tmp_path, events, args=("--speed", "1")) as agent:
        open_devtools(page, agent.url)
        wait_rows(page, 1)
        page.click('[data-testid="pause"]')
        page.wait_for_selector('[data-testid="paused-note"]:has-text("1 new")', timeout=5_000)
        assert total_count(page) == 1
        page.click('[data-testid="pause"]')
        wait_rows(page, 2)
        assert page.is_hidden('[data-testid="paused-note"]')


def test_captured_text_is_never_markup(page, tmp_path):
    """URLs, headers and bodies are untrusted: shown as text, never parsed."""
    evil = "<img src=x onerror=window.__pwned=1>"
    tx = samples.transaction(samples.connection(), "d4u9evil0000000000a0", method="GET",
                             path="/search?q=" + evil, status=200, response_body=evil.encode())
    tx.request = HttpMessage(headers={"X-Evil": evil}, body=b"", body_size=0)
    tx.response = HttpMessage(headers={"Content-Type": "text/html"}, body=evil.encode(),
                              body_size=len(evil), content_type="text/html")
    with replay_server(tmp_path, [tx]) as agent:
        open_devtools(page, agent.url)
        wait_rows(page, 1)
        select_row(page, "/search")
        assert evil in detail_tab(page, "headers").inner_text()
        assert evil in detail_tab(page, "response").inner_text()
        assert page.locator('img[src="x"]').count() == 0
        assert page.evaluate("window.__pwned") is None


def test_ten_thousand_rows_stay_responsive(page, tmp_path):
    n = 10_000
    with replay_server(tmp_path, bulk_transactions(n)) as agent:
        open_devtools(page, agent.url)
        wait_rows(page, n, timeout=40_000)
        assert total_count(page) == n
        assert row_locator(page).count() < 200  # virtualised: only the rows in view exist

        start = time.monotonic()
        table = page.locator('[data-testid="requests-table"]')
        table.evaluate("el => { el.scrollTop = el.scrollHeight; }")
        select_row(page, f"/v1/items/{n - 1}")
        response = detail_tab(page, "response")
        assert f'"item": {n - 1}' in response.locator('[data-testid="json-view"]').inner_text()
        assert time.monotonic() - start < 3

        table.focus()
        page.keyboard.press("Home")  # keyboard to the top and back again
        page.wait_for_function("() => document.querySelector('[data-testid=detail-title]').textContent.endsWith('/v1/items/0')")
        page.keyboard.press("End")
        page.wait_for_function(f"() => document.querySelector('[data-testid=detail-title]').textContent.endsWith('/v1/items/{n - 1}')")
        assert row_locator(page).count() < 200
        assert page.console.errors == []


def test_reconnect_shows_state_and_never_duplicates_rows(page, tmp_path):
    port = free_port()
    events = rich_session()
    first = samples.write_capture(tmp_path / "first.txt", events)
    later = samples.transaction(samples.connection(), "d4u9later00000000000", method="GET", path="/after/restart",
                                ts_offset_ms=40_000)
    second = samples.write_capture(tmp_path / "second.txt", [*events, later])

    server = start_replay(tmp_path, first, port, "first.log")
    try:
        open_devtools(page, server.url)
        wait_rows(page, RICH_TRANSACTIONS)
    finally:
        server.stop()
    page.wait_for_selector('[data-testid="status-connection"][data-state="reconnecting"]')
    assert "Reconnecting" in page.inner_text('[data-testid="status-connection"]')

    # The same port again, with one event more: the page resumes after the
    # last event it saw, and would drop repeats by requestId anyway.
    server = start_replay(tmp_path, second, port, "second.log")
    try:
        wait_connected(page, timeout=20_000)
        wait_rows(page, RICH_TRANSACTIONS + 1)
        page.wait_for_timeout(500)  # anything repeated would have arrived by now
        assert total_count(page) == RICH_TRANSACTIONS + 1
        ids = row_ids(page)
        assert len(ids) == len(set(ids)) == RICH_TRANSACTIONS + 1
        assert connection_state(page) == "connected"
    finally:
        server.stop()


def test_screenshot_of_rows_and_an_open_detail_pane(page, tmp_path):
    events = screenshot_session()
    n = sum(1 for e in events if e.type == "request.http_transaction")
    page.emulate_media(color_scheme="light")
    with replay_server(tmp_path, events) as agent:
        open_devtools(page, agent.url)
        wait_rows(page, n)
        select_row(page, "/api/cart")
        detail_tab(page, "response").locator('[data-testid="json-view"]').wait_for()
        page.locator('[data-testid="requests-table"]').focus()
        page.mouse.move(0, 0)  # no hover highlight in the picture
        path = screenshot(page)
    assert path.stat().st_size > 20_000
    assert shown_count(page) == n
