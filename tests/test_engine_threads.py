"""The engine's thread count: CPU quota and affinity, the load rule, and the governor on a really busy machine."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvstack.engine import Engine, SamplingParams
from kvstack.engine.threads import ThreadGovernor, cgroup_cpu_limit, threads_for_load, usable_cpus
from kvstack.errors import KVStackError


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_is_read_from_v2_or_v1_files(tmp_path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_a_quota_caps_the_usable_cpus_rounded_up(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(__import__("os").sched_getaffinity(0))


@pytest.mark.parametrize(("cpus", "load", "threads"), [(2, 0.0, 2), (2, 0.3, 2), (2, 0.67, 1), (2, 1.0, 1),
                                                        (2, 2.0, 1), (4, 1.2, 3), (8, 0.49, 8), (8, 0.51, 7)])
def test_one_thread_fewer_per_core_other_processes_hold(cpus: int, load: float, threads: int) -> None:
    assert threads_for_load(cpus, load) == threads


@given(cpus=st.integers(1, 64), load=st.floats(0, 128), more=st.floats(0, 16))
def test_threads_stay_in_range_and_never_rise_with_load(cpus: int, load: float, more: float) -> None:
    threads = threads_for_load(cpus, load)
    assert 1 <= threads <= cpus
    assert threads_for_load(cpus, load + more) <= threads


def test_a_fixed_count_applies_to_the_thread_that_steps_and_bad_counts_are_refused() -> None:
    seen: list[int] = []
    before = torch.get_num_threads()

    def run() -> None:
        ThreadGovernor(1).tick()
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [1]
    assert torch.get_num_threads() == before  # OpenMP's count is per thread: the caller's is untouched
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(KVStackError, match="threads must be a positive integer or None"):
            ThreadGovernor(bad)  # type: ignore[arg-type]


def test_engine_takes_a_thread_count_and_the_automatic_one_respects_a_lower_torch_setting(llama) -> None:
    torch.set_num_threads(usable_cpus())
    engine = Engine(llama, memory_mb=1, block_size=4, threads=1)
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
    assert engine.metrics()["threads"] == torch.get_num_threads() == 1
    torch.set_num_threads(1)  # as the user may have, before building the engine
    automatic = Engine(llama, memory_mb=1, block_size=4)
    assert automatic.threads.max_threads == 1


@pytest.mark.skipif(usable_cpus() < 2 or cgroup_cpu_limit() is not None, reason="needs two free cores, no quota")
def test_the_automatic_count_drops_while_other_processes_are_busy_and_comes_back() -> None:
    torch.set_num_threads(usable_cpus())
    governor = ThreadGovernor(interval=0.25)
    assert governor.max_threads == usable_cpus()
    if governor.tick() < governor.max_threads:
        pytest.skip("another process already keeps a core busy here: the quiet starting point is missing")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(governor.max_threads)]
    try:
        deadline = time.monotonic() + 10
        while governor.tick() == governor.max_threads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert governor.threads < governor.max_threads
    finally:
        for process in busy:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 10
    while governor.tick() < governor.max_threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert governor.threads == governor.max_threads
