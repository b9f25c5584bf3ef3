"""The DevTools page on live capture: a real curl request appears as a row."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from tests import realworld as rw
from tests.agentproc import agent, free_port, get
from tests.uihelpers import detail_tab, open_devtools, row_locator, select_row

pytestmark = [pytest.mark.kernel, pytest.mark.browser]


def test_a_real_curl_request_appears_and_shows_its_headers_and_json_body(page, tmp_path):
    port = free_port()
    cert = rw.make_cert(tmp_path)
    with agent(["run"], port, tmp_path / "agent.log", ready_path="/readyz"), rw.Nginx(tmp_path, cert) as nginx:
        open_devtools(page, f"http://127.0.0.1:{port}")
        marker = uuid.uuid4().hex[:10]
        body = json.dumps({"user": "john", "marker": marker})
        subprocess.run(["curl", "-sk", "-X", "POST", "-H", "Content-Type: application/json",
                        "-H", f"X-Marker: {marker}", "-d", body, nginx.url(f"/json?m={marker}")],
                       check=True, capture_output=True, timeout=30)
        row_locator(page).filter(has_text=marker).first.wait_for()
        row = select_row(page, marker)
        assert "POST" in row.inner_text() and "200" in row.inner_text()
        headers = detail_tab(page, "headers").locator('[data-testid="request-headers"]').inner_text()
        assert "X-Marker" in headers and marker in headers and "curl/" in headers
        tree = detail_tab(page, "payload").locator('[data-testid="json-view"]').inner_text()
        assert f'"marker": "{marker}"' in tree and '"user": "john"' in tree
        assert page.console.errors == []


def test_a_request_made_before_the_page_opened_is_shown(page, tmp_path):
    # The page asks the agent for what it still holds, not only what comes next.
    port = free_port()
    cert = rw.make_cert(tmp_path)
    with agent(["run"], port, tmp_path / "agent.log", ready_path="/readyz"), rw.Nginx(tmp_path, cert) as nginx:
        marker = uuid.uuid4().hex[:10]
        subprocess.run(["curl", "-sk", nginx.url(f"/json?m={marker}")], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 60
        while not any(marker in (t["summary"].get("request_url") or "")
                      for t in get(f"http://127.0.0.1:{port}/devtools/api/transactions")[1]["transactions"]):
            assert time.monotonic() < deadline, "the agent never had the request"
            time.sleep(0.1)
        open_devtools(page, f"http://127.0.0.1:{port}")
        row_locator(page).filter(has_text=marker).first.wait_for()
        assert page.console.errors == []
