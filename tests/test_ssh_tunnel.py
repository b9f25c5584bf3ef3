"""The agent from a laptop, over a real SSH tunnel (README, "Over an SSH tunnel").

The agent runs on a port of its own; ``ssh -L 10001:localhost:<agent port>``
through a real sshd gives the "laptop" side port 10001, so the seed's recipe
runs verbatim (it names localhost:10001), and the page is opened at
``http://localhost:10001``: a Host header that names a port the agent does not
listen on, as on a laptop.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from tests import realworld as rw
from tests.agentproc import agent, free_port, get
from tests.recipes import json_docs, recipes, run_recipe
from tests.sshenv import Sshd
from tests.uihelpers import connection_state, open_devtools, row_locator, wait_connected

pytestmark = [pytest.mark.kernel]

LAPTOP_PORT = 10001  # the port the README's tunnel opens on the laptop


@pytest.fixture(scope="module")
def tunnelled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssh")
    port = free_port()
    cert = rw.make_cert(tmp)
    with agent(["run"], port, tmp / "agent.log", ready_path="/readyz"), rw.Nginx(tmp, cert) as nginx, \
            Sshd(tmp) as sshd, sshd.tunnel(LAPTOP_PORT, port) as tunnel:
        yield SimpleNamespace(port=port, nginx=nginx, tunnel=tunnel, tmp=tmp)


def curl(url: str) -> None:
    subprocess.run(["curl", "-sk", url], check=True, capture_output=True, timeout=30)


def transactions_with(port: int, marker: str) -> list[dict]:
    """What the agent holds for ``marker``, asked directly (not through the tunnel)."""
    _, body = get(f"http://127.0.0.1:{port}/devtools/api/transactions")
    return [t for t in body["transactions"] if marker in (t["summary"].get("request_url") or "")]


def test_the_decode_recipe_runs_verbatim_through_the_tunnel(tunnelled):
    t = tunnelled
    m = uuid.uuid4().hex[:10]
    out = run_recipe(recipes()["Decode HTTP transaction bodies"], t.tmp, port=LAPTOP_PORT,
                     during=lambda: curl(t.nginx.url(f"/json?m={m}")),
                     until=lambda: len(transactions_with(t.port, m)) >= 2)
    decoded = [d for d in json_docs(out) if m in d["request"]["url"]]
    # Both ends of the one request: curl's and nginx's.
    assert sorted(d["direction"] for d in decoded) == ["egress-internal", "ingress"]
    assert all(d["response"]["status"] == 200 for d in decoded)


@pytest.mark.browser
def test_the_page_through_a_tunnel_that_drops_resumes_without_loss_or_doubles(tunnelled, page):
    t = tunnelled
    laptop = f"http://localhost:{LAPTOP_PORT}"
    open_devtools(page, laptop)
    before, during = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]

    curl(t.nginx.url(f"/json?m={before}"))
    row_locator(page).filter(has_text=before).nth(1).wait_for()  # curl's row and nginx's

    # The laptop's connection dies; the page says so and keeps retrying.
    t.tunnel.drop()
    deadline = time.monotonic() + 30
    while connection_state(page) != "reconnecting":
        assert time.monotonic() < deadline, f"the page still says {connection_state(page)!r}"
        time.sleep(0.05)

    # Traffic while the page cannot see the agent.
    curl(t.nginx.url(f"/json?m={during}"))
    deadline = time.monotonic() + 30
    while len(transactions_with(t.port, during)) < 2:
        assert time.monotonic() < deadline, "the agent never had the request made while the tunnel was down"
        time.sleep(0.1)

    t.tunnel.restore()
    wait_connected(page, timeout=30_000)
    row_locator(page).filter(has_text=during).nth(1).wait_for()
    time.sleep(1)  # anything doubled would have come with the resumed stream by now
    assert row_locator(page).filter(has_text=before).count() == 2
    assert row_locator(page).filter(has_text=during).count() == 2
    # Refused connections to the stream while the tunnel was down are the
    # browser's own network log; nothing else may be an error.
    others = [e for e in page.console.errors if "/devtools/api/events" not in e or "net::ERR_" not in e]
    assert others == [], json.dumps(page.console.errors, indent=1)
