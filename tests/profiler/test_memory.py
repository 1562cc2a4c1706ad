import torch

from freezekern.profiler.memory import PeakMemory


def test_peak_memory_sees_a_transient_allocation():
    with PeakMemory("cpu") as small:
        torch.ones(1000).sum()
    with PeakMemory("cpu") as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x.add_(1)
        del x
    assert big.peak_bytes >= 48 * 2**20
    assert small.peak_bytes < big.peak_bytes
