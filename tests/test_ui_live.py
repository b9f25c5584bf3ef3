"""The DevTools page on live capture: a real curl request appears as a row."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests import realworld as rw
from tests.agentproc import agent, free_port
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
