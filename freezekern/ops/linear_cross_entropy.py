"""Fused linear cross-entropy: the loss of an LM head that never forms the [N, V] logits.

    loss = linear_cross_entropy(h, weight, target, bias=None, ignore_index=-100,
                                reduction="mean", softcap=None, num_items=None, impl="auto")

Definition (Hugging Face's causal-LM loss on already shifted targets)::

    z_t = h_t @ weight.T + bias                         logits of row t, [V], accumulated in fp32
    z_t = softcap * tanh(z_t / softcap)                 when softcap is set (Gemma 2/3)
    l_t = logsumexp(z_t) - z_t[target_t]                0 where target_t == ignore_index
    "none" -> l [N]; "sum" -> sum_t l_t; "mean" -> sum_t l_t / (number of counted rows),
    or sum_t l_t / num_items when num_items is given (the Trainer's num_items_in_batch)

Shapes and dtypes:
    h        [N, D]  fp32 | bf16 | fp16 (fp64: the torch backend computes in fp64), any strides
    weight   [V, D]  the LM head weight, same device
    target   [N]     integer token ids; ``ignore_index`` rows are not counted
    bias     [V]     or None
    returns  fp32 scalar ("mean", "sum") or [N] fp32 ("none"); gradients in the dtype of their input

As in Hugging Face, a mean over no counted row is NaN (its gradients are 0). A
target outside [0, V) raises on the CPU and gives NaN on other devices.

Differentiation. Gradients are produced for the inputs that require them and
only those: a frozen head (``weight.requires_grad`` False) costs its input
gradient ``dh = (softmax(z) - onehot) * dz/dy . W`` only, never ``dW``. Two
strategies, chosen per call:

* **eager** (a scalar loss, or "none" with a frozen head and no bias gradient):
  the forward computes the loss and the gradients of each row's loss in the
  same pass over the vocabulary (the logits of a block of rows are formed
  once, [rows, V] at most, and turned into their gradient in place), and
  saves them; the backward only scales them by the incoming gradient. Same
  matmul count as the materialising path (2 GEMMs, 3 with dW).
* **recompute** (otherwise, and on the Triton backend): the forward saves h,
  weight, target and the per-row logsumexp ([N] floats); the backward
  recomputes each vocabulary chunk's logits. One GEMM more.

Eager gradients are scaled in place when the backward runs: a second backward
through the same call raises (``retain_graph`` cannot be honoured for them).

Backends (``impl``): "torch" (this file: chunked PyTorch, the ground truth of
the kernels, usable on any device), "triton" (``triton_linear_cross_entropy``),
"native" (``freezekern._C``: C++ CPU kernels and CUDA, see ``native.py``; its
autograd formula is registered here, when this module is imported),
"auto" (``dispatch.resolve_impl``). A naive materialising version lives only in
the tests.
"""

from __future__ import annotations

import torch

from freezekern.ops import dispatch, native

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Largest logits buffer (elements) the reference holds at once: a block of rows
# times a vocabulary chunk (recompute), or a block of rows times V (eager).
_REFERENCE_BUDGET = 1 << 24
_REFERENCE_VOCAB_CHUNK = 8192


# -- public op --------------------------------------------------------------------------------

def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    num_items=None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T (+ bias)`` against ``target`` without the [N, V] logits.

    See the module docstring for the definition, shapes and dtypes. ``num_items``
    (int or tensor, reduction "mean" only) replaces the count of counted rows
    as the divisor, as Hugging Face does with ``num_items_in_batch``.
    """
    _check(h, weight, target, bias, reduction, softcap, num_items)
    backend = dispatch.resolve_impl(OP, impl, h.device, h.dtype)
    softcap = None if softcap is None else float(softcap)
    ignore_index = int(ignore_index)
    reduce_sum = reduction != "none"
    grad = torch.is_grad_enabled()
    need_h = grad and h.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    eager = eager_gradients(reduce_sum, need_h, need_w, need_b) and backend != "triton"
    flags = (need_h and eager, need_w and eager, need_b and eager)
    with torch.autocast(h.device.type, enabled=False):  # fp32 accumulation whatever autocast would pick
        if backend == "native":
            loss = native.linear_cross_entropy(h, weight, target, bias, softcap, ignore_index, reduce_sum, *flags)
        else:
            kernels = _torch_kernels() if backend == "torch" else _triton_kernels()
            loss = _Function.apply(h, weight, bias, target, softcap, ignore_index, reduce_sum, flags, kernels)
    if reduction != "mean":
        return loss
    if num_items is None:
        divisor = (target != ignore_index).sum()
    else:
        divisor = num_items.to(loss.device) if torch.is_tensor(num_items) else torch.tensor(num_items)
    return divide_like_hf(loss, divisor)


def divide_like_hf(total: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """total / divisor, whose gradient is 0 (not NaN) when the divisor is 0, as in Hugging Face.

    HF's mean over no counted token is NaN with zero gradients; the fused
    backward would otherwise multiply saved zeros by an infinite scale.
    """
    divisor = divisor.to(device=total.device, dtype=total.dtype)
    nonzero = divisor != 0
    safe = torch.where(nonzero, divisor, torch.ones_like(divisor))
    return torch.where(nonzero, total / safe, total.detach() / divisor)


def eager_gradients(reduce_sum: bool, need_h: bool, need_w: bool, need_b: bool) -> bool:
    """Whether the forward computes the gradients at once (see the module docstring).

    A per-row loss ("none") has a per-row incoming gradient: dh scales row by
    row, but dW and dbias sum over rows after that scaling and need the
    recompute backward.
    """
    if not (need_h or need_w or need_b):
        return False
    return reduce_sum or not (need_w or need_b)


def _check(h, weight, target, bias, reduction, softcap, num_items) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"linear_cross_entropy: h must be a floating [N, D] tensor, got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    n, d = h.shape
    if weight.dim() != 2 or weight.shape[1] != d or not weight.is_floating_point():
        raise ValueError(f"linear_cross_entropy: weight must be a floating [V, {d}] tensor, got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or d == 0:
        raise ValueError(f"linear_cross_entropy: empty head (weight {tuple(weight.shape)}): V and D must be positive")
    if target.shape != (n,) or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: target must be an integer [{n}] tensor, got "
                         f"{tuple(target.shape)} {target.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"linear_cross_entropy: bias must be a floating [{weight.shape[0]}] tensor, "
                         f"got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but h is on {h.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be a positive number or None, got {softcap!r}")
    if num_items is not None and reduction != "mean":
        raise ValueError("linear_cross_entropy: num_items divides the summed loss; it needs reduction='mean'")


# -- autograd for the Python backends (torch, triton) ----------------------------------------

class _Function(torch.autograd.Function):
    """Differentiable wrapper around a backend's forward and recompute-backward kernels."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, softcap, ignore_index, reduce_sum, eager_flags, kernels):
        forward_kernel, _ = kernels
        loss, lse, gh, gw, gb = forward_kernel(h, weight, target, bias, softcap, ignore_index, reduce_sum,
                                               *eager_flags)
        ctx.kernels = kernels
        ctx.config = (softcap, ignore_index, reduce_sum)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        save_for_backward(ctx, h, weight, bias, target, lse, eager_flags, gh, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        softcap, ignore_index, reduce_sum = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = eager_grads(ctx, grad_loss, reduce_sum, ignore_index)
        if grads is not None:
            dh, dw, db = grads
        else:
            h, weight, bias, target, lse = ctx.saved_tensors
            grad_rows = rows_gradient(grad_loss, reduce_sum, target, ignore_index)
            _, backward_kernel = ctx.kernels
            dh, dw, db = backward_kernel(h, weight, target, bias, lse, grad_rows, softcap, ignore_index,
                                         need_h, need_w, need_b)
        return (*cast_grads((dh, dw, db), (need_h, need_w, need_b), ctx.dtypes), None, None, None, None, None,
                None)


_TWICE = (
    "linear_cross_entropy: backward ran twice through a call whose gradients were computed in its forward "
    "(they are scaled in place); recompute the loss instead of retain_graph=True, or call the op under "
    "torch.no_grad() and differentiate a fresh call"
)


def save_for_backward(ctx, h, weight, bias, target, lse, eager_flags, gh, gw, gb) -> None:
    """What the backward needs: the eager gradients, or the inputs and the per-row logsumexp."""
    ctx.eager_flags = tuple(bool(f) for f in eager_flags)
    ctx.eager_used = False
    if any(ctx.eager_flags):
        ctx.save_for_backward(target, *(g if f else None for f, g in zip(ctx.eager_flags, (gh, gw, gb))))
    else:
        ctx.save_for_backward(h, weight, bias, target, lse)


def eager_grads(ctx, grad_loss, reduce_sum, ignore_index):
    """The forward's gradients scaled by the incoming gradient (in place, once); None if there are none.

    ``gh`` [N, D] holds d l_t / d h_t per row (the same whether the loss is
    summed or not), ``gw`` [V, D] and ``gb`` [V] d (sum_t l_t) / d weight and
    / d bias.
    """
    if not any(ctx.eager_flags):
        return None
    if ctx.eager_used:
        raise RuntimeError(_TWICE)
    ctx.eager_used = True
    target, gh, gw, gb = ctx.saved_tensors
    if reduce_sum:
        return tuple(None if g is None else _scale(g, grad_loss.to(g.dtype)) for g in (gh, gw, gb))
    rows = rows_gradient(grad_loss, False, target, ignore_index)
    return (None if gh is None else _scale(gh, rows.to(gh.dtype)[:, None]), None, None)


def _scale(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # In place on plain tensors (dW is as large as the weight); out of place under tracing
    # (functional and fake tensors: torch.compile, opcheck), where saved tensors are immutable.
    return grad.mul_(factor) if type(grad) is torch.Tensor else grad * factor


def rows_gradient(grad_loss: torch.Tensor, reduce_sum: bool, target: torch.Tensor, ignore_index: int):
    """Incoming gradient per row, [N] fp32 (fp64 stays): 0 on ignored rows."""
    dtype = torch.float64 if grad_loss.dtype == torch.float64 else torch.float32
    grad = grad_loss.to(dtype)
    rows = grad.expand(target.shape[0]) if reduce_sum else grad
    return torch.where(target != ignore_index, rows, torch.zeros((), dtype=dtype, device=rows.device))


def cast_grads(grads, needs, dtypes):
    return tuple(g.to(dt) if (need and g is not None) else None for g, need, dt in zip(grads, needs, dtypes))


def _torch_kernels():
    return (forward_reference, backward_reference)


def _triton_kernels():
    from freezekern.ops import triton_linear_cross_entropy as tlce

    return (tlce.forward, tlce.backward)


# -- autograd of the native op (torch.ops.freezekern.linear_cross_entropy) -------------------

def _native_setup_context(ctx, inputs, output):
    h, weight, target, bias, softcap, ignore_index, reduce_sum, grad_h, grad_weight, grad_bias = inputs
    _, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    ctx.set_materialize_grads(False)  # else the backward gets a zero [V, D] "gradient" of grad_weight
    ctx.config = (softcap, ignore_index, reduce_sum)
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
    save_for_backward(ctx, h, weight, bias, target, lse, (grad_h, grad_weight, grad_bias), gh, gw, gb)


def _native_backward(ctx, grad_loss, *unused):
    softcap, ignore_index, reduce_sum = ctx.config
    if grad_loss is None:  # the loss itself did not reach the output being differentiated
        return (None,) * 10
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    grads = eager_grads(ctx, grad_loss, reduce_sum, ignore_index)
    if grads is None:
        h, weight, bias, target, lse = ctx.saved_tensors
        grad_rows = rows_gradient(grad_loss, reduce_sum, target, ignore_index)
        grads = torch.ops.freezekern.linear_cross_entropy_backward.default(
            h, weight, target, bias, lse, grad_rows, softcap, ignore_index, need_h, need_w, need_b)
    dh, dw, db = cast_grads(grads, (need_h, need_w, need_b), ctx.dtypes)
    return dh, dw, None, db, None, None, None, None, None, None


# Once per process (a module is imported once), before any call can reach the native op.
if native.registered(OP):
    torch.library.register_autograd(f"freezekern::{OP}", _native_backward, setup_context=_native_setup_context)


# -- the chunked PyTorch reference ------------------------------------------------------------

def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _counted(target: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row indices of counted rows, their targets, validity mask); raises on the CPU for bad targets."""
    counted = target != ignore_index
    rows = counted.nonzero().squeeze(1)
    tgt = target.index_select(0, rows).long()
    valid = (tgt >= 0) & (tgt < vocab)
    if target.device.type == "cpu" and not bool(valid.all()):
        bad = int(rows[~valid][0])
        raise ValueError(f"linear_cross_entropy: target[{bad}] = {int(target[bad])} is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index ({ignore_index})")
    return rows, tgt.clamp(0, vocab - 1), valid


def _logits(x, w_chunk, b_chunk, softcap):
    """(z, dz/dy or None) of a block: x [R, D] @ w_chunk.T (+ b), soft-capped; accumulation dtype."""
    z = x @ w_chunk.t()
    if b_chunk is not None:
        z = z + b_chunk
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, (1.0 - t) * (1.0 + t)


def _row_blocks(n_rows: int, width: int, budget: int = _REFERENCE_BUDGET):
    step = max(1, budget // max(width, 1))
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


def forward_reference(h, weight, target, bias, softcap, ignore_index, reduce_sum, eager_h=False, eager_w=False,
                      eager_b=False, *, vocab_chunk: int = _REFERENCE_VOCAB_CHUNK, budget: int = _REFERENCE_BUDGET):
    """Forward kernel of the torch backend: (loss, lse [N], gh, gw, gb).

    loss is sum_t l_t (``reduce_sum``) or l [N]; lse is the per-row logsumexp
    (NaN on ignored rows). With an ``eager_*`` flag the gradients of each
    row's loss (gh [N, D], rows) and of the summed loss (gw [V, D], gb [V])
    come too, from one pass over [rows, V] blocks; otherwise the vocabulary is
    walked in chunks with an online logsumexp. Accumulation in fp32 (fp64 for
    fp64 h); peak extra memory about ``budget`` logits.
    """
    acc = _acc_dtype(h)
    n, d = h.shape
    vocab = weight.shape[0]
    rows, tgt, valid = _counted(target, ignore_index, vocab)
    x = h.index_select(0, rows).to(acc)
    b = None if bias is None else bias.detach().to(acc)
    if eager_h or eager_w or eager_b:
        w = weight.detach().to(acc)
        loss_c, lse_c, gx, gw, gb = _eager_reference(x, w, tgt, b, softcap, eager_w, eager_b, budget)
    else:
        loss_c, lse_c = _forward_chunks(x, weight.detach(), tgt, b, softcap, vocab_chunk, budget)
        gx = gw = gb = None
    loss_c = torch.where(valid, loss_c, torch.full_like(loss_c, float("nan")))
    loss_rows = h.new_zeros(n, dtype=acc).index_copy_(0, rows, loss_c)
    lse = h.new_full((n,), float("nan"), dtype=acc).index_copy_(0, rows, lse_c)
    gh = None
    if eager_h:
        gh = h.new_zeros((n, d), dtype=acc).index_copy_(0, rows, gx)
    return (loss_rows.sum() if reduce_sum else loss_rows), lse, gh, gw, gb


def _forward_chunks(x, weight, tgt, bias, softcap, vocab_chunk, budget):
    acc = x.dtype
    n_rows, vocab = x.shape[0], weight.shape[0]
    run_max = x.new_full((n_rows,), float("-inf"))
    run_sum = x.new_zeros(n_rows)
    target_logit = x.new_zeros(n_rows)
    blocks = _row_blocks(n_rows, min(vocab_chunk, vocab), budget)
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        w_chunk = weight[v0:v1].to(acc)
        b_chunk = None if bias is None else bias[v0:v1]
        for r0, r1 in blocks:
            z, _ = _logits(x[r0:r1], w_chunk, b_chunk, softcap)
            m_old = run_max[r0:r1]
            m_new = torch.maximum(m_old, z.max(dim=1).values)
            run_sum[r0:r1] = run_sum[r0:r1] * torch.exp(m_old - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            run_max[r0:r1] = m_new
            t = tgt[r0:r1]
            inside = (t >= v0) & (t < v1)
            picked = z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            target_logit[r0:r1] = torch.where(inside, picked, target_logit[r0:r1])
    lse = run_max + torch.log(run_sum)
    return lse - target_logit, lse


def _eager_reference(x, w, tgt, bias, softcap, need_w, need_b, budget):
    n_rows, vocab = x.shape[0], w.shape[0]
    loss = x.new_empty(n_rows)
    lse = x.new_empty(n_rows)
    gx = torch.empty_like(x)
    gw = torch.zeros_like(w) if need_w else None
    gb = x.new_zeros(vocab) if need_b else None
    for r0, r1 in _row_blocks(n_rows, vocab, budget):
        z, slope = _logits(x[r0:r1], w, bias, softcap)
        t = tgt[r0:r1, None]
        block_lse = torch.logsumexp(z, dim=1)
        loss[r0:r1] = block_lse - z.gather(1, t)[:, 0]
        lse[r0:r1] = block_lse
        grad = torch.exp(z - block_lse[:, None])  # softmax, then its gradient in place
        grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
        if slope is not None:
            grad.mul_(slope)
        gx[r0:r1] = grad @ w
        if gw is not None:
            gw.addmm_(grad.t(), x[r0:r1])
        if gb is not None:
            gb += grad.sum(0)
    return loss, lse, gx, gw, gb


def backward_reference(h, weight, target, bias, lse, grad_rows, softcap, ignore_index, need_h, need_w, need_b,
                       *, vocab_chunk: int = _REFERENCE_VOCAB_CHUNK, budget: int = _REFERENCE_BUDGET):
    """Recompute-backward kernel of the torch backend: (dh [N, D], dW [V, D], db [V]) in the accumulation dtype.

    grad_rows [N] is the incoming gradient of each row's loss (0 on ignored
    rows). Each vocabulary chunk's logits are recomputed and turned into
    g_t (softmax - onehot) dz/dy in place; dh, dW and db only where asked
    (None otherwise).
    """
    acc = _acc_dtype(h)
    n, d = h.shape
    vocab = weight.shape[0]
    rows, tgt, _ = _counted(target, ignore_index, vocab)
    x = h.detach().index_select(0, rows).to(acc)
    g = grad_rows.index_select(0, rows).to(acc)
    lse_c = lse.index_select(0, rows).to(acc)
    b = None if bias is None else bias.detach().to(acc)
    dx = torch.zeros_like(x) if need_h else None
    dw = h.new_zeros((vocab, d), dtype=acc) if need_w else None
    db = h.new_zeros(vocab, dtype=acc) if need_b else None
    blocks = _row_blocks(x.shape[0], min(vocab_chunk, vocab), budget)
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        w_chunk = weight.detach()[v0:v1].to(acc)
        for r0, r1 in blocks:
            z, slope = _logits(x[r0:r1], w_chunk, None if b is None else b[v0:v1], softcap)
            grad = torch.exp(z - lse_c[r0:r1, None])
            t = tgt[r0:r1]
            inside = (t >= v0) & (t < v1)
            cols = (t - v0).clamp(0, v1 - v0 - 1)[:, None]
            grad.scatter_add_(1, cols, -inside.to(acc)[:, None])
            if slope is not None:
                grad.mul_(slope)
            grad.mul_(g[r0:r1, None])
            if dx is not None:
                dx[r0:r1].addmm_(grad, w_chunk)
            if dw is not None:
                dw[v0:v1].addmm_(grad.t(), x[r0:r1])
            if db is not None:
                db[v0:v1] += grad.sum(0)
    dh = None
    if dx is not None:
        dh = h.new_zeros((n, d), dtype=acc).index_copy_(0, rows, dx)
    return dh, dw, db


__all__ = ["REDUCTIONS", "backward_reference", "divide_like_hf", "eager_gradients", "forward_reference",
           "linear_cross_entropy"]
