"""Peak-memory measurement for benchmarks: peak RSS on CPU, the allocator on CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_high_water_mark() -> int | None:
    """VmHWM of this process in bytes (Linux), or None where /proc does not have it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and hand freed memory back: the CUDA cache, or the glibc heap.

    Before a CPU measurement this makes the RSS at entry count live memory only.
    """
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak extra memory of the enclosed code, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` relative to the allocation at
    entry. CPU: freed heap pages are first returned to the OS (glibc
    malloc_trim), then on Linux the kernel's peak-RSS counter (VmHWM), reset at
    entry, minus the RSS at entry; elsewhere RSS sampled every ``interval`` seconds in
    a thread (short peaks can be missed). ``peak_bytes`` holds the result.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak_delta"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        if _reset_high_water_mark() and _rss_high_water_mark() is not None:
            return self
        self._max = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._thread is None:
            self.peak_bytes = max(0, _rss_high_water_mark() - self._base)
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._process.memory_info().rss)
        self.peak_bytes = self._max - self._base
