"""A container's own libssl attached from its image layers at Docker's
``create``, before its first process: a fresh agent, the first run of that
image's own curl, captured on the client side.

Why ``docker create`` … wait … ``docker start -a`` rather than ``docker run``:
a warm daemon's ``docker run`` of curl is done ~140 ms after ``create``, and
the attach races it.  It wins most of the time now (the layers are read
from the image's inspect, the tuned analysis is asked of a warm worker, and
this image's libssl, a copy of the host's, is not analysed again), but a race
it stays.  Waiting for the agent to say the
layer's file is attached is what makes this test about the create-time attach
and the file's identity, not about the race."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from tests import dockerenv
from tests import realworld as rw
from tests.agentproc import agent, get
from tests.dockerenv import docker_daemon  # noqa: F401  (the fixture)
from tests.stream import StreamReader

pytestmark = [pytest.mark.kernel, pytest.mark.docker]


def port_in_range(lo: int = 14000, hi: int = 14999) -> int:
    """A free loopback port in the range the machine's tests may use."""
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def capture_stats(proc) -> dict:
    status, body = get(proc.url + "/devtools/api/stats")
    assert status == 200
    return body["capture"]


def test_a_created_containers_own_libssl_is_attached_before_it_starts_and_its_first_curl_captured(
        docker_daemon, tmp_path):
    image = dockerenv.ensure_tls_image()
    server_port = port_in_range()
    with rw.Nginx(tmp_path, rw.make_cert(tmp_path), port=server_port) as server:
        agent_port = port_in_range(server_port + 1)
        with agent(["run"], agent_port, tmp_path / "agent.log", ready_path="/readyz") as proc:
            deadline = time.monotonic() + 20
            while capture_stats(proc)["enrich"]["docker"]["state"] != "connected":
                assert time.monotonic() < deadline, "the agent never connected to Docker"
                time.sleep(0.1)
            reader = StreamReader(agent_port, "/devtools/api/events?snapshot=false")
            name = f"layers-{uuid.uuid4().hex[:8]}"
            m = uuid.uuid4().hex[:10]
            try:
                before = capture_stats(proc)
                cid = dockerenv.docker("create", "--network", "host", "--name", name, image, "/usr/bin/curl",
                                       "-sk", "--max-time", "10", server.url(f"/json?m={m}")).stdout.decode().strip()
                deadline = time.monotonic() + 20
                # layers_read counts a layer once all its files are attached
                # (attached_at_create counts each file as it goes).
                while (now := capture_stats(proc))["layers_read"] == before["layers_read"]:
                    assert time.monotonic() < deadline, f"the image's layers were not read: {now}\n" \
                        + proc.output()[-3000:]
                    time.sleep(0.05)
                assert now["attached_at_create"] > before["attached_at_create"], now
                assert now["roots_read"] == before["roots_read"]
                # The image's libssl is a copy of the host's, which the agent
                # analysed at its start: the same bytes, so the same plans,
                # and the worker that analysed the host's still warm.
                assert now["tuned_plans_reused"] > before["tuned_plans_reused"], now
                assert now["tuned_workers_started"] == 1 and now["tuned_analysis_failures"] == 0, now
                # Read from the image's inspect, which the daemon answers while
                # it is still starting a container (the container's waits).
                docker_now, docker_before = now["enrich"]["docker"], before["enrich"]["docker"]
                assert docker_now["layers_from_image"] == docker_before["layers_from_image"] + 1, docker_now
                attached = now["attachments"]
                dockerenv.docker("start", "-a", cid)
                tx = [t for t in reader.transactions(m, count=2) if t["direction"] != "ingress"]
                assert tx, f"the container's first curl was not captured on the client side; {reader.health()}\n" \
                    + proc.output()[-3000:]
                meta = tx[0]["metadata"]
                assert meta["container_id"] == cid[:12] and meta["container_name"] == name
                assert meta["container_image"] == image
                assert tx[0]["response"]["status"] == 200 and m in tx[0]["request"]["url"]
                # Its process's scans (its root's library directories, its maps)
                # found the files attached already: the same real files.
                time.sleep(1.5)
                after = capture_stats(proc)
                assert after["attachments"] == attached, proc.output()[-3000:]
            finally:
                reader.close()
                dockerenv.docker("rm", "-f", name, check=False)
