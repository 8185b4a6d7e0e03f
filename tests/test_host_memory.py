"""Reading host memory as RunPod's memory check (MemAvailable) and the OOM killer (the cgroup limit) see it."""

from pathlib import Path

import psutil

from turbovideo.pipeline.host_memory import GIB, read_host_memory

MIB = 1 << 20


def layout(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def meminfo(available_kb: int) -> str:
    return f"MemTotal:       263000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available_kb} kB\n"


def test_without_a_cgroup_limit_the_room_is_what_the_host_has_available(tmp_path):
    root = layout(tmp_path, {"proc/meminfo": meminfo(48 * MIB)})  # kB: 48 GiB
    host = read_host_memory(root)
    assert host.available == 48 * GIB and host.limit_room is None and host.room == 48 * GIB


def test_cgroup_v2_limit_less_what_the_container_holds_is_the_room(tmp_path):
    # A 32 GiB container holding 20 GiB, 6 GiB of it inactive page cache (dropped before an OOM kill) on a
    # host with 200 GiB available: 18 GiB of room, which RunPod's check (MemAvailable) does not see.
    root = layout(
        tmp_path,
        {
            "proc/meminfo": meminfo(200 * MIB),
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
            "sys/fs/cgroup/memory.max": f"{32 * GIB}\n",
            "sys/fs/cgroup/memory.current": f"{20 * GIB}\n",
            "sys/fs/cgroup/memory.stat": f"anon {12 * GIB}\nfile {8 * GIB}\ninactive_file {6 * GIB}\n",
        },
    )
    host = read_host_memory(root)
    assert host.available == 200 * GIB
    assert host.limit_room == 18 * GIB and host.room == 18 * GIB


def test_cgroup_v2_takes_the_tightest_of_its_own_and_its_parents_limits(tmp_path):
    own = "sys/fs/cgroup/worker.slice/job"
    root = layout(
        tmp_path,
        {
            "proc/meminfo": meminfo(100 * MIB),
            "proc/self/cgroup": "0::/worker.slice/job\n",
            "sys/fs/cgroup/cgroup.controllers": "memory pids\n",
            f"{own}/memory.max": "max\n",  # no limit of its own
            f"{own}/memory.current": f"{4 * GIB}\n",
            f"{own}/memory.stat": "inactive_file 0\n",
            "sys/fs/cgroup/worker.slice/memory.max": f"{16 * GIB}\n",
            "sys/fs/cgroup/worker.slice/memory.current": f"{10 * GIB}\n",
            "sys/fs/cgroup/worker.slice/memory.stat": f"inactive_file {1 * GIB}\n",
        },
    )
    assert read_host_memory(root).limit_room == 7 * GIB


def test_cgroup_v2_without_a_limit_leaves_the_hosts_figure(tmp_path):
    root = layout(
        tmp_path,
        {
            "proc/meminfo": meminfo(64 * MIB),
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/memory.max": "max\n",
            "sys/fs/cgroup/memory.current": f"{3 * GIB}\n",
        },
    )
    assert read_host_memory(root).room == 64 * GIB


def test_cgroup_v1_limit_and_hierarchical_limit(tmp_path):
    # /proc/self/cgroup names the host's path, which the container's mount does not have: its root is ours.
    files = {
        "proc/meminfo": meminfo(100 * MIB),
        "proc/self/cgroup": "5:cpu:/\n4:memory:/docker/0123abcd\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{9 * GIB}\n",
        "sys/fs/cgroup/memory/memory.stat": (
            f"inactive_file {1 * GIB}\nhierarchical_memory_limit {24 * GIB}\ntotal_inactive_file {2 * GIB}\n"
        ),
    }
    assert read_host_memory(layout(tmp_path / "limited", files)).limit_room == 17 * GIB
    files["sys/fs/cgroup/memory/memory.stat"] = "hierarchical_memory_limit 9223372036854771712\n"
    assert read_host_memory(layout(tmp_path / "unlimited", files)).limit_room is None


def test_a_container_holding_more_than_its_limit_has_no_room(tmp_path):
    root = layout(
        tmp_path,
        {
            "proc/meminfo": meminfo(100 * MIB),
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/memory.max": f"{8 * GIB}\n",
            "sys/fs/cgroup/memory.current": f"{9 * GIB}\n",
        },
    )
    assert read_host_memory(root).room == 0


def test_no_meminfo_means_nothing_is_known(tmp_path):
    assert read_host_memory(tmp_path) is None


def test_this_machine_reads_what_psutil_and_so_runpods_check_read():
    host = read_host_memory()
    assert host is not None and 0 < host.room <= host.available
    assert abs(host.available - psutil.virtual_memory().available) < 256 * MIB  # read moments apart
