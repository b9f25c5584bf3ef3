"""A real OpenSSH server on loopback, and ``ssh -L`` tunnels through it.

The README's third way of using the agent is from a laptop, over
``ssh -L 10001:localhost:10001 user@server``.  Tests do the same on one
machine: a private ``sshd`` (its own configuration, host key and authorized key
in a temporary directory, listening on 127.0.0.1 only) and the real ``ssh``
client forwarding a local port to the agent's.  The machine's own sshd, its
``~/.ssh`` and its known hosts are not touched.

    with Sshd(tmp_path) as sshd, sshd.tunnel(10001, agent_port) as tunnel:
        ... http://localhost:10001/devtools ...
        tunnel.drop()      # the connection dies, as on a laptop's Wi-Fi
        tunnel.restore()
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from tests.agentproc import free_port

SSHD = Path("/usr/sbin/sshd")  # sshd re-executes itself: it must be started by absolute path
SSH = "ssh"


def _wait_listening(port: int, what: str, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout:.0f} s:\n"
                       f"{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sshd:
    def __init__(self, directory: Path) -> None:
        if not SSHD.exists():
            # Not a skip: make test installs openssh-server, so this is a broken set-up.
            raise RuntimeError(f"{SSHD} is missing; fix: make setup (installs openssh-server)")
        self.dir = directory / "sshd"
        self.port = free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "sshd.log"

    def __enter__(self) -> "Sshd":
        d = self.dir
        d.mkdir(parents=True)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
                           check=True, capture_output=True, timeout=30)
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        # The client trusts exactly this server's key: no "accept new key" bypass.
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "sshd_config").write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The temporary directory's modes are pytest's, not a home's.
            "StrictModes no\n"
            "AllowTcpForwarding local\n"
            "AllowAgentForwarding no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel VERBOSE\n"
        )
        # The privilege-separation directory, which the Debian service would create.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        subprocess.run([str(SSHD), "-t", "-f", str(d / "sshd_config")], check=True, capture_output=True, timeout=30)
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_listening(self.port, "sshd", self.proc, self.log)
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)

    @contextlib.contextmanager
    def tunnel(self, local_port: int, remote_port: int, remote_host: str = "localhost") -> Iterator["Tunnel"]:
        t = Tunnel(self, local_port, remote_host, remote_port)
        t.restore()
        try:
            yield t
        finally:
            t.drop()


class Tunnel:
    """``ssh -N -L local:remote_host:remote_port user@127.0.0.1`` through :class:`Sshd`."""

    def __init__(self, sshd: Sshd, local_port: int, remote_host: str, remote_port: int) -> None:
        self.sshd, self.local_port = sshd, local_port
        self.forward = f"{local_port}:{remote_host}:{remote_port}"
        self.proc: subprocess.Popen | None = None
        self.log = sshd.dir / f"ssh-{local_port}.log"

    def restore(self) -> None:
        """Open the tunnel (again), and wait until its local port listens."""
        d = self.sshd.dir
        cmd = [SSH, "-N", "-F", "/dev/null", "-i", str(d / "client_key"), "-p", str(self.sshd.port),
               "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "ExitOnForwardFailure=yes",
               "-L", self.forward, f"{self.sshd.user}@127.0.0.1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "SSH_AUTH_SOCK": ""})
        try:
            _wait_listening(self.local_port, f"ssh -L {self.forward}", self.proc, self.log)
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        """Kill the client: its forwarded connections die with it."""
        _stop(self.proc)
        self.proc = None
