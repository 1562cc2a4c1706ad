"""Triton kernels for the deviation ops (filled by the Triton backend)."""

from __future__ import annotations

import torch


def available(device: torch.device) -> bool:
    return False
