"""The depth law D_hat(k) = E + A (k + 1)^-alpha, fitted robustly to a trace, and the gains it gives.

* the law is fitted to the reductions of the spaces k = s..L, robustly (the
  largest residuals, the moves, are trimmed), where s skips a leading
  *transient*: first reductions far above the median reduction after them and
  as large as all the trace still drops (``regime_start``; tied, scaled input
  embeddings make D_1, D_2 ... tens of times the rest, and a fit that serves
  them explains nothing above);
* the gain of layer l = s+1..L is its observed reduction r_l = D_{l-1} - D_l
  minus the reduction the law expects, rhat_l = D_hat(l-1) - D_hat(l);
* ``move_is_significant``: whether any gain reaches ``MIN_MOVE_SHARE`` of the
  drop D_s - D_L (else the trace has no semantic move).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHA_GRID = np.geomspace(1e-3, 20.0, 4000)
TRANSIENT_RATIO = 10.0
TRANSIENT_SHARE = 0.5
TRIM_SHARE = 0.2
MAX_TRANSIENT_SHARE = 1.0 / 3.0
MIN_MOVE_SHARE = 0.02


@dataclass
class ScalingFit:
    """D_hat(k) = E + A * (k + 1) ** -alpha over the spaces k = start..L.

    ``trimmed``: the layers whose reductions were left out of the fit as moves
    (the largest residuals); ``sse``: the squared error of the kept reductions.
    """

    E: float
    A: float
    alpha: float
    sse: float
    start: int = 1
    trimmed: list[int] = field(default_factory=list)

    def __call__(self, k) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(k, dtype=np.float64) + 1.0, -self.alpha)


def regime_start(deviations) -> int:
    """First latent space of the depth-law regime: 1, or later when the trace opens with a transient.

    Space s is dropped while its reduction into s+1 is both ``TRANSIENT_RATIO``
    times the median absolute reduction of the spaces after it and at least
    ``TRANSIENT_SHARE`` of everything the trace still drops after it
    (D_{s+1} - D_L): a level far above the rest, not the steep start of a power
    law. At most a third of the blocks are dropped. Reductions are differences
    of the trace, and the tests compare them with each other, so the result does
    not change under D -> c D or D -> D + c.
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    start = 1
    limit = max(1, int(num_layers * MAX_TRANSIENT_SHARE))
    while start < limit and num_layers - start >= 3:
        first = d[start] - d[start + 1]
        rest = np.abs(d[start + 1:-1] - d[start + 2:])
        remaining = d[start + 1] - d[-1]
        if not (first > 0 and first > TRANSIENT_RATIO * float(np.median(rest))
                and first >= TRANSIENT_SHARE * remaining):
            break
        start += 1
    return start


def fit_scaling_law(deviations, alphas: np.ndarray = ALPHA_GRID, start: int = 1) -> ScalingFit:
    """Fit the depth law to the reductions of D_start..D_L (``deviations`` holds D_0..D_L).

    The law's reduction of layer l is A (l^-alpha - (l+1)^-alpha). For each
    alpha on a fixed grid, A >= 0 is the closed-form least-squares value over
    the kept reductions; the alpha with the smallest squared error wins (first
    on ties). Then the ``TRIM_SHARE`` largest residuals are left out and the fit
    is repeated (up to three times): a move is one large reduction, and a fit
    that bends towards it would hide it. Fitting reductions makes the law
    blind to a constant shift of the trace; E only places the curve (the
    median level left over by the fitted A and alpha).
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    layers = np.arange(start + 1, num_layers + 1)
    if start < 1 or layers.size < 2:
        raise ValueError("the scaling-law fit needs at least three latent spaces after the embedding")
    r = d[layers - 1] - d[layers]
    x = np.power(layers[None, :].astype(np.float64), -alphas[:, None]) \
        - np.power(layers[None, :] + 1.0, -alphas[:, None])  # [G, n]
    keep = np.ones(layers.size, dtype=bool)
    drop = int(TRIM_SHARE * layers.size) if layers.size >= 3 else 0
    for _ in range(3):
        xk, rk = x[:, keep], r[keep]
        sxx, sxr = (xk * xk).sum(1), (xk * rk).sum(1)
        a = np.maximum(np.where(sxx > 0, sxr / np.where(sxx > 0, sxx, 1.0), 0.0), 0.0)
        sse = ((rk[None, :] - a[:, None] * xk) ** 2).sum(1)
        g = int(np.argmin(sse))
        residual = np.abs(r - a[g] * x[g])
        new_keep = np.ones(layers.size, dtype=bool)
        if drop:
            new_keep[np.argsort(-residual, kind="stable")[:drop]] = False
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    spaces = np.arange(start, num_layers + 1)
    level = float(np.median(d[spaces] - a[g] * np.power(spaces + 1.0, -alphas[g])))
    return ScalingFit(E=level, A=float(a[g]), alpha=float(alphas[g]), sse=float(sse[g]), start=start,
                      trimmed=[int(v) for v in layers[~keep]])


def layer_gains(deviations, fit: ScalingFit) -> tuple[list[float], list[float], list[float]]:
    """Observed reductions r_l, expected reductions rhat_l and gains G_l for l = fit.start+1..L.

    Each returned list has L + 1 entries indexed by layer l; entries outside
    that range are NaN.
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    r = [math.nan] * (num_layers + 1)
    rhat = [math.nan] * (num_layers + 1)
    gains = [math.nan] * (num_layers + 1)
    for layer in range(fit.start + 1, num_layers + 1):
        r[layer] = float(d[layer - 1] - d[layer])
        rhat[layer] = float(fit(layer - 1) - fit(layer))
        gains[layer] = r[layer] - rhat[layer]
    return r, rhat, gains


def move_is_significant(deviations, gains: list[float], candidates: list[int], start: int) -> tuple[bool, str]:
    """Whether the best candidate's gain is at least ``MIN_MOVE_SHARE`` of the trace's drop D_start - D_L.

    A trace that follows the depth law leaves gains of rounding size; any
    layer would then be an arbitrary pick.
    """
    best = max(gains[c] for c in candidates)
    drop = abs(float(deviations[start] - deviations[-1]))
    if best <= MIN_MOVE_SHARE * drop:
        return False, f"the largest gain ({best:.3g}) is below {MIN_MOVE_SHARE:.0%} of the trace's drop ({drop:.3g})"
    return True, ""
