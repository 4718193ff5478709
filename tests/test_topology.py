"""Topology: sysfs parsing (on a fake sysfs tree) and virtual-socket overrides."""

import os

import pytest

from dovetail.errors import UserError
from dovetail.topology import detect, parse_cpu_list, parse_sockets


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("5\n") == (5,)
    for bad in ("a-b", "3-1", "1,1"):
        with pytest.raises(UserError):
            parse_cpu_list(bad)


def test_virtual_sockets_from_override():
    topo = parse_sockets("0|1", available={0, 1})
    assert [s.cpus for s in topo.sockets] == [(0,), (1,)] and topo.cpus == (0, 1)
    assert "override" in topo.source


@pytest.mark.parametrize("spec,why", [("0|0", "share CPUs"), ("0|7", "cannot run on"), ("0|", "no CPUs")])
def test_impossible_overrides_are_refused(spec, why):
    with pytest.raises(UserError, match=why):
        parse_sockets(spec, available={0, 1})


def test_detect_reads_sysfs_nodes(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    halves = (cpus[: max(1, len(cpus) // 2)], cpus[max(1, len(cpus) // 2):])
    for i, half in enumerate(halves):
        node = tmp_path / f"node{i}"
        node.mkdir()
        node.joinpath("cpulist").write_text(",".join(map(str, half)) + "\n" if half else "\n")
        node.joinpath("meminfo").write_text(f"Node {i} MemTotal:       1024 kB\n")
    topo = detect(tmp_path)
    assert [s.cpus for s in topo.sockets] == [tuple(h) for h in halves if h]
    assert topo.sockets[0].memory_bytes == 1024 * 1024 and topo.sockets[0].numa_node == 0


def test_detect_falls_back_to_affinity_without_sysfs(tmp_path):
    topo = detect(tmp_path)
    assert len(topo.sockets) == 1 and set(topo.cpus) == os.sched_getaffinity(0)


def test_socket_directories_are_private_and_foreign_ones_refused(tmp_path, monkeypatch):
    """Run and socket directories are 0700 and ours; one that another user owns is refused."""
    import os
    import stat

    from dovetail.actors.system import private_dir
    from dovetail.errors import UserError

    made = private_dir(tmp_path / "run" / "abc")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)  # as if another user made it
    with pytest.raises(UserError, match="another user"):
        private_dir(made)


def test_shm_all_reduce_is_refused_without_x86_store_ordering(monkeypatch):
    import platform

    from dovetail.actors.system import shm_or_gloo

    said = []
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert shm_or_gloo("shm", said.append) == "gloo" and "store ordering" in said[0]
    assert shm_or_gloo("gloo", said.append) == "gloo"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert shm_or_gloo("shm") == "shm"
