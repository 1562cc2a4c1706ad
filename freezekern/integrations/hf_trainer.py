"""Hugging Face Trainer: analyse, plan and cut from a callback.

    from freezekern.integrations import FreezeKernCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[FreezeKernCallback()])
    trainer.train()

When applied
------------
* ``plan=`` given (or ``calibration_data=`` batches to analyse): at the end of
  ``Trainer.__init__`` (``on_init_end``), before the Trainer builds its
  optimizer or wraps the model in DDP. The optimizer then holds only the
  trainable parameters and DDP needs no ``find_unused_parameters``.
* otherwise: at ``on_train_begin``, after analysing the first
  ``calibration_batches`` batches of the training set (read through the
  train dataloader's dataset and collator, in order, without touching the
  training sampler or RNG). The Trainer has built its optimizer by then; the
  frozen parameters stay in it without gradients, which PyTorch optimizers
  skip (no state is ever created for them). Under DDP this path needs
  ``ddp_find_unused_parameters=True`` (refused otherwise, with that advice):
  pass ``plan=`` to avoid it.

Checkpoints and resume
----------------------
``on_save`` writes the plan (and the trace, when one was made) into every
checkpoint directory as ``freezekern_plan.json`` / ``freezekern_trace.json``.
On resume (``state.global_step > 0`` at ``on_train_begin``) the plan found in
``<output_dir>/checkpoint-<step>`` (or ``args.resume_from_checkpoint``) wins:
the same boundary is restored, nothing is re-analysed.

Progressive freezing
--------------------
``reselect_every=N`` re-traces the most recent training batch every N steps
(cheap with the cosine metric), re-plans with the same policy and moves the
boundary deeper only; parameters that become frozen lose their gradient and
optimizer state. With torch.distributed, traces are merged across ranks and
the minimum boundary is taken, so all ranks move together.

The current boundary is added to the Trainer's logs as ``freezekern_boundary``.
"""

from __future__ import annotations

import logging
import os
import random
from itertools import islice

import torch
from transformers import TrainerCallback

from freezekern.integrations.distributed import agree_on_boundary, agree_on_plan, is_distributed, merge_traces
from freezekern.policy import FreezePlan
from freezekern.policy import plan as make_plan
from freezekern.trace import DeviationTrace, analyze
from freezekern.truncate import FreezeHandle, active_handle, apply, move_boundary

logger = logging.getLogger("freezekern.hf_trainer")

PLAN_FILE = "freezekern_plan.json"
TRACE_FILE = "freezekern_trace.json"


class FreezeKernCallback(TrainerCallback):
    """Apply a freeze plan to the Trainer's model; analyse first when no plan is given.

    ``policy``/``metric``/``budget`` are those of ``freezekern.plan`` /
    ``freezekern.analyze``; ``calibration_batches`` how many training batches
    to analyse; ``calibration_data`` optional batches to analyse at init
    instead; ``reselect_every`` N for progressive freezing; ``train_head``,
    ``frozen_adapters`` and ``fused_loss`` (the fused LM-head loss: no logits
    are built for forwards with labels, see ``freezekern.fused_loss``) go to
    ``freezekern.truncate.apply``; ``policy_kwargs`` (e.g. ``{"n_frozen": 3}``
    for policy "fixed") to ``freezekern.plan``.
    """

    def __init__(
        self,
        plan: FreezePlan | None = None,
        policy: str = "salf",
        metric: str = "cosine",
        budget: float | None = None,
        calibration_batches: int = 4,
        reselect_every: int | None = None,
        *,
        calibration_data=None,
        train_head: bool | None = None,
        frozen_adapters: str = "refuse",
        policy_kwargs: dict | None = None,
        fused_loss: bool = False,
    ):
        if reselect_every is not None and reselect_every < 1:
            raise ValueError(f"reselect_every must be a positive number of steps, got {reselect_every}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {calibration_batches}")
        self.plan = plan
        self.policy = policy
        self.metric = metric
        self.budget = budget
        self.calibration_batches = calibration_batches
        self.reselect_every = reselect_every
        self.calibration_data = calibration_data
        self.train_head = train_head
        self.frozen_adapters = frozen_adapters
        self.fused_loss = fused_loss
        self.policy_kwargs = dict(policy_kwargs or {})
        self.trace: DeviationTrace | None = None
        self.handle: FreezeHandle | None = None
        self.analysed = False
        self.restored_from: str | None = None
        self.moves: list[tuple[int, int, int]] = []  # (global_step, old k, new k)
        self._applied_at_init = False
        self._last_batch: dict | None = None
        self._batch_hook = None

    # -- helpers ------------------------------------------------------------------------------
    def _make_plan(self, trace: DeviationTrace) -> FreezePlan:
        kwargs = dict(self.policy_kwargs)
        if self.train_head is not None:
            kwargs.setdefault("train_head", self.train_head)
        return make_plan(trace, self.policy, budget=self.budget, **kwargs)

    def _analyse(self, model, batches) -> FreezePlan:
        trace = analyze(model, batches, self.metric, progress=False)
        trace = merge_traces(trace)
        self.trace = trace
        self.analysed = True
        new_plan = agree_on_plan(self._make_plan(trace), trace.parameter_counts)
        logger.info("freezekern trace [%s] over %d tokens: %s", trace.metric, trace.token_count,
                    ", ".join(f"{d:.4f}" for d in trace.deviations))
        return new_plan

    def _apply(self, model, plan: FreezePlan) -> None:
        existing = self.handle if self.handle is not None and self.handle.active else active_handle(model)
        if existing is not None and existing.active:
            if existing.boundary == plan.boundary:
                self.handle, self.plan = existing, plan
                return
            existing.remove()
        self.handle = apply(model, plan, train_head=self.train_head, frozen_adapters=self.frozen_adapters,
                            fused_loss=self.fused_loss)
        self.plan = plan
        logger.info("freezekern boundary: blocks 1..%d of %d frozen, backward through %d blocks\n%s",
                    plan.boundary, plan.num_layers, plan.num_layers - plan.boundary, plan)

    @staticmethod
    def _checkpoint_plan(args, state) -> tuple[FreezePlan | None, str | None]:
        candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str):
            candidates.insert(0, resume)
        for folder in candidates:
            path = os.path.join(folder, PLAN_FILE)
            if os.path.isfile(path):
                return FreezePlan.load(path), folder
        return None, None

    def _check_ddp_after_wrap(self, args, model, why: str) -> None:
        if not is_distributed():
            return
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:
            checkpointing = bool(getattr(model, "is_activation_checkpointing", False)) or bool(
                getattr(args, "activation_checkpointing", False))
            find_unused = not checkpointing
        if not find_unused:
            raise RuntimeError(
                f"freezekern would {why} after the Trainer wrapped the model in DDP without find_unused_parameters, "
                "which then waits for gradients of frozen parameters. Pass FreezeKernCallback(plan=...) (or "
                "calibration_data=...) so the plan is applied before wrapping, or set ddp_find_unused_parameters=True"
            )

    # -- events -------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self.plan is None and self.calibration_data is not None:
            self.plan = self._analyse(model, self.calibration_data)
        if self.plan is not None:
            self._apply(model, self.plan)
            self._applied_at_init = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None:
            raise RuntimeError("FreezeKernCallback needs the Trainer's model")
        restored = None
        if state.global_step > 0:
            restored, folder = self._checkpoint_plan(args, state)
            if restored is not None:
                self.restored_from = folder
                logger.info("freezekern: restoring boundary %d from %s", restored.boundary, folder)
            else:
                logger.warning("freezekern: resumed at step %d but no %s was found in the checkpoint",
                               state.global_step, PLAN_FILE)
        if restored is not None:
            current = self.handle if self.handle is not None and self.handle.active else active_handle(model)
            if current is not None and current.boundary == restored.boundary:
                self.handle, self.plan = current, restored
            elif current is not None and restored.boundary > current.boundary:
                self._check_ddp_after_wrap(args, model, "freeze more parameters")
                self.handle, self.plan = move_boundary(current, restored, optimizer=optimizer), restored
            else:
                self._check_ddp_after_wrap(args, model, "change the frozen parameters")
                self._apply(model, restored)
        elif self.handle is None or not self.handle.active:
            if self.plan is None:
                if train_dataloader is None:
                    raise RuntimeError("FreezeKernCallback got no train dataloader to analyse; pass plan=")
                self.plan = self._analyse(model, _calibration_batches(train_dataloader, self.calibration_batches))
            self._check_ddp_after_wrap(args, model, "freeze parameters")
            self._apply(model, self.plan)
        for p in model.parameters():
            if not p.requires_grad:
                p.grad = None
        if self.reselect_every:
            self._check_ddp_after_wrap(args, model, "move the boundary during training (reselect_every)")
            self._batch_hook = model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)

    def _remember_batch(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled() and isinstance(kwargs.get("input_ids"), torch.Tensor):
            self._last_batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels")
                                if isinstance(kwargs.get(k), torch.Tensor)}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.reselect_every or state.global_step % self.reselect_every != 0:
            return
        if self.handle is None or not self.handle.active or self._last_batch is None:
            return
        batch = {k: v.detach() for k, v in self._last_batch.items()}
        trace = merge_traces(analyze(model, [batch], self.metric, progress=False))
        try:
            candidate = self._make_plan(trace)
        except ValueError as exc:  # e.g. no candidate meets the budget: keep the current boundary
            logger.warning("freezekern reselect at step %d: %s", state.global_step, exc)
            return
        new_k = agree_on_boundary(candidate.boundary)
        old_k = self.handle.boundary
        if new_k <= old_k:
            return
        if new_k != candidate.boundary:
            candidate = agree_on_plan(candidate, trace.parameter_counts)
        self.handle = move_boundary(self.handle, candidate, optimizer=optimizer)
        self.plan, self.trace = candidate, trace
        self.moves.append((state.global_step, old_k, new_k))
        logger.info("freezekern reselect at step %d: boundary %d -> %d", state.global_step, old_k, new_k)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.handle is not None and self.handle.active:
            logs["freezekern_boundary"] = self.handle.boundary

    def _write(self, folder: str) -> None:
        if self.plan is not None:
            self.plan.save(os.path.join(folder, PLAN_FILE))
        if self.trace is not None:
            self.trace.save(os.path.join(folder, TRACE_FILE))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self._write(folder)

    def on_train_end(self, args, state, control, **kwargs):
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None
        self._last_batch = None
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            self._write(args.output_dir)


def _calibration_batches(train_dataloader, count: int) -> list:
    """The first ``count`` training batches, read in order without disturbing the training iterator.

    Builds a plain DataLoader over the same dataset and collator (each rank
    takes its own strided share) so the Trainer's sampler, accelerate's
    dataloader state and the RNG streams are left as they were.
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset

    dataset = getattr(train_dataloader, "dataset", None)
    collate = getattr(train_dataloader, "collate_fn", None)
    batch_size = getattr(train_dataloader, "batch_size", None)
    if batch_size is None:
        batch_size = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_size", None) or 1
    rng_state = (torch.get_rng_state(), random.getstate())
    try:
        if dataset is None:
            return list(islice(iter(train_dataloader), count))
        rank, world = 0, 1
        if is_distributed():
            import torch.distributed as dist

            rank, world = dist.get_rank(), dist.get_world_size()
        if isinstance(dataset, IterableDataset):
            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
            return [b for i, b in enumerate(islice(loader, count * world)) if i % world == rank]
        wanted = min(len(dataset), count * batch_size * world)
        indices = list(range(rank, wanted, world))
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate, shuffle=False)
        return list(islice(loader, count))
    finally:
        torch.set_rng_state(rng_state[0])
        random.setstate(rng_state[1])
