"""How many intra-op threads the engine's forward uses: the CPUs this process may really use, less what other
processes are taking from them.

PyTorch's OpenMP pool defaults to every core it sees and spins at its barriers. On a shared machine (another
busy process on one of two cores) that collapses: the thread that shares a core with the other process
arrives late at every barrier while its partner spins, and a step takes several times longer than with one
thread. In a container the core count it sees can also be far above the CPU quota. :class:`ThreadGovernor`
sets the thread count from the affinity mask and the cgroup quota, and (when no count is fixed) checks how much
CPU other processes take from the allowed cores, at construction and then every quarter second between steps,
using one thread fewer per core they hold: fewer at once, more again only after two checks agree.
``docs/engine-design.md`` (section "Threads") gives the measurements behind it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from kvstack.errors import KVStackError

__all__ = ["ThreadGovernor", "cgroup_cpu_limit", "threads_for_load", "usable_cpus"]

CHECK_INTERVAL_S = 0.25  # /proc/stat is cheap to read; a collapse costs seconds per second unnoticed
FIRST_PROBE_S = 0.1  # at construction: the first forward (a long prefill) must not already run collapsed
_USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cgroup_cpu_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``), or None when there is none.

    Reads cgroup v2 ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``) and falls back to cgroup v1
    ``cpu/cpu.cfs_quota_us`` and ``cpu/cpu.cfs_period_us`` (quota -1: none) under ``root``.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity mask; every CPU where the OS has no such mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cpus(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int:
    """CPUs this process can really use: its affinity mask, capped by the cgroup CPU quota (rounded up, >= 1)."""
    return _capped(len(allowed_cpus()), cgroup_cpu_limit(cgroup_root))


def _capped(cpus: int, quota: float | None) -> int:
    """``cpus`` capped by a CPU quota (rounded up), at least 1."""
    if quota is not None:
        cpus = min(cpus, math.ceil(quota - 1e-9))
    return max(1, cpus)


def threads_for_load(cpus: int, other_load: float) -> int:
    """Threads to run on ``cpus`` allowed cores while other processes keep ``other_load`` of them busy (in
    cores): one thread per core they leave free, a core counted free when they take less than half of it."""
    return max(1, min(cpus, math.floor(cpus - other_load + 0.5)))


def _busy_seconds(cpus: list[int], stat: str = "/proc/stat") -> float | None:
    """CPU seconds spent busy (not idle or waiting on I/O) so far on ``cpus``, from ``/proc/stat``."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            values = [int(value) for value in fields[:8]]
            ticks += sum(values) - values[3] - values[4]  # all but idle and iowait
    return ticks / _USER_HZ


class ThreadGovernor:
    """Keeps PyTorch's intra-op thread count right for this process, in the thread that runs the forward.

    Parameters
    ----------
    threads : int or None, optional
        A fixed count; None (the default) uses at most :func:`usable_cpus` (and no more than PyTorch's count
        in the constructing thread, so that ``torch.set_num_threads`` set before still caps it) and, where no
        cgroup quota caps the process, one fewer per core other processes keep busy.
    interval : float, optional
        Seconds between two load checks.
    probe : float, optional
        Seconds spent at construction measuring the load once (0: none), with an automatic count.

    Raises
    ------
    KVStackError
        If ``threads`` is not a positive integer.
    """

    def __init__(
        self, threads: int | None = None, *, interval: float = CHECK_INTERVAL_S, probe: float = FIRST_PROBE_S
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise KVStackError(f"threads must be a positive integer or None (automatic), got {threads!r}")
        self._allowed = allowed_cpus()
        quota = cgroup_cpu_limit()
        self.max_threads = threads or min(_capped(len(self._allowed), quota), torch.get_num_threads())
        # With a quota the count is the quota's; with one thread allowed there is nothing to lower.
        self._adaptive = threads is None and quota is None and self.max_threads > 1
        self._interval = interval
        self._last: tuple[float, float, float] | None = None  # wall time, busy seconds, own CPU seconds
        self._proposed: int | None = None
        self.threads = self.max_threads
        if self._adaptive and probe > 0:
            self._check_load()
            time.sleep(probe)
            self._check_load(force=True)

    def tick(self) -> int:
        """Apply the current thread count to the calling thread (re-checking the load when due); return it.

        Call it from the thread that runs the model, before each forward: OpenMP's thread count belongs to
        the thread that sets it.
        """
        if self._adaptive:
            self._check_load()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def _check_load(self, force: bool = False) -> None:
        """Re-estimate other processes' load once per interval (or now, with ``force``): fewer threads at once,
        more only when two checks in a row agree (a wrong rise under contention costs several times a step)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self._interval and not force:
            return
        busy = _busy_seconds(self._allowed)
        own = time.process_time()
        if busy is None:
            self._adaptive = False
            return
        if self._last is not None:
            wall = now - self._last[0]
            other = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / wall
            proposed = min(self.max_threads, threads_for_load(len(self._allowed), other))
            if proposed < self.threads or proposed == self._proposed:
                self.threads = proposed
            self._proposed = proposed
        self._last = (now, busy, own)
