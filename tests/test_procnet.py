"""Sockets as /proc shows them: what start-up seeding relies on."""

from __future__ import annotations

import os
import socket

from qtap_devtools.capture import procnet


def test_seeded_sockets_know_which_side_accepted():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        try:
            assert port in procnet.listening_ports()
            mine = {s.fd: s for s in procnet.established_sockets() if s.pid == os.getpid()}
            assert mine[server.fileno()].accepted and mine[server.fileno()].local.port == port
            assert not mine[client.fileno()].accepted and mine[client.fileno()].remote.port == port
            assert procnet.resolve(os.getpid(), client.fileno()).local == mine[client.fileno()].local
        finally:
            client.close()
            server.close()
