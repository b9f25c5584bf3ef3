"""A Docker daemon for tests, and containers that need no image registry.

No image can be pulled here, so containers run an empty imported image
(``qtap-empty:latest``) with the host's ``/usr``, ``/lib``, ``/lib64``, ``/bin``
and ``/etc`` bind-mounted read-only, on the host's network (``--network
host``: only loopback traffic, nothing on Docker's bridge).

Two daemons are offered:

* :func:`shared_daemon` — the machine's daemon at ``/var/run/docker.sock``;
  started (``dockerd --bridge=none --iptables=false --ip-masq=false``) if none
  answers, stopped at interpreter exit if we started it.  The agent finds it
  at its default address, so end-to-end tests need no flag.
* :meth:`DockerDaemon.private` — a daemon of one's own under a temporary
  directory, with its own socket, for tests that stop and restart it.

Use in a test module::

    from dockerenv import docker_daemon  # noqa: F401  (the fixture)

    @pytest.mark.docker
    def test_something(docker_daemon):
        with docker_daemon.container("my-app", ["sleep", "60"], labels={"app": "x"}) as c:
            ... c.id, c.pid ...
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

EMPTY_IMAGE = "qtap-empty:latest"
DEFAULT_SOCKET = "/var/run/docker.sock"
HOST_MOUNTS = ("/usr", "/lib", "/lib64", "/bin", "/etc")


class DockerUnavailable(RuntimeError):
    """dockerd cannot run here; the message says why."""


def docker_cli() -> str | None:
    # Debian's client matches Debian's daemon (API 1.41); a newer client on
    # PATH also works, but its errors are about API negotiation, not ours.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable_reason() -> str | None:
    """Why no daemon can be started here, or None."""
    if os.geteuid() != 0:
        return "starting dockerd needs root"
    if shutil.which("dockerd") is None:
        return "no dockerd; fix: apt-get install docker.io"
    if docker_cli() is None:
        return "no docker client; fix: apt-get install docker.io"
    if shutil.which("containerd") is None:
        return "no containerd; fix: apt-get install containerd"
    return None


@dataclass
class Container:
    id: str
    name: str
    pid: int  # of its first process, in the host's pid namespace
    daemon: "DockerDaemon" = field(repr=False)

    def inspect(self) -> dict:
        return self.daemon.inspect(self.id)

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.daemon.docker("exec", self.id, *argv, timeout=timeout)

    def remove(self) -> None:
        self.daemon.docker("rm", "-f", self.id, check=False)


# socket path → the dockerd this test process started there.
_STARTED: dict[str, subprocess.Popen] = {}


class DockerDaemon:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, root: Path | None = None):
        self.socket_path = socket_path
        self.root = root  # None: dockerd's own defaults (/var/lib/docker, /var/run/docker)
        self.log_path = (root / "dockerd.log") if root else Path(tempfile.gettempdir()) / "qtap-dockerd.log"

    @classmethod
    def private(cls) -> "DockerDaemon":
        """A daemon under a fresh directory.  The directory is short (unix
        socket paths are limited to 107 bytes, and containerd nests its own)."""
        root = Path(tempfile.mkdtemp(prefix="qd-", dir="/tmp"))
        return cls(socket_path=str(root / "docker.sock"), root=root)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def started_by_us(self) -> bool:
        """Whether this test process started the daemon (whichever object did):
        only then may a test stop it."""
        return self.socket_path in _STARTED

    owned = started_by_us

    @property
    def _proc(self) -> subprocess.Popen | None:
        return _STARTED.get(self.socket_path)

    @_proc.setter
    def _proc(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            _STARTED.pop(self.socket_path, None)
        else:
            _STARTED[self.socket_path] = proc

    # --------------------------------------------------------------- process

    def answers(self, timeout: float = 10) -> bool:
        try:
            return self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def ensure(self, timeout: float = 60) -> "DockerDaemon":
        """Use the daemon if it answers, else start it."""
        if not self.answers():
            self.start(timeout)
        return self

    def start(self, timeout: float = 60) -> None:
        reason = unavailable_reason()
        if reason:
            raise DockerUnavailable(reason)
        argv = [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false" if _dockerd_has_flag("--ip6tables") else "",
            "-H",
            self.url,
        ]
        if self.root is not None:
            argv += [
                "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "docker.pid"),
            ]
        argv = [a for a in argv if a]
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if self.answers():  # another test run started it at the same moment
                    return
                raise DockerUnavailable(f"dockerd exited at start; its log ({self.log_path}):\n{self.log_tail()}")
            if self.answers(timeout=5):
                return
            time.sleep(0.2)
        self.stop()
        raise DockerUnavailable(f"dockerd did not answer in {timeout}s; its log:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the daemon we started (containers stop with it)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # dockerd's containerd is its child; wait until its socket is gone so
        # a restart does not race it.
        if self.root is not None:
            sock = self.root / "exec" / "containerd" / "containerd.sock"
            end = time.monotonic() + 10
            while sock.exists() and time.monotonic() < end:
                time.sleep(0.1)

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop it, and delete a private daemon's directory."""
        self.stop()
        if self.root is not None:
            # dockerd leaves its exec-root's netns/default (an nsfs mount) behind.
            for mount_point in reversed(_mounts_under(self.root)):
                subprocess.run(["umount", "-l", mount_point], capture_output=True)
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------ the client

    def docker(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        cli = docker_cli()
        if cli is None:
            raise DockerUnavailable("no docker client; fix: apt-get install docker.io")
        result = subprocess.run(
            [cli, "-H", self.url, *args], input=input, capture_output=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("inspect", ref).stdout)[0]

    def ensure_image(self) -> str:
        """Import the empty image unless it is there: ``tar`` of nothing →
        ``docker import``."""
        if self.docker("image", "inspect", EMPTY_IMAGE, check=False).returncode != 0:
            empty_tar = subprocess.run(
                ["tar", "cf", "-", "--files-from", "/dev/null"], capture_output=True, check=True
            ).stdout
            self.docker("import", "-", EMPTY_IMAGE, input=empty_tar)
        return EMPTY_IMAGE

    def run(
        self,
        name: str,
        command: Sequence[str],
        *,
        labels: dict[str, str] | None = None,
        hostname: str | None = None,
        extra: Sequence[str] = (),
    ) -> Container:
        """Start ``command`` in a container of the empty image; a container of
        the same name left by an earlier run is removed first."""
        self.ensure_image()
        self.docker("rm", "-f", name, check=False)
        cid = self.docker(*_run_argv(name, command, labels, hostname, extra, True)).stdout.decode().strip()
        pid = self.inspect(cid)["State"]["Pid"]
        return Container(id=cid, name=name, pid=pid, daemon=self)

    @contextlib.contextmanager
    def container(self, name: str, command: Sequence[str], **kwargs) -> Iterator[Container]:
        c = self.run(name, command, **kwargs)
        try:
            yield c
        finally:
            c.remove()


TLS_IMAGE = "qtap-curl-own-libs:latest"


def ensure_tls_image() -> str:
    """An image carrying its own copy of curl and every library it loads
    (libssl among them) in its layer, as a real image does: its files are
    seen through the container's overlay root, not bind-mounted from the host."""
    shared_daemon()
    if _shared.docker("image", "inspect", TLS_IMAGE, check=False).returncode == 0:
        return TLS_IMAGE
    files = ["/usr/bin/curl", "/usr/bin/sleep"]
    for binary in ("/usr/bin/curl", "/usr/bin/sleep"):
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        files += [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for f in dict.fromkeys(files):
            dest = root / f.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(f), dest)  # a copy: its own inode, in the image's layer
        tar = subprocess.run(["tar", "cf", "-", "-C", tmp, "."], capture_output=True, check=True).stdout
    _shared.docker("import", "-", TLS_IMAGE, input=tar)
    return TLS_IMAGE


def run_image(name: str, image: str, *command: str) -> subprocess.CompletedProcess:
    """``docker run -d`` of ``image`` as it is (no host mounts), on the host's network."""
    _shared.docker("rm", "-f", name, check=False)
    return _shared.docker("run", "-d", "--network", "host", "--name", name, image, *command)


def _run_argv(
    name: str, command: Sequence[str], labels: dict[str, str] | None, hostname: str | None,
    extra: Sequence[str], detach: bool,
) -> list[str]:
    argv = ["run", *(["-d"] if detach else []), "--network", "host", "--name", name]
    for path in HOST_MOUNTS:
        if os.path.exists(path):  # a merged-/usr symlink is resolved by docker
            argv += ["-v", f"{path}:{path}:ro"]
    if hostname:
        argv += ["--hostname", hostname]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    return [*argv, *extra, EMPTY_IMAGE, *command]


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        return []
    return [p for p in points if p.startswith(prefix)]


def _dockerd_has_flag(flag: str) -> bool:
    try:
        out = subprocess.run(["dockerd", "--help"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag.encode() in out


Daemon = DockerDaemon  # the name the end-to-end tests use

_shared = DockerDaemon()
_image_ready = False


def shared_daemon() -> DockerDaemon:
    """The machine's daemon, started if it does not answer (another test may
    have stopped it).  Raises :class:`DockerUnavailable` with the reason when
    it cannot run.  A daemon we started is stopped when the tests end."""
    global _image_ready
    was_ours = _shared.started_by_us
    _shared.ensure()
    if _shared.started_by_us and not was_ours:
        atexit.register(_shared.stop)
        _image_ready = False
    if not _image_ready:
        _shared.ensure_image()
        _image_ready = True
    return _shared


# ------------------------------------------ module-level helpers, shared daemon


def docker(*args: str, input: bytes | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """The docker client against the shared daemon's socket."""
    return _shared.docker(*args, input=input, check=check, timeout=timeout)


def run(
    name: str,
    *command: str,
    labels: dict[str, str] | None = None,
    hostname: str | None = None,
    detach: bool = False,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """``docker run`` on the shared daemon: to completion (the container is
    kept for inspection; remove it with ``docker("rm", "-f", name)``), or
    ``detach=True`` to leave it running."""
    shared_daemon()
    _shared.docker("rm", "-f", name, check=False)
    return _shared.docker(*_run_argv(name, command, labels, hostname, (), detach), check=check, timeout=timeout)


def container_id(name: str) -> str:
    return docker("inspect", "--format", "{{.Id}}", name).stdout.decode().strip()


@pytest.fixture(scope="session")
def docker_daemon() -> DockerDaemon:
    """The shared daemon; the test is skipped with the reason when there is
    none (a failure under CI=true, see conftest.py)."""
    try:
        return shared_daemon()
    except DockerUnavailable as exc:
        pytest.skip(f"no Docker daemon: {exc}")


@pytest.fixture
def private_docker_daemon() -> Iterator[DockerDaemon]:
    """A daemon of the test's own, which it may stop and restart."""
    daemon = DockerDaemon.private()
    try:
        daemon.start()
    except DockerUnavailable as exc:
        daemon.cleanup()
        pytest.skip(f"cannot start dockerd: {exc}")
    try:
        daemon.ensure_image()
        yield daemon
    finally:
        daemon.cleanup()
