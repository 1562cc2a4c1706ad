"""Where a training step's time and memory go: the step timeline, parts timed alone, peak memory, the report.

Public face: ``profile(model, batches, ...)`` -> ``ProfileReport``; ``PeakMemory``.
"""

from freezekern.profiler.memory import PeakMemory, release_memory
from freezekern.profiler.result import ProfileReport
from freezekern.profiler.run import profile

__all__ = ["PeakMemory", "ProfileReport", "profile", "release_memory"]
