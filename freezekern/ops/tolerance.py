"""The tolerance rule every kernel is held to, in the test suite and in ``freezekern verify``.

A kernel's result ``got`` is compared with the fp64 ``truth`` of the same
(dtype-rounded) inputs, next to what plain PyTorch gives in the same dtype
(``ref``). It passes when

    max |got - truth|  <=  2 * max |ref - truth|  +  rel * max |truth|  +  floor

(flash-attention's rule: no worse than twice PyTorch's own error in that
dtype, plus a tiny relative and absolute floor for results PyTorch computes
exactly). NaN must appear where the truth has NaN and nowhere else; the
maxima skip those positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REL = 1e-5
FLOOR = 1e-12


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in fp64 on the CPU, over the positions where ``want`` is not NaN; inf on a NaN mismatch."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} vs {tuple(want.shape)}")
    if want.numel() == 0:
        return 0.0
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    diff = (a - b).abs().masked_fill(torch.isnan(b), 0.0)
    return float(diff.max())


def scale(t: torch.Tensor) -> float:
    """max |t| over its finite entries (0 for none)."""
    finite = t.detach().double().cpu()
    finite = finite[torch.isfinite(finite)]
    return float(finite.abs().max()) if finite.numel() else 0.0


@dataclass(frozen=True)
class Verdict:
    """One comparison: the kernel's error and PyTorch's against the truth, the bound, and whether it holds."""

    error: float
    reference_error: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.error <= self.bound


def judge(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, *, rel: float = REL,
          floor: float = FLOOR) -> Verdict:
    """Apply the rule (module docstring) to ``got`` against ``truth``, ``ref`` giving PyTorch's own error."""
    err_ref = max_error(ref, truth)
    return Verdict(max_error(got, truth), err_ref, 2.0 * err_ref + rel * scale(truth) + floor)


def assert_within_rule(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, *, rel: float = REL,
                       floor: float = FLOOR, what: str = "result") -> None:
    """Raise AssertionError naming ``what`` when ``got`` breaks the rule."""
    verdict = judge(got, ref, truth, rel=rel, floor=floor)
    assert verdict.passed, (f"{what}: error {verdict.error:.3g} > bound {verdict.bound:.3g} "
                            f"(PyTorch's error {verdict.reference_error:.3g})")
