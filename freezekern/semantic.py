"""Semantic basis: the latent vector the LM head maps closest to a one-hot.

For the output embedding U [V, D], s_y solves (U^T U + lambda I) s_y = U[y]^T,
i.e. row y of the ridge-regularised pseudo-inverse of U^T. G = U^T U is
factored once (Cholesky, fp64 when D <= 4096, else fp32) and rows are solved
lazily, only for label ids that occur, then cached.
"""

from __future__ import annotations

import torch

FP64_MAX_DIM = 4096


class SemanticBasis:
    """Lazily solved semantic-basis rows for one LM head.

    ``head_weight`` [V, D] any float dtype; ``ridge`` lambda (default
    1e-6 * trace(G) / D). ``rows(ids)`` returns [len(ids), D] fp32 on
    ``head_weight.device``.
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
        self.factor = factor
        self._cache: dict[int, torch.Tensor] = {}

    def _gram(self) -> torch.Tensor:
        """G = U^T U [D, D] in the solve dtype, accumulated over vocabulary chunks."""
        vocab, dim = self.weight.shape
        gram = torch.zeros(dim, dim, dtype=self.solve_dtype, device=self.weight.device)
        for start in range(0, vocab, 16384):
            chunk = self.weight[start:start + 16384].to(self.solve_dtype)
            gram += chunk.t() @ chunk
        return gram

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Basis rows for token ids [M] int64 -> [M, D] fp32."""
        ids_list = ids.tolist()
        missing = sorted({i for i in ids_list if i not in self._cache})
        if missing:
            vocab = self.weight.shape[0]
            bad = [i for i in missing if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"label ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            rhs = self.weight[torch.tensor(missing, device=self.weight.device)].to(self.solve_dtype).t()
            solved = torch.cholesky_solve(rhs, self.factor).t().float()
            for i, row in zip(missing, solved):
                self._cache[i] = row
        if not ids_list:
            return torch.zeros(0, self.weight.shape[1], device=self.weight.device)
        return torch.stack([self._cache[i] for i in ids_list])
