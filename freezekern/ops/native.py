"""Loader for the compiled extension ``freezekern._C`` (filled by the native backend)."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device | None = None) -> str:
    return "the native extension freezekern._C is not built"


def has_op(op: str, device: torch.device) -> bool:
    return False
