"""Peak-memory measurement for benchmarks: RSS sampling on CPU, the allocator on CUDA."""

from __future__ import annotations

import threading
import time

import torch


class PeakMemory:
    """Context manager measuring the peak extra memory of the enclosed code, in bytes.

    On CUDA it reads ``torch.cuda.max_memory_allocated`` relative to the
    allocation at entry. On CPU it samples the process RSS every
    ``interval`` seconds in a thread (peaks shorter than that can be missed)
    relative to the RSS at entry. ``peak_bytes`` holds the result.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
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
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._process.memory_info().rss)
        self.peak_bytes = self._max - self._base
