"""Every csrc/*.cu compiles with nvcc for sm_80 (A100) and sm_90 (H100).

Runs without a GPU and without a CUDA build of torch: the device code needs
only the CUDA toolkit headers. It is compiled with the macros torch's
extension builder passes to nvcc, so the same code builds in setup.py.
Skipped only when no nvcc is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
# As torch.utils.cpp_extension passes them (COMMON_NVCC_FLAGS).
TORCH_NVCC_MACROS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda/bin)")


def test_there_are_cuda_sources():
    assert CU_SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90(source, tmp_path):
    out = tmp_path / (source.stem + ".o")
    cmd = [
        NVCC, "-c", str(source), "-o", str(out),
        "-std=c++17", "-O3", "--threads", "2", "-I", str(CSRC),
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-Werror", "all-warnings",
        *TORCH_NVCC_MACROS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0
    # Both architectures' machine code is in the object.
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(out)], capture_output=True, text=True)
        if listing.returncode == 0:
            assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


# The torch-facing CUDA wrapper includes two headers that only a CUDA build of
# torch ships; these stand-ins declare just what the wrapper uses, so its use
# of the real ATen API and of the shared argument checks is compiled here.
_CUDA_TORCH_STANDINS = {
    "ATen/cuda/CUDAContext.h": (
        "#pragma once\n#include <cuda_runtime.h>\n"
        "namespace at::cuda { struct Stream { operator cudaStream_t() const { return nullptr; } };\n"
        "inline Stream getCurrentCUDAStream() { return {}; } }\n"
    ),
    "c10/cuda/CUDAGuard.h": (
        "#pragma once\n#include <c10/core/Device.h>\n"
        "namespace c10::cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; }\n"
    ),
}


CUDA_WRAPPERS = sorted(CSRC.glob("*_cuda_wrapper.cpp"))


@pytest.mark.parametrize("wrapper", CUDA_WRAPPERS, ids=lambda p: p.name)
def test_cuda_wrapper_compiles_against_torch_headers(tmp_path, wrapper):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    for name, text in _CUDA_TORCH_STANDINS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parent.parent,
             "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime.h").is_file()),
                        None)
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found (CUDA_HOME, CUDA_PATH, next to nvcc, /usr/local/cuda)")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-DFREEZEKERN_WITH_CUDA",
           "-I", str(tmp_path), "-I", str(cuda_include), "-I", str(CSRC),
           *[f"-I{p}" for p in include_paths()], str(wrapper)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the CUDA wrapper does not compile ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
