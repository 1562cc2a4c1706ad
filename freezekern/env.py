"""Environment report for bug reports: versions, devices, available kernels."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> dict[str, str]:
    """Plain strings describing this installation (``freezekern env`` prints it)."""
    import torch

    from freezekern.ops import native
    from freezekern.ops.dispatch import resolve_impl

    report = {
        "freezekern": _version("freezekern"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "peft": _version("peft"),
        "cuda available": str(torch.cuda.is_available()),
        "torch cuda": str(torch.version.cuda),
        "cpu threads": str(torch.get_num_threads()),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    info = native.info() if hasattr(native, "info") else {}
    report["native extension"] = "loaded" if info.get("loaded") else f"not loaded ({native.unavailable_reason()})"
    for key in ("cpu", "cuda", "openmp_threads"):
        if key in info:
            report[f"native {key}"] = str(info[key])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op in ("cosine_deviation", "logit_lens_deviation", "linear_cross_entropy"):
            choices = {str(d).removeprefix("torch."): resolve_impl(op, "auto", torch.device(device), d)
                       for d in (torch.float32, torch.bfloat16, torch.float16)}
            if len(set(choices.values())) == 1:
                report[f"auto {op} on {device}"] = next(iter(choices.values()))
            else:
                report[f"auto {op} on {device}"] = ", ".join(f"{d}: {c}" for d, c in choices.items())
    return report
