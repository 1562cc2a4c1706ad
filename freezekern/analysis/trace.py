"""Streaming deviation tracer: one forward pass, L+1 running sums, no stored states.

A forward pre-hook on the first block sees h_0 and a forward hook on every
block sees h_k the moment it is produced; each is reduced at once to per-token
deviations (``freezekern.ops``) and folded into fp64 sums. The forward is
stopped after the last block, so the model's own [B, T, V] logits are never
built. Memory: O(L) accumulators plus the model's own working set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from freezekern import ops
from freezekern.analysis.semantic import basis_for
from freezekern.io import JsonRecord
from freezekern.model.data import IGNORE_INDEX
from freezekern.model.parts import ModelParts, block_hidden_input, block_output_hidden, discover

METRICS = ("cosine", "logit_lens")


@dataclass
class DeviationTrace(JsonRecord):
    """Mean deviation D_k per latent space k = 0..L, with what it was measured on.

    ``deviations`` [L+1] floats; ``sums`` [L+1] fp64 sums over ``token_count``
    counted tokens (kept so traces from several ranks or runs can be merged).
    ``parameter_counts`` holds per-part parameter counts for the cost model.
    """

    metric: str
    deviations: list[float]
    sums: list[float]
    token_count: int
    num_layers: int
    model_id: str
    fingerprint: str
    tied: bool
    parameter_counts: dict
    apply_final_norm: bool = True
    impl: str = "auto"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, traces: list[DeviationTrace]) -> DeviationTrace:
        """Token-weighted combination of traces of one model and metric."""
        if not traces:
            raise ValueError("merge needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.metric, t.fingerprint, t.apply_final_norm) != (first.metric, first.fingerprint, first.apply_final_norm):
                raise ValueError("cannot merge traces of different models, metrics or norm settings")
        sums = [sum(vals) for vals in zip(*(t.sums for t in traces))]
        count = sum(t.token_count for t in traces)
        merged = cls.from_dict(first.to_dict())
        merged.sums = sums
        merged.token_count = count
        merged.deviations = [s / count for s in sums]
        merged.seconds = sum(t.seconds for t in traces)
        return merged


class _StopForward(Exception):
    """Raised after the last block: the trace needs nothing past it."""


def shifted_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets [B, T] int64 for a batch; IGNORE_INDEX where not counted.

    Position t is scored against labels[t + 1] (HF causal-LM convention: labels
    are aligned with input_ids and shifted inside the loss). Without labels,
    input_ids masked by attention_mask are used.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _as_batch(batch, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("each batch must be a LongTensor [B, T] of token ids or a mapping with 'input_ids'")
    out = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    if out["input_ids"].dim() == 1:
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    return out


class _SpaceReducer:
    """Reduces one latent space's hidden state to deviations and adds them up.

    Per batch, ``start_batch`` does the host-side work once (counted rows,
    basis lookup); per latent space ``__call__`` only launches the op and one
    fp64 sum, with the backend resolved once per dtype.
    """

    def __init__(self, parts: ModelParts, metric: str, impl: str, apply_final_norm: bool, ridge: float | None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.op = "cosine_deviation" if metric == "cosine" else "logit_lens_deviation"
        if impl != "auto":  # a bad or unavailable impl fails before the forward; auto always resolves
            ops.resolve_impl(self.op, impl, parts.head_weight.device)
        self.parts = parts
        self.impl = impl
        norm_kwargs = parts.norm_kwargs() if apply_final_norm else {"norm": None}
        if metric == "cosine":
            self.basis = basis_for(parts.head_weight, ridge)
            self.op_kwargs = norm_kwargs
        else:
            self.basis = None
            head_bias = parts.head_bias
            self.op_kwargs = dict(norm_kwargs, bias=None if head_bias is None else head_bias.detach(),
                                  ignore_index=IGNORE_INDEX)
        self.kernels: dict[torch.dtype, object] = {}
        self.rows: torch.Tensor | None = None  # counted row indices, or None for all rows
        self.targets: torch.Tensor | None = None
        self.operand: torch.Tensor | None = None  # basis table (cosine) or LM head weight (logit lens)

    def start_batch(self, targets: torch.Tensor) -> int:
        flat = targets.reshape(-1)
        if bool(((flat < 0) & (flat != IGNORE_INDEX)).any()):
            bad = flat[(flat < 0) & (flat != IGNORE_INDEX)].unique()[:5].tolist()
            raise ValueError(f"labels {bad} are negative; only {IGNORE_INDEX} marks an ignored token")
        counted = flat != IGNORE_INDEX
        n_counted = int(counted.sum())
        # Gathering counted rows copies one hidden state; worth it only when many are ignored.
        self.rows = None if n_counted > 0.75 * flat.numel() else counted.nonzero().squeeze(1)
        kept = flat if self.rows is None else flat[self.rows]
        if self.basis is not None:
            self.targets = self.basis.index(kept)  # ignored (-100) -> -1
            self.operand = self.basis.table
        else:
            self.targets = kept
            self.operand = self.parts.head_weight.detach()
        return n_counted

    def __call__(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """hidden [B, T, D] -> ``out`` (0-dim fp64): the sum of deviations of counted tokens.

        Everything is reduced on the LM head's device; a block placed on
        another device (a model split across GPUs) has its output copied over.
        """
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.device != self.operand.device:
            flat = flat.to(self.operand.device)
        if self.rows is not None:
            flat = flat.index_select(0, self.rows)
        kernel = self.kernels.get(flat.dtype)
        if kernel is None:
            kernel = self.kernels[flat.dtype] = ops.kernel_for(self.op, self.impl, flat.device, flat.dtype)
        dev = kernel(flat, self.operand, self.targets, **self.op_kwargs)
        torch.sum(dev, dim=0, dtype=torch.float64, out=out)


def _first_hidden(args, kwargs) -> torch.Tensor:
    hidden, _ = block_hidden_input(args, kwargs)
    if hidden is None:
        raise TypeError("cannot find the hidden state among the first block's inputs")
    return hidden


def analyze(
    model: nn.Module,
    batches: Iterable,
    metric: str = "cosine",
    impl: str = "auto",
    *,
    parts: ModelParts | None = None,
    apply_final_norm: bool = True,
    ridge: float | None = None,
    progress: bool = True,
    model_id: str | None = None,
    full_forward: bool = False,
) -> DeviationTrace:
    """Trace the mean deviation of every latent space h_0..h_L over ``batches``.

    ``batches``: an iterable of LongTensor [B, T] token ids, or of mappings with
    ``input_ids`` [B, T] and optional ``attention_mask`` [B, T] and ``labels``
    [B, T] (-100 = ignored, HF convention: shifted inside). Returns a
    DeviationTrace whose ``deviations[k]`` is D_k. The forward stops after
    the last block unless ``full_forward`` (engines whose module hooks must see
    every forward finish, e.g. FSDP2's root unit: the head then runs too).
    """
    from tqdm.auto import tqdm

    parts = parts or discover(model)
    reducer = _SpaceReducer(parts, metric, impl, apply_final_norm, ridge)
    num_layers = parts.num_layers
    device = parts.head_weight.device
    sums = torch.zeros(num_layers + 1, dtype=torch.float64, device=device)
    state = {"batch_sums": None}

    def on_first_input(module, args, kwargs):
        reducer(_first_hidden(args, kwargs), state["batch_sums"][0])

    def make_on_output(k: int):
        def on_output(module, args, output):
            reducer(block_output_hidden(output), state["batch_sums"][k])
            if k == num_layers and not full_forward:
                raise _StopForward

        return on_output

    handles = [parts.blocks[0].register_forward_pre_hook(on_first_input, with_kwargs=True)]
    handles += [block.register_forward_hook(make_on_output(k + 1)) for k, block in enumerate(parts.blocks)]
    was_training = model.training
    model.eval()
    token_count = 0
    start = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with torch.no_grad():
            for index, raw in enumerate(tqdm(batches, total=total, desc=f"trace[{metric}]", disable=not progress)):
                batch = _as_batch(raw, device)
                n_counted = reducer.start_batch(shifted_targets(batch))
                if n_counted == 0:
                    continue
                state["batch_sums"] = torch.zeros_like(sums)
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
                except _StopForward:
                    pass
                bad = ~torch.isfinite(state["batch_sums"])
                if bad.any():
                    first = int(bad.nonzero()[0, 0])
                    raise FloatingPointError(
                        f"non-finite deviation first appears in latent space h_{first} "
                        f"({'embedding output' if first == 0 else f'output of block {first}'}) in batch {index}; "
                        "the hidden states overflow or hold NaN: try a wider dtype (--dtype float32)"
                    )
                sums += state["batch_sums"]
                token_count += n_counted
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if token_count == 0:
        raise ValueError("no counted tokens: every label is ignored (-100) or the data yielded no batches")
    sums_list = sums.tolist()
    name = model_id or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return DeviationTrace(
        metric=metric,
        deviations=[s / token_count for s in sums_list],
        sums=sums_list,
        token_count=token_count,
        num_layers=num_layers,
        model_id=str(name),
        fingerprint=parts.fingerprint(),
        tied=parts.tied,
        parameter_counts=parts.parameter_counts(),
        apply_final_norm=apply_final_norm,
        impl=impl,
        seconds=time.perf_counter() - start,
        notes=list(parts.notes),
    )
