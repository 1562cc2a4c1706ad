"""What a training step costs, part by part: the one formula the plan, ``profile`` and the benchmarks use.

A step of a causal LM with L blocks is priced from per-part costs, in any
one unit (estimated FLOPs per token for a plan, measured seconds for a
profile):

    forward    embedding + sum_i block_forward[i] + head_forward + loss
    recompute  sum over checkpointed blocks the backward passes through of block_recompute[i]
               (block_forward[i] unless measured apart)
    backward   loss_backward                 (the loss's own backward; ``loss`` again when not given)
             + head_input_grad               when anything below the head trains
             + head_weight_grad              when the head trains
             + block_input_grad[i]           for every block the gradient passes *through*
             + block_weight_grad[i]          for every block whose own weights train
             + embedding_grad                when the embedding trains

The gradient passes through block i when something below it trains (a
lower block, adapters in a lower block, or the embedding) or when the
backward is forced down by the setup (plain ``requires_grad_(False)``
freezing under Hugging Face checkpointing, where ``enable_input_require_grads``
makes the embedding output require grad: ``backward_floor=0``). The lowest
trained block computes its weight gradient only: freezekern's cut means
nothing below it asks for an input gradient.

``StepSetup`` says what trains; ``step_cost(costs, setup)`` is the sum above
and ``step_cost_parts`` the same sum split by part. ``flop_costs`` estimates
per-part FLOPs per token from parameter counts: 2 FLOPs per weight and
token for a forward matmul, the same again for its input gradient and for
its weight gradient; attention scores add 2 T D per block and token
forward (causal average over a sequence of T tokens) and twice that
backward, all of it input gradient. Norms, the softmax and the optimizer
are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PartCosts:
    """Per-part cost of one step, one unit for all (FLOPs per token, or seconds).

    Lists hold one entry per block, block 1 first ([L] floats).
    """

    block_forward: tuple[float, ...]
    block_input_grad: tuple[float, ...]
    block_weight_grad: tuple[float, ...]
    head_forward: float
    head_input_grad: float
    head_weight_grad: float
    embedding_forward: float = 0.0
    embedding_grad: float = 0.0
    loss: float = 0.0
    loss_backward: float | None = None  # the loss's backward; None: the same as its forward (``loss``)
    block_recompute: tuple[float, ...] | None = None  # [L] a checkpointed block's recomputation; None: its forward

    def __post_init__(self):
        n = len(self.block_forward)
        if n == 0 or len(self.block_input_grad) != n or len(self.block_weight_grad) != n:
            raise ValueError("PartCosts needs one forward, input-gradient and weight-gradient cost per block")
        if self.block_recompute is not None and len(self.block_recompute) != n:
            raise ValueError("PartCosts.block_recompute needs one cost per block")

    @property
    def num_layers(self) -> int:
        return len(self.block_forward)


@dataclass(frozen=True)
class StepSetup:
    """What one training step computes.

    ``boundary`` k: blocks 1..k frozen (0: every block trains). ``cut``:
    freezekern's truncated backward (the prefix runs graph-free); without it
    ``backward_floor`` says how far down the backward runs anyway (0 = to
    the embedding output, as plain freezing under checkpointing does; None =
    no lower than the lowest trainable part). ``block_weights``: the trained
    blocks' own weights get gradients (False for LoRA: the adapters'
    own matmuls are not counted, the gradient through every adapter block is). ``checkpointing``: trained blocks are recomputed in the
    backward. ``prefix_skipped``: the frozen prefix's forward is not run
    (prefix cache hit).
    """

    boundary: int
    train_head: bool
    train_embeddings: bool = False
    block_weights: bool = True
    checkpointing: bool = False
    cut: bool = True
    backward_floor: int | None = None
    prefix_skipped: bool = False


def full_finetuning() -> StepSetup:
    """Every parameter trains, nothing is cut."""
    return StepSetup(boundary=0, train_head=True, train_embeddings=True, cut=False)


def step_cost_parts(costs: PartCosts, setup: StepSetup) -> dict[str, float]:
    """The step's cost split into forward, recompute and backward parts (see the module docstring)."""
    num_layers = costs.num_layers
    k = setup.boundary
    if not 0 <= k <= num_layers:
        raise ValueError(f"boundary {k} is outside [0, {num_layers}]")
    if setup.prefix_skipped and not setup.cut:
        raise ValueError("a skipped prefix needs the cut")
    trained = range(k, num_layers)  # 0-based indices of the trained blocks
    # floor: the 0-based block whose parameters are the lowest to need a gradient; -1 is the
    # embedding output, num_layers means no block. Blocks above the floor pass the gradient through.
    floor = -1 if setup.train_embeddings else k
    if not setup.cut and setup.backward_floor is not None:
        if not 0 <= setup.backward_floor <= num_layers:
            raise ValueError(f"backward_floor {setup.backward_floor} is outside [0, {num_layers}]")
        floor = min(floor, setup.backward_floor - 1)
    first_forward = k if setup.prefix_skipped else 0
    forward = costs.embedding_forward * (not setup.prefix_skipped) + sum(costs.block_forward[first_forward:])
    forward += costs.head_forward + costs.loss
    anything_below_head = floor < num_layers
    backward = costs.loss if costs.loss_backward is None else costs.loss_backward
    if anything_below_head:
        backward += costs.head_input_grad
    if setup.train_head:
        backward += costs.head_weight_grad
    # Blocks whose input gradient is computed. LoRA adapters sit inside their block, so the lowest
    # adapter block propagates through its own layers as well.
    lowest_through = floor + 1 if setup.block_weights else floor
    through = range(max(lowest_through, 0), num_layers)
    backward += sum(costs.block_input_grad[i] for i in through)
    if setup.block_weights:
        backward += sum(costs.block_weight_grad[i] for i in trained)
    if setup.train_embeddings:
        backward += costs.embedding_grad
    reached = range(max(floor, 0), num_layers)  # blocks the backward runs in at all
    replay = costs.block_forward if costs.block_recompute is None else costs.block_recompute
    recompute = sum(replay[i] for i in reached) if setup.checkpointing else 0.0
    return {"forward": forward, "recompute": recompute, "backward": backward,
            "total": forward + recompute + backward}


def step_cost(costs: PartCosts, setup: StepSetup) -> float:
    """Total cost of one step under ``setup``, in the unit of ``costs``."""
    return step_cost_parts(costs, setup)["total"]


def step_fraction(costs: PartCosts, setup: StepSetup, baseline: StepSetup | None = None) -> float:
    """``setup``'s step cost over ``baseline``'s (full fine-tuning without checkpointing by default)."""
    return step_cost(costs, setup) / step_cost(costs, baseline or full_finetuning())


def flop_costs(parameter_counts: Mapping, *, hidden_size: int | None = None, seq_len: int | None = None) -> PartCosts:
    """Estimated FLOPs per token of each part, from ``ModelParts.parameter_counts()``-style counts.

    ``parameter_counts["blocks"]`` [L] ints, ``["lm_head_trainable"]`` (V x D,
    also when tied) or ``["lm_head"]``. With ``hidden_size`` and ``seq_len``
    the attention scores are counted too.
    """
    blocks = [float(p) for p in parameter_counts["blocks"]]
    head = float(parameter_counts.get("lm_head_trainable") or parameter_counts.get("lm_head") or 0)
    attention = 2.0 * hidden_size * seq_len if hidden_size and seq_len else 0.0
    return PartCosts(
        block_forward=tuple(2 * p + attention for p in blocks),
        block_input_grad=tuple(2 * p + 2 * attention for p in blocks),
        block_weight_grad=tuple(2 * p for p in blocks),
        head_forward=2 * head,
        head_input_grad=2 * head,
        head_weight_grad=2 * head,
    )
