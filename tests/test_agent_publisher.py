"""The agent's publisher: container metadata is waited for at most 50 ms per
event, counted from when the event was made, not from when its turn came."""

from __future__ import annotations

import asyncio
import dataclasses

from qtap_devtools import publisher as publisher_mod
from qtap_devtools.agent import Agent
from qtap_devtools.config import Config
from qtap_devtools.enrich.model import ContainerInfo, ProcessInfo
from qtap_devtools.events import ProcessStarted

IN_CONTAINER = ProcessInfo(pid=4242, ppid=1, exe="/usr/bin/curl", binary="curl", cmdline="curl x", uid=0,
                           user="root", hostname="c1", start_time_ns=1, container_id="ab" * 32)


class SlowDocker:
    """Stands in for an enricher whose Docker lookup never answers in time."""

    docker = None  # no prefetch: the wait itself is what is measured

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def process_enriched(self, pid: int, timeout: float) -> ProcessInfo | None:
        self.waits.append(timeout)
        await asyncio.sleep(timeout)
        return IN_CONTAINER


def agent_publishing_to_a_list(enricher=None) -> tuple[Agent, list]:
    """An agent (no capture) whose publisher asks ``enricher``, and the list its events are published to."""
    agent = Agent(Config(docker=False))
    if enricher is not None:
        agent.publisher.enricher = enricher
    published: list = []
    agent.broadcaster.add_listener(published.append)
    return agent, published


def test_queued_events_share_one_wait_for_a_slow_lookup():
    async def go():
        slow = SlowDocker()
        agent, published = agent_publishing_to_a_list(slow)
        for _ in range(10):
            agent.publisher.emit(ProcessStarted(IN_CONTAINER))
        task = asyncio.create_task(agent.publisher.run())
        while len(published) < 10:
            await asyncio.sleep(0.01)
        task.cancel()
        return slow.waits, published

    waits, published = asyncio.run(go())
    assert len(waits) == 10 and waits[0] > 0
    # Made together, their deadlines passed together: the events behind the
    # first wait nothing more (10 x 50 ms would hold the stream half a second).
    assert all(w == 0 for w in waits[1:]), waits
    assert len(published) == 10
    # Not named in time, but still in their container: the id is the cgroup's.
    assert {(p.envelope.body["data"]["container"]["id"], p.envelope.body["data"]["container"]["name"])
            for p in published} == {("ab" * 6, None)}


def test_an_event_whose_container_arrives_in_time_carries_it():
    named = dataclasses.replace(IN_CONTAINER, container=ContainerInfo(id="ab" * 32, name="my-app", image="img", runtime="docker"))

    class Docker:
        docker = None

        async def process_enriched(self, pid, timeout):
            return named

    async def go():
        agent, published = agent_publishing_to_a_list(Docker())
        agent.publisher.emit(ProcessStarted(IN_CONTAINER))
        task = asyncio.create_task(agent.publisher.run())
        while not published:
            await asyncio.sleep(0.01)
        task.cancel()
        return published

    (item,) = asyncio.run(go())
    assert item.envelope.body["data"]["container"]["name"] == "my-app"
    assert publisher_mod.ENRICH_WAIT_SECONDS == 0.05


def test_the_process_snapshot_leaves_kernel_threads_out():
    agent, published = agent_publishing_to_a_list()
    kworker = dataclasses.replace(IN_CONTAINER, pid=77, exe="", binary="kworker/0:1", cmdline="", container_id=None)
    curl = dataclasses.replace(IN_CONTAINER, pid=78, container_id=None)
    agent.enricher.list_pids = lambda: [77, 78]
    agent.enricher.process = {77: kworker, 78: curl}.get
    agent._snapshot_processes()
    assert [p.envelope.body["data"]["pid"] for p in published] == [78]


def test_an_event_made_while_another_waits_for_its_container_is_published_after_it():
    host_process = dataclasses.replace(IN_CONTAINER, pid=43, container_id=None)

    async def go():
        slow = SlowDocker()
        agent, published = agent_publishing_to_a_list(slow)
        agent.publisher.emit(ProcessStarted(host_process))  # nothing before it: published at once
        agent.publisher.emit(ProcessStarted(IN_CONTAINER))  # waits for its container's name
        task = asyncio.create_task(agent.publisher.run())
        while not slow.waits:  # taken from the queue: the queue is empty while it waits
            await asyncio.sleep(0.001)
        agent.publisher.emit(ProcessStarted(dataclasses.replace(host_process, pid=44)))
        while len(published) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        return [p.envelope.body["data"]["pid"] for p in published]

    assert asyncio.run(go()) == [43, 4242, 44]
