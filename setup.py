"""Build script: the pure-Python package always installs; the C++ extension
``freezekern._C`` is built only when torch is importable at build time
(install with ``pip install --no-build-isolation``), and its failure to build
is reported, never fatal. Set FREEZEKERN_NO_EXT=1 to skip it.

With a CUDA build of torch and a CUDA toolkit (CUDA_HOME / nvcc), the CUDA
kernels (csrc/*.cu and csrc/*_cuda*.cpp) are compiled into the same module;
set FREEZEKERN_NO_CUDA=1 to build the CPU kernels only, and
TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to choose the GPU architectures. If the
CUDA build fails, the CPU-only extension is built instead.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


def _cuda_toolkit(cpp_extension) -> bool:
    import torch

    if os.environ.get("FREEZEKERN_NO_CUDA") == "1" or not torch.version.cuda:
        return False
    return bool(cpp_extension.CUDA_HOME) and os.path.isdir(cpp_extension.CUDA_HOME)


def native_extensions():
    if os.environ.get("FREEZEKERN_NO_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("freezekern: torch not importable at build time; skipping the native extension", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(os.path.relpath(s, here) for s in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not cpp:
        return [], {}
    cuda_cpp = [s for s in cpp if "_cuda" in os.path.basename(s)]
    cpu_sources = [s for s in cpp if s not in cuda_cpp]
    cu = sorted(os.path.relpath(s, here) for s in glob.glob(os.path.join(here, "csrc", "*.cu")))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # torch's BuildExtension picks the C++ standard its headers need (C++20 for
    # recent torch); no -std flag here.
    cxx = ["-O3", "-Wno-psabi", *openmp]
    include_dirs = [os.path.join(here, "csrc")]
    if cu and _cuda_toolkit(cpp_extension):
        ext = cpp_extension.CUDAExtension(
            "freezekern._C",
            cpu_sources + cuda_cpp + cu,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": [*cxx, "-DFREEZEKERN_WITH_CUDA"],
                "nvcc": ["-O3", "-lineinfo", "-DFREEZEKERN_WITH_CUDA"],
            },
            extra_link_args=openmp,
        )
        ext._freezekern_cpu_sources = cpu_sources  # fallback when the CUDA build fails
    else:
        ext = cpp_extension.CppExtension(
            "freezekern._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


def _drop_cuda(ext) -> None:
    """Turn a CUDAExtension that failed to build into the CPU-only one."""
    ext.sources = list(ext._freezekern_cpu_sources)
    del ext._freezekern_cpu_sources
    args = ext.extra_compile_args
    if isinstance(args, dict):
        args["cxx"] = [a for a in args.get("cxx", []) if a != "-DFREEZEKERN_WITH_CUDA"]
        args.pop("nvcc", None)


def _check_libstdcxx(path: str) -> None:
    """Warn when the built module does not load libstdc++ dynamically.

    A toolchain that links libstdc++ statically into shared objects gives a
    module with its own uninitialised copy, which crashes in torch's error
    formatting (seen with a relocated GCC on some GPU images).
    """
    import shutil
    import subprocess

    if not sys.platform.startswith("linux") or not os.path.exists(path) or not shutil.which("ldd"):
        return
    try:
        deps = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return
    if deps and "libstdc++" not in deps:
        print(
            f"freezekern: WARNING: {os.path.basename(path)} does not load libstdc++ dynamically (the compiler "
            "linked it statically); it may crash inside torch. Rebuild with the system compiler, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install --no-build-isolation -e .",
            file=sys.stderr,
        )


class _OptionalBuild:
    """Wraps build_ext so a compile failure leaves a pure-Python install."""

    @staticmethod
    def wrap(cmdclass):
        base = cmdclass.get("build_ext")
        if base is None:
            return cmdclass

        class OptionalBuildExt(base):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001
                    print(f"freezekern: native extension not built ({exc}); the pure-Python paths remain", file=sys.stderr)

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                    _check_libstdcxx(self.get_ext_fullpath(ext.name))
                    return
                except Exception as exc:  # noqa: BLE001
                    if not hasattr(ext, "_freezekern_cpu_sources"):
                        print(f"freezekern: building {ext.name} failed ({exc}); the pure-Python paths remain", file=sys.stderr)
                        return
                    print(f"freezekern: the CUDA build of {ext.name} failed ({exc}); building the CPU kernels only", file=sys.stderr)
                _drop_cuda(ext)
                try:
                    super().build_extension(ext)
                    _check_libstdcxx(self.get_ext_fullpath(ext.name))
                except Exception as exc:  # noqa: BLE001
                    print(f"freezekern: building {ext.name} failed ({exc}); the pure-Python paths remain", file=sys.stderr)

        return {**cmdclass, "build_ext": OptionalBuildExt}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=_OptionalBuild.wrap(cmdclass))
