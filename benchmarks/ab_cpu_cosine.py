"""A/B timing of CPU cosine-kernel variants, interleaved in one process.

    python benchmarks/ab_cpu_cosine.py base=csrc pf4=csrc:-DFK_PREFETCH_ROWS=4
    python benchmarks/ab_cpu_cosine.py base=/tmp/old/csrc new=csrc --rows 16384,65536 --threads 2

Each variant is NAME=DIR[:FLAG,FLAG...]: a csrc/ folder (this checkout's, or
one from another commit, e.g. a `git worktree`) and extra compiler flags. The
variant's sources are copied, their ops registered under a namespace of their
own (torch.ops.fk_ab_NAME), and built with torch's cpp_extension, so every
variant loads into the same process. Each round then calls every variant once
on the same inputs (those of benchmarks/bench_native_ops.py: D = 576, a basis
of N/4 fp32 rows, one row in 16 ignored), so machine noise, which drifts by
tens of percent over minutes on a shared machine, falls on all alike. Prints
the best time per row of each variant and its ratio to the first; checks that
the variants agree to 1e-4. Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_native_ops import _cosine_inputs
from torch.utils import cpp_extension

SOURCES = ("ops.cpp", "deviation_cpu.cpp", "module.cpp")
NORMS = {"rms": ("rms", False), "layer_bias": ("layer", True)}


def build(name: str, spec: str, workdir: Path):
    """The cosine op of one variant, NAME=DIR[:FLAGS], as a callable."""
    src, _, flags = spec.partition(":")
    if not re.fullmatch(r"\w+", name):
        raise SystemExit(f"variant name {name!r}: letters, digits and _ only")
    if not all((Path(src) / f).is_file() for f in SOURCES):
        raise SystemExit(f"{src} is not a csrc folder (needs {', '.join(SOURCES)})")
    out = workdir / name
    shutil.copytree(src, out)
    for path in out.glob("*.cpp"):
        text = re.sub(r"TORCH_LIBRARY(_IMPL)?\(freezekern,", rf"TORCH_LIBRARY\1(fk_ab_{name},", path.read_text())
        path.write_text(text)
    cpp_extension.load(
        name=f"fk_ab_{name}", sources=[str(out / f) for f in SOURCES], build_directory=str(out),
        extra_cflags=["-O3", "-Wno-psabi", "-fopenmp", *[f for f in flags.split(",") if f]],
        extra_ldflags=["-fopenmp"],
    )
    return getattr(torch.ops, f"fk_ab_{name}").cosine_deviation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=DIR[:FLAGS]")
    parser.add_argument("--rows", default="4096,16384,65536", help="N values, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    pairs = [v.partition("=") for v in args.variants]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit("each variant is NAME=DIR[:FLAGS]")
    with tempfile.TemporaryDirectory(prefix="fk_ab_") as tmp:
        ops = {name: build(name, spec, Path(tmp)) for name, _, spec in pairs}
        torch.set_num_threads(args.threads)
        first = next(iter(ops))
        print(f"ns per row, best of {args.rounds} interleaved rounds, {args.threads} thread(s); ratio to {first}")
        for n in (int(r) for r in args.rows.split(",")):
            for dtype in (torch.bfloat16, torch.float32):
                h, basis, target, nw, nb = _cosine_inputs(n, 576, "cpu", dtype)
                for label, (norm, with_bias) in NORMS.items():
                    call = (h, basis, target, norm, nw, nb if with_bias else None, 1e-6)
                    expected = ops[first](*call)
                    best = dict.fromkeys(ops, float("inf"))
                    for _ in range(args.rounds):
                        for name, op in ops.items():
                            start = time.perf_counter()
                            got = op(*call)
                            best[name] = min(best[name], time.perf_counter() - start)
                            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
                    cells = "  ".join(f"{k}={best[k] / n * 1e9:6.0f} ({best[k] / best[first]:.2f})" for k in ops)
                    print(f"N={n:<6} {str(dtype)[6:]:<8} {label:<10} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
