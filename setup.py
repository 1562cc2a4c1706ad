"""Build script: the pure-Python package always installs; the C++ extension
``freezekern._C`` is built only when torch is importable at build time
(install with ``pip install --no-build-isolation``), and its failure to build
is reported, never fatal. Set FREEZEKERN_NO_EXT=1 to skip it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup


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
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not sources:
        return [], {}
    sources = [os.path.relpath(s, here) for s in sources]
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    ext = cpp_extension.CppExtension(
        "freezekern._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


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
                except Exception as exc:  # noqa: BLE001
                    print(f"freezekern: building {ext.name} failed ({exc}); the pure-Python paths remain", file=sys.stderr)

        return {**cmdclass, "build_ext": OptionalBuildExt}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=_OptionalBuild.wrap(cmdclass))
