"""Process identity from /proc: the test's own process, real children, and a
fake /proc for what cannot be staged for real (a container's passwd, a pid
that vanishes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtap_devtools.enrich.procfs import list_pids, parse_stat, read_process, read_start_time_ns

CONTAINER_ID = "f1244ec10b889b3b7d1aaed41f7c03d70ff2f293504b57d41bbe1416f1e28314"


@pytest.fixture
def child():
    procs = []

    def spawn(argv, **kwargs):
        p = subprocess.Popen(argv, **kwargs)
        procs.append(p)
        _wait_exec(p.pid, argv[0])
        return p

    yield spawn
    for p in procs:
        p.kill()
        p.wait()


def _wait_exec(pid: int, path: str) -> None:
    # Popen returns after fork; exec may not have happened yet.
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            if os.readlink(f"/proc/{pid}/exe").startswith(os.path.realpath(path)):
                return
        except OSError:
            pass
        time.sleep(0.01)


def test_own_process():
    info = read_process(os.getpid())
    assert info is not None
    assert info.pid == os.getpid()
    assert info.ppid == os.getppid()
    assert info.exe == os.path.realpath(sys.executable)
    assert info.binary == os.path.basename(info.exe)
    assert info.uid == os.geteuid()
    assert info.hostname == socket.gethostname()
    assert info.container_id is None and info.container is None
    # /proc's start time is in clock ticks since boot; in wall clock it is in the past.
    assert 0 < time.time_ns() - info.start_time_ns < 24 * 3600 * 10**9


def test_child_process_argv_user_and_start_time(child):
    before = time.time_ns()
    kwargs = {"user": 65534} if os.geteuid() == 0 else {}
    # An argument with a space, to a process that stays up: `sleep 30 -- "two
    # words"` exits at once ("invalid time interval") and raced the reads.
    script = "import time; time.sleep(30)"
    p = child([sys.executable, "-c", script, "two words"], **kwargs)
    assert p.poll() is None
    info = read_process(p.pid)
    assert info is not None
    assert info.ppid == os.getpid()
    assert info.exe == os.path.realpath(sys.executable)
    assert info.binary == os.path.basename(os.path.realpath(sys.executable))
    assert info.cmdline == f"{sys.executable} -c {script} two words"
    if os.geteuid() == 0:
        assert (info.uid, info.user) == (65534, "nobody")
    # Clock ticks are 10 ms; allow for them and for the boot-time estimate.
    assert before - 50_000_000 <= info.start_time_ns <= time.time_ns() + 50_000_000
    assert read_start_time_ns(p.pid) == info.start_time_ns


def test_comm_with_parentheses_and_a_deleted_binary(child, tmp_path):
    odd = tmp_path / "a) b (c"
    shutil.copy("/bin/sleep", odd)
    p = child([str(odd), "30"])
    odd.unlink()  # an upgraded package leaves running processes like this
    info = read_process(p.pid)
    assert info is not None
    assert info.exe == str(odd)  # " (deleted)" stripped
    assert info.binary == "a) b (c"
    assert info.ppid == os.getpid()


def test_exited_process_is_none():
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    assert read_process(p.pid) is None
    assert read_start_time_ns(p.pid) is None


def test_list_pids_holds_ourselves_and_children(child):
    p = child(["/bin/sleep", "30"])
    pids = list_pids()
    assert os.getpid() in pids and p.pid in pids
    assert list_pids("/nonexistent") == []


def test_parse_stat_takes_fields_after_the_last_paren():
    stat = "77 (x) (y) S 5 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0"
    assert parse_stat(stat) == ("x) (y", 5, 123456)
    assert parse_stat("77 (truncated") is None
    assert parse_stat("") is None


# --------------------------------------------------------------- fake /proc


def _fake_process(
    root: Path,
    pid: int,
    *,
    comm: str = "python3.11",
    exe: str | None = "/usr/local/bin/python3.11",
    cmdline: bytes = b"python3.11\0app.py\0",
    uid: int = 1000,
    cgroup: str = "0::/user.slice/session-1.scope\n",
    uts: str = "uts:[4026531838]",
    fs: Path | None = None,
    starttime: int = 5000,
) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {starttime} 0 0\n")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n")
    (d / "cmdline").write_bytes(cmdline)
    (d / "cgroup").write_text(cgroup)
    if exe is not None:
        os.symlink(exe, d / "exe")
    os.symlink(uts, d / "ns" / "uts")
    if fs is not None:
        os.symlink(fs, d / "root")


@pytest.fixture
def fake_proc(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text("cpu 0 0 0 0\nbtime 1765557000\n")
    _fake_process(root, 1, comm="systemd", exe="/usr/lib/systemd/systemd", uid=0)
    return root


def _container_fs(tmp_path: Path, hostname: str, passwd: str) -> Path:
    fs = tmp_path / "rootfs"
    (fs / "etc").mkdir(parents=True)
    (fs / "etc" / "hostname").write_text(hostname + "\n")
    (fs / "etc" / "passwd").write_text(passwd)
    return fs


def test_containerised_process_uses_its_own_passwd_and_hostname(fake_proc, tmp_path):
    # uid 1000 is "appuser" in the image, whoever it is on the host.
    fs = _container_fs(tmp_path, "my-container", "root:x:0:0:root:/root:/bin/sh\nappuser:x:1000:1000::/app:/bin/sh\n")
    _fake_process(
        fake_proc, 60895, uid=1000, uts="uts:[4026532178]", fs=fs,
        cgroup=f"0::/system.slice/docker-{CONTAINER_ID}.scope\n",
    )
    info = read_process(60895, str(fake_proc))
    assert info is not None
    assert (info.uid, info.user, info.hostname) == (1000, "appuser", "my-container")
    assert (info.container_id, info.runtime) == (CONTAINER_ID, "docker")
    assert (info.exe, info.binary, info.cmdline) == ("/usr/local/bin/python3.11", "python3.11", "python3.11 app.py")
    # btime 1765557000 s + 5000 ticks
    assert info.start_time_ns == 1765557000 * 10**9 + 5000 * 10**9 // os.sysconf("SC_CLK_TCK")


def test_uid_unknown_everywhere_is_shown_as_the_number(fake_proc, tmp_path):
    fs = _container_fs(tmp_path, "c1", "root:x:0:0:root:/root:/bin/sh\n")
    _fake_process(fake_proc, 70, uid=4321987, uts="uts:[4026532999]", fs=fs)
    info = read_process(70, str(fake_proc))
    assert info is not None and info.user == "4321987"


def test_same_uts_namespace_as_pid1_means_the_system_hostname(fake_proc, tmp_path):
    fs = _container_fs(tmp_path, "not-this-one", "")
    _fake_process(fake_proc, 71, uts="uts:[4026531838]", fs=fs)
    info = read_process(71, str(fake_proc))
    assert info is not None and info.hostname == socket.gethostname()


def test_kernel_thread_or_zombie_without_exe_uses_comm(fake_proc):
    _fake_process(fake_proc, 2, comm="kthreadd", exe=None, cmdline=b"", uid=0)
    info = read_process(2, str(fake_proc))
    assert info is not None
    assert (info.exe, info.binary, info.cmdline) == ("", "kthreadd", "")


def test_process_that_vanishes_mid_read_keeps_what_was_read(fake_proc):
    # stat was readable, then the rest disappeared: still reported, with fallbacks.
    d = fake_proc / "72"
    d.mkdir()
    (d / "stat").write_text("72 (curl) S 1 72 72 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 900 0 0\n")
    info = read_process(72, str(fake_proc))
    assert info is not None
    assert (info.binary, info.exe, info.cmdline, info.uid, info.user) == ("curl", "", "", -1, "")


def test_vanished_pid_and_garbage_stat_are_none(fake_proc):
    assert read_process(999999, str(fake_proc)) is None
    d = fake_proc / "73"
    d.mkdir()
    (d / "stat").write_text("garbage")
    assert read_process(73, str(fake_proc)) is None


def test_parsed_passwd_files_are_bounded_and_what_is_let_go_is_counted(tmp_path, monkeypatch):
    from qtap_devtools.enrich import procfs

    monkeypatch.setattr(procfs, "PASSWD_CACHE_SIZE", 2)
    monkeypatch.setattr(procfs, "_passwd_cache", type(procfs._passwd_cache)())
    monkeypatch.setattr(procfs, "passwd_evicted", 0)
    for i in range(5):
        f = tmp_path / f"passwd{i}"
        f.write_text(f"user{i}:x:{1000 + i}:1000::/:/bin/sh\n")
        assert procfs._passwd(str(f)) == {1000 + i: f"user{i}"}
    assert len(procfs._passwd_cache) == 2 and procfs.passwd_evicted == 3
