"""Measuring a cell honestly: peak process memory over just that cell, and synchronised wall clocks.

Peak memory. ``resource.getrusage().ru_maxrss`` is the peak over the whole process lifetime, so the
first big cell would hide every later one. Instead, at the start of a cell, :class:`PeakMemory`
returns memory freed by earlier cells to the operating system where it can (``gc.collect()``, then
glibc's ``malloc_trim(0)``), resets the kernel's high-water mark (writing ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0) and at the end reads ``VmHWM`` from ``/proc/self/status``:
the exact peak resident set size of the process during the cell. That peak includes everything
resident (model weights, the allocator's retained pages), so records also keep the RSS at the cell's
start (``base_rss_bytes``) and the difference (``peak_rss_delta_bytes``, what the cell added). The
bench warms the model up before the first cell so its weights are already resident then.

Where the reset is not allowed it falls back to sampling ``/proc/self/statm`` every 2 ms in a
background thread (may miss a spike shorter than that), and without ``/proc`` to ``ru_maxrss``
(process-lifetime peak; flagged as such). The record says which was used (``peak_rss_method``).
On CUDA, ``torch.cuda.max_memory_allocated`` is reset and read around the cell too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
import time
from types import TracebackType

import torch

from kvstack.api import synchronize  # the one wait for CUDA kernels; the bench's timings use it

__all__ = ["PeakMemory", "current_rss", "release_free_memory", "synchronize"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> bool:
    """Collect garbage and return free heap pages to the OS (glibc ``malloc_trim``); False where unavailable."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    peak, rss = _status_bytes("VmHWM:"), _status_bytes("VmRSS:")
    return peak is not None and rss is not None and peak <= rss + 64 * 1024 * 1024


class PeakMemory:
    """Context manager measuring this process's peak RSS (and CUDA peak) over the ``with`` block.

    Attributes (after exit)
    -----------------------
    peak_rss:
        Peak resident bytes during the block (None if unmeasurable).
    base_rss:
        Resident bytes when the block started.
    method:
        ``vmhwm-reset`` (exact), ``sampled-2ms`` or ``ru_maxrss-lifetime`` (see the module docstring).
    peak_gpu:
        ``torch.cuda.max_memory_allocated`` over the block on CUDA, else None.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else None
        self.interval = interval
        self.peak_rss: int | None = None
        self.base_rss: int | None = None
        self.peak_gpu: int | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0
        self.trimmed = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None and rss > self._sampled:
                self._sampled = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.trimmed = release_free_memory()
        self.base_rss = current_rss()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if _reset_high_water_mark():
            self.method = "vmhwm-reset"
        elif self.base_rss is not None:
            self.method = "sampled-2ms"
            self._sampled = self.base_rss
            self._thread = threading.Thread(target=self._sample, name="kvstack-peak-rss", daemon=True)
            self._thread.start()
        else:
            self.method = "ru_maxrss-lifetime"
        self._started = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.method == "vmhwm-reset":
            self.peak_rss = _status_bytes("VmHWM:")
        elif self.method == "sampled-2ms":
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            rss = current_rss()
            self.peak_rss = max(self._sampled, rss or 0)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_rss = peak if sys.platform == "darwin" else peak * 1024
        if self.device is not None and self.device.type == "cuda":
            self.peak_gpu = int(torch.cuda.max_memory_allocated(self.device))
