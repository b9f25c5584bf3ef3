"""Serve a :class:`~qtap_devtools.server.Runtime` with uvicorn until a signal.

We own SIGINT/SIGTERM rather than uvicorn: on either, every SSE client first
gets ``system.disconnected`` and its stream ends, then uvicorn stops; the whole
shutdown is bounded so the process exits within two seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from typing import Awaitable, Callable

import uvicorn

from qtap_devtools.config import Listen
from qtap_devtools.server import Runtime, create_app

log = logging.getLogger(__name__)

DRAIN_SECONDS = 0.8  # for clients to read their goodbye before uvicorn closes sockets
STOP_REASON = "agent shutting down"  # the goodbye: to each client, and in the --output file


def listen_socket(listen: Listen) -> socket.socket:
    """The server's listening socket, or OSError saying plainly why not."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        return socket.create_server((listen.host, listen.port), family=family, backlog=2048)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += f" (another qtap-devtools? `ss -ltnp 'sport = :{listen.port}'` shows what holds it; or --listen)"
        raise OSError(f"cannot listen on {listen.url()}: {why}") from None


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

    # SIGHUP: the terminal or SSH session that ran the agent closed.  Stopped
    # as for Ctrl-C (clients told, probes removed at once), not killed by the
    # default action; under nohup it stays ignored.
    hangup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else []
    for sig in (signal.SIGINT, signal.SIGTERM, *hangup):
        loop.add_signal_handler(sig, request_stop, sig.name)

    # Bound here, not by uvicorn: uvicorn reports a port in use by exiting the
    # process from inside its task (a traceback and status 3), not by raising.
    sock = listen_socket(cfg.listen)
    serve_task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serve_task.done():
            exc = serve_task.exception()
            raise OSError(f"cannot serve on {cfg.listen.url()}: {exc or 'the server stopped at start'}")
        await asyncio.sleep(0.02)
    if rt.token:  # the page sets a cookie from ?token= once; curl sends a header
        page = f"{cfg.listen.url()}/devtools?token=<token, percent-encoded>"
        stream = f"{cfg.listen.url()}/devtools/api/events (with Authorization: Bearer <token>)"
    else:
        page, stream = f"{cfg.listen.url()}/devtools", f"{cfg.listen.url()}/devtools/api/events"
    print(f"qtap-devtools: serving {rt.mode} events on {stream} (DevTools page: {page})", flush=True)

    stop_wait = asyncio.create_task(stopping.wait())
    if on_started is not None:
        # Starting capture takes seconds (compiling the probes): a signal
        # meanwhile stops the agent now, not once capture runs.
        start_task = asyncio.create_task(on_started())
        await asyncio.wait({start_task, stop_wait, serve_task}, return_when=asyncio.FIRST_COMPLETED)
        if not start_task.done():
            start_task.cancel()
        elif not start_task.cancelled() and start_task.exception() is not None:
            raise start_task.exception()  # type: ignore[misc]
    await asyncio.wait({serve_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if on_stopping is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(on_stopping(), timeout=0.5)
    rt.broadcaster.close(STOP_REASON)
    deadline = loop.time() + DRAIN_SECONDS
    while rt.broadcaster.subscribers and loop.time() < deadline:
        await asyncio.sleep(0.02)
    stuck = len(rt.broadcaster.subscribers)
    if stuck:
        # Clients that stopped reading: their streams' writes never finish.
        # Cancelled (by uvicorn, or at asyncio.run's end), each logged a
        # traceback; their connections cut, each stream ends as a client's
        # going away does.
        for connection in list(server.server_state.connections):
            connection.transport.abort()
        while rt.broadcaster.subscribers and loop.time() < deadline + 0.2:
            await asyncio.sleep(0.01)
    server.should_exit = True
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(serve_task, timeout=1.0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    stop_wait.cancel()
    if stuck:
        print(f"qtap-devtools: {stuck} client(s) had not read their stream to its end within {DRAIN_SECONDS} s "
              "(stopped reading, or reading slowly); their streams were cut without their "
              "goodbye", flush=True)
    return 0
