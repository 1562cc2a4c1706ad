"""Semantic basis: the latent vector the LM head maps closest to a one-hot.

For the output embedding U [V, D], s_y solves (U^T U + lambda I) s_y = U[y]^T,
i.e. row y of the ridge-regularised pseudo-inverse of U^T. G = U^T U is
factored once (Cholesky, fp64 when D <= 4096, else fp32) and rows are solved
lazily, only for label ids that occur, into a table kept on the head's
device.
"""

from __future__ import annotations

import weakref

import torch

FP64_MAX_DIM = 4096


class SemanticBasis:
    """Lazily solved semantic-basis rows for one LM head.

    ``head_weight`` [V, D] any float dtype; ``ridge`` lambda (default
    1e-6 * trace(G) / D). ``index(ids)`` maps token ids to rows of ``table``
    [size, D] fp32 (both on ``head_weight.device``); ``rows(ids)`` gathers
    them, [len(ids), D] fp32.
    """

    def __init__(self, head_weight: torch.Tensor, ridge: float | None = None):
        if head_weight.dim() != 2:
            raise ValueError(f"head weight must be [V, D], got {tuple(head_weight.shape)}")
        self.weight = head_weight.detach()
        vocab, dim = self.weight.shape
        self.solve_dtype = torch.float64 if dim <= FP64_MAX_DIM else torch.float32
        gram = self._gram()
        trace = gram.diagonal().sum().item()
        self.ridge = float(ridge) if ridge is not None else 1e-6 * trace / dim
        if not self.ridge > 0:
            raise ValueError(f"ridge must be positive, got {self.ridge} (is the LM head all zeros?)")
        gram.diagonal().add_(self.ridge)
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() != 0:
            raise RuntimeError(
                f"U^T U + {self.ridge:g} I is not positive definite; pass a larger ridge"
            )
        # In fp64, G^-1 once (the factor is then dropped), so solving a batch's
        # new rows is one GEMM rather than a triangular solve per batch (slow to
        # launch on GPUs). The fp32 path keeps the Cholesky factor and the
        # triangular solve, which TF32 matmul settings cannot touch.
        fp64 = self.solve_dtype == torch.float64
        self.inverse = torch.cholesky_inverse(factor) if fp64 else None
        self.factor = None if fp64 else factor
        device = self.weight.device
        # Solved rows live in one growing [capacity, D] fp32 table; slot[y] is
        # the table row of token y (-1 until solved). Both stay on the head's
        # device, so a batch's lookup is a gather, not a Python loop.
        self._slot = torch.full((vocab,), -1, dtype=torch.int64, device=device)
        self._table = torch.empty(0, dim, dtype=torch.float32, device=device)
        self.size = 0

    def _gram(self) -> torch.Tensor:
        """G = U^T U [D, D] in the solve dtype, accumulated over vocabulary chunks."""
        vocab, dim = self.weight.shape
        gram = torch.zeros(dim, dim, dtype=self.solve_dtype, device=self.weight.device)
        for start in range(0, vocab, 16384):
            chunk = self.weight[start:start + 16384].to(self.solve_dtype)
            gram += chunk.t() @ chunk
        return gram

    @property
    def table(self) -> torch.Tensor:
        """The solved rows so far, [size, D] fp32: a view, valid until ``index`` solves more rows."""
        return self._table[: self.size]

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Table rows of token ids [*] int64 -> [*] int64, solving rows not seen before.

        Negative ids (ignored tokens) map to -1. Costs a few device syncs
        (the range check, finding unseen ids) and, for those, one solve.
        """
        ids = ids.to(self._slot.device)
        vocab = self._slot.shape[0]
        valid = ids >= 0
        if ids.numel() and bool((ids >= vocab).any()):
            bad = ids[ids >= vocab].unique()[:5].tolist()
            raise ValueError(f"label ids {bad} are outside the vocabulary [0, {vocab})")
        slots = torch.where(valid, self._slot[ids.clamp(min=0)], -1)
        missing = ids[valid & (slots < 0)].unique()
        if missing.numel():
            self._solve(missing)
            slots = torch.where(valid, self._slot[ids.clamp(min=0)], -1)
        return slots

    def _solve(self, ids: torch.Tensor) -> None:
        rhs = self.weight.index_select(0, ids).to(self.solve_dtype)
        if self.inverse is not None:
            solved = (rhs @ self.inverse).float()  # G is symmetric
        else:
            solved = torch.cholesky_solve(rhs.t(), self.factor).t().float()
        new_size = self.size + ids.numel()
        if new_size > self._table.shape[0]:
            vocab = self._slot.shape[0]
            grown = torch.empty(min(max(new_size, 2 * self._table.shape[0]), vocab), self._table.shape[1],
                                dtype=self._table.dtype, device=self._table.device)
            grown[: self.size] = self._table[: self.size]
            self._table = grown
        self._table[self.size:new_size] = solved
        self._slot[ids] = torch.arange(self.size, new_size, device=self._slot.device)
        self.size = new_size

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Basis rows for token ids [M] int64 -> [M, D] fp32 on the head's device."""
        if (ids < 0).any():
            raise ValueError("token ids must be non-negative")
        slots = self.index(ids)  # may grow the table: read it after
        return self._table.index_select(0, slots)


_BASES: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its state, basis); dropped with the weight


def _weight_state(weight: torch.Tensor) -> tuple:
    """What changes when a head weight changes: storage, version counter, shape, and a strided sample."""
    sample = float(weight.detach().reshape(-1)[::4099].double().sum())
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, str(weight.device), sample)


def basis_for(head_weight: torch.Tensor, ridge: float | None = None) -> SemanticBasis:
    """The SemanticBasis of ``head_weight``, reused while the weight is unchanged (a frozen head).

    Traces repeated during training (``reselect_every``) then pay for the Gram
    matrix, its factor and the solved rows once. Any in-place update (an
    optimizer step bumps the version counter), a new storage or a changed
    sample of the values builds a fresh basis.
    """
    state = (_weight_state(head_weight), ridge)
    cached = _BASES.get(id(head_weight))
    if cached is not None and cached[0]() is head_weight and cached[1] == state:
        return cached[2]
    basis = SemanticBasis(head_weight, ridge)
    if cached is None or cached[0]() is not head_weight:
        weakref.finalize(head_weight, _BASES.pop, id(head_weight), None)
    _BASES[id(head_weight)] = (weakref.ref(head_weight), state, basis)
    return basis
