"""Serve a :class:`~qtap_devtools.server.Runtime` with uvicorn until a signal.

We own SIGINT/SIGTERM rather than uvicorn: on either, every SSE client first
gets ``system.disconnected`` and its stream ends, then uvicorn stops; the whole
shutdown is bounded so the process exits within two seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Awaitable, Callable

import uvicorn

from qtap_devtools.server import Runtime, create_app

log = logging.getLogger(__name__)

DRAIN_SECONDS = 0.8  # for clients to read their goodbye before uvicorn closes sockets


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # we install our own handlers
        yield


async def serve(
    rt: Runtime,
    *,
    on_started: Callable[[], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> int:
    cfg = rt.config
    app = create_app(rt)
    config = uvicorn.Config(
        app,
        host=cfg.listen.host,
        port=cfg.listen.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        ws="none",
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def request_stop(signame: str) -> None:
        if stopping.is_set():
            server.force_exit = True  # a second Ctrl-C: stop now
            return
        log.info("%s received; shutting down", signame)
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop, sig.name)

    serve_task = asyncio.create_task(server.serve())
    while not server.started:
        if serve_task.done():
            # uvicorn exits (rather than raises) when it cannot bind.
            exc = serve_task.exception()
            raise OSError(f"cannot listen on {cfg.listen.url()}: {exc or 'address in use or not permitted'}")
        await asyncio.sleep(0.02)
    print(f"qtap-devtools: serving {rt.mode} events on {cfg.listen.url()}/devtools/api/events "
          f"(DevTools page: {cfg.listen.url()}/devtools)", flush=True)
    if on_started is not None:
        await on_started()

    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({serve_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if on_stopping is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(on_stopping(), timeout=0.5)
    rt.broadcaster.close("agent shutting down")
    deadline = loop.time() + DRAIN_SECONDS
    while rt.broadcaster.subscribers and loop.time() < deadline:
        await asyncio.sleep(0.02)
    server.should_exit = True
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(serve_task, timeout=1.0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    stop_wait.cancel()
    return 0
