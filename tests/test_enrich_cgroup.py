"""Container identity from /proc/<pid>/cgroup, one real-world shape per runtime
and cgroup driver (paths as each runtime writes them; ids are 64 hex)."""

from __future__ import annotations

import pytest

from qtap_devtools.enrich.cgroup import CgroupIndex, cgroup2_mount, container_of, parse_cgroup, parse_cgroup_path

A = "f1244ec10b889b3b7d1aaed41f7c03d70ff2f293504b57d41bbe1416f1e28314"
B = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
POD_UID = "0b1f5c4e-7a3d-4d8e-9a63-2f1d7b6c9e10"


CASES = {
    # Docker, cgroupfs driver, cgroup v1 (captured on this machine: Debian's dockerd 20.10).
    "docker v1 cgroupfs": (
        f"9:name=systemd:/docker/{A}\n8:pids:/docker/{A}\n4:memory:/docker/{A}\n"
        f"2:cpuacct:/docker/{A}\n1:cpu:/docker/{A}\n0::/docker/{A}\n",
        ("docker", A),
    ),
    # Docker, systemd driver, cgroup v1 (CentOS/RHEL 7).
    "docker v1 systemd": (
        f"11:devices:/system.slice/docker-{A}.scope\n"
        f"4:memory:/system.slice/docker-{A}.scope\n"
        f"1:name=systemd:/system.slice/docker-{A}.scope\n",
        ("docker", A),
    ),
    # Docker, systemd driver, cgroup v2 (Debian 11+, Ubuntu 22.04+, Fedora).
    "docker v2 systemd": (f"0::/system.slice/docker-{A}.scope\n", ("docker", A)),
    # A process of a container running systemd sits in a child cgroup.
    "docker v2 systemd, nested init.scope": (f"0::/system.slice/docker-{A}.scope/init.scope\n", ("docker", A)),
    # Docker in Docker: the inner container is the one the process runs in.
    "docker in docker": (f"0::/docker/{B}/docker/{A}\n", ("docker", A)),
    # Kubernetes with containerd, systemd driver, cgroup v2 (GKE, EKS AL2023, kubeadm defaults).
    "containerd CRI systemd v2": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{A}.scope\n",
        ("containerd", A),
    ),
    # Guaranteed QoS pods have no QoS slice.
    "containerd CRI systemd v1 guaranteed": (
        f"12:memory:/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{A}.scope\n"
        f"1:name=systemd:/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{A}.scope\n"
        "0::/\n",
        ("containerd", A),
    ),
    # Kubelet's cgroupfs driver (k3s, older kubeadm): the path does not name the runtime.
    "kubepods cgroupfs v1 besteffort": (
        f"10:memory:/kubepods/besteffort/pod{POD_UID}/{A}\n"
        f"2:cpu,cpuacct:/kubepods/besteffort/pod{POD_UID}/{A}\n",
        ("unknown", A),
    ),
    "kubepods cgroupfs v2 burstable": (f"0::/kubepods/burstable/pod{POD_UID}/{A}\n", ("unknown", A)),
    # Kubernetes with Docker through the systemd driver.
    "kubepods systemd docker": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/docker-{A}.scope\n",
        ("docker", A),
    ),
    # CRI-O (OpenShift), systemd driver.
    "cri-o systemd v2": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/crio-{A}.scope\n",
        ("cri-o", A),
    ),
    "cri-o systemd v1 container child": (
        f"7:pids:/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{A}.scope/container\n",
        ("cri-o", A),
    ),
    "cri-o cgroupfs": (f"0::/kubepods/besteffort/pod{POD_UID}/crio-{A}\n", ("cri-o", A)),
    # podman as root: machine.slice; rootless: inside the user's systemd manager.
    "podman root v2": (f"0::/machine.slice/libpod-{A}.scope/container\n", ("podman", A)),
    "podman rootless v2": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{A}.scope/container\n",
        ("podman", A),
    ),
    "podman cgroupfs v1": (f"4:memory:/libpod_parent/libpod-{A}\n", ("podman", A)),
    # nerdctl on plain containerd.
    "nerdctl systemd v2": (f"0::/system.slice/nerdctl-{A}.scope\n", ("containerd", A)),
    # Old Docker with --cgroup-parent=/ (Debian 8): the id alone.
    "docker v1 bare id": (f"4:memory:/{A}\n2:cpu:/{A}\n", ("unknown", A)),
}


@pytest.mark.parametrize("text,expected", list(CASES.values()), ids=list(CASES))
def test_container_id_and_runtime_from_cgroup_file(text, expected):
    assert parse_cgroup(text) == expected


HOST_PROCESSES = {
    "host v2 session": "0::/user.slice/user-1000.slice/session-3.scope\n",
    "host v1 hybrid": "9:name=systemd:/\n4:memory:/process_api/95578faa028b15bd3a43548ab3f32aa2\n0::/\n",
    "systemd service": "0::/system.slice/ssh.service\n",
    "dockerd itself": "0::/system.slice/docker.service\n",
    "kubelet": "0::/system.slice/kubelet.service\n",
    "empty": "",
    "garbage": "not a cgroup file\n\0\0\n",
}


@pytest.mark.parametrize("text", list(HOST_PROCESSES.values()), ids=list(HOST_PROCESSES))
def test_host_processes_have_no_container(text):
    assert parse_cgroup(text) is None


def test_conmon_monitors_are_not_the_container():
    # conmon runs on the host's side of CRI-O and podman containers.
    assert parse_cgroup_path(f"/machine.slice/libpod-conmon-{A}.scope") is None
    assert parse_cgroup_path(f"/kubepods.slice/kubepods-pod{POD_UID}.slice/crio-conmon-{A}.scope") is None


def test_unified_line_wins_over_v1_lines():
    text = f"4:memory:/docker/{B}\n0::/system.slice/docker-{A}.scope\n"
    assert parse_cgroup(text) == ("docker", A)


def test_short_or_non_hex_ids_are_not_containers():
    assert parse_cgroup_path("/docker/f1244ec10b88") is None
    assert parse_cgroup_path("/system.slice/docker-" + "z" * 64 + ".scope") is None


def test_container_of_reads_the_file_and_survives_a_vanished_pid(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(f"0::/system.slice/docker-{A}.scope\n")
    assert container_of(4242, str(tmp_path)) == ("docker", A)
    assert container_of(4243, str(tmp_path)) is None


def test_cgroup_index_names_a_container_from_its_mkdir_record(tmp_path):
    index = CgroupIndex(root=str(tmp_path))  # an empty hierarchy: only the records say anything
    index.created(901, f"/system.slice/docker-{A}.scope")
    index.created(902, "/user.slice/user-0.slice/session-3.scope")
    assert index.container(901) == ("docker", A)
    assert index.container(902) is None
    assert index.container(0) is None and index.container(1) is None  # unknown; the root
    assert index.walks == 0  # both were known from their records


def test_cgroup_index_finds_a_cgroup_made_before_it_started_by_its_inode(tmp_path):
    """A directory's inode number is its cgroup id: the hierarchy (here a plain
    directory tree standing in for the cgroup2 mount) is searched on a miss."""
    made = tmp_path / "kubepods" / "burstable" / "pod1234" / A
    made.mkdir(parents=True)
    host = tmp_path / "system.slice" / "ssh.service"
    host.mkdir(parents=True)
    now = [0.0]
    index = CgroupIndex(root=str(tmp_path), clock=lambda: now[0])
    assert index.container(made.stat().st_ino) == ("unknown", A)
    assert index.container(host.stat().st_ino) is None
    assert index.walks == 1  # the second answer came from the first search
    later = tmp_path / "docker" / B
    later.mkdir(parents=True)
    assert index.container(later.stat().st_ino) is None  # searched at most once a second
    now[0] += CgroupIndex.WALK_INTERVAL
    index._ids.clear()
    assert index.container(later.stat().st_ino) == ("docker", B)


def test_cgroup_index_is_bounded_and_counts_what_it_lets_go(tmp_path, monkeypatch):
    monkeypatch.setattr(CgroupIndex, "MAX_IDS", 3)
    index = CgroupIndex(root=str(tmp_path))
    for i in range(5):
        index.created(100 + i, f"/docker/{i:064x}")
    assert index.evicted == 2
    assert len(index._ids) == 3 and index.container(104) == ("docker", f"{4:064x}")


def test_cgroup2_mount_is_read_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n"
        "35 25 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:13 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert cgroup2_mount(str(info)) == "/sys/fs/cgroup/unified"
    info.write_text("30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert cgroup2_mount(str(info)) is None
    assert cgroup2_mount(str(tmp_path / "absent")) is None
