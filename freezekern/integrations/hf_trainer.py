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
* otherwise, under an engine (torch.distributed with more than one process:
  DDP; DeepSpeed ZeRO-1/2/3; FSDP): also at ``on_init_end``, after analysing
  the first ``calibration_batches`` batches of the Trainer's training set
  (its ``train_dataset`` read through its data collator with the columns the
  model does not take removed, as the train dataloader would, in order, each
  rank its strided share, without touching the training sampler or RNG). The
  engine then builds its optimizer, partitions and gradient buckets over the
  trainable parameters only, so frozen weights never change (weight decay
  included). Callbacks get no reference to their Trainer: the callback finds
  it on the call stack of ``Trainer.__init__``. Under ZeRO-3 the trace gathers
  each block's parameters around its own forward and the LM head for the
  semantic basis (``freezekern.model.engines``); FSDP2 DTensors are
  read with ``full_tensor()``. Every rank runs the same number of forwards and
  plans from the merged trace, so the boundary is the same everywhere.
* otherwise (one process): at ``on_train_begin``, after analysing the first
  ``calibration_batches`` batches of the training set (read through the
  train dataloader's dataset and collator). The Trainer has built its
  optimizer by then; the frozen parameters stay in it without gradients,
  which PyTorch optimizers skip (no state, no weight decay). If the Trainer
  could not be found at init under DDP, the DDP reducer is rebuilt over the
  trained parameters (or, without the Trainer's DDP wrapper at hand,
  ``ddp_find_unused_parameters=True`` is required); under DeepSpeed this
  late path is refused before training starts, naming the fix.

Checkpoints and resume
----------------------
The callback is an ``ExportableState``: its plan is part of the callback
state the Trainer writes into every checkpoint's ``trainer_state.json``
(``stateful_callbacks``), wherever the checkpoint lives. On resume
(``state.global_step > 0`` at ``on_train_begin``) that plan wins: the same
boundary is restored and nothing is re-analysed, whatever
``restore_callback_states_from_checkpoint`` says. ``on_save`` also writes
``freezekern_plan.json`` / ``freezekern_trace.json`` into each checkpoint
folder, and checkpoints made without the state are still read from there
(``args.resume_from_checkpoint``, then ``<output_dir>/checkpoint-<step>``).

PEFT adapters made by the trainer
---------------------------------
TRL's ``SFTTrainer(peft_config=...)`` builds adapters on every block before
the callback can plan. By default (``frozen_adapters=None``) the adapters
below the boundary are frozen (they could only train through a backward
that the cut skips) with one warning that names
``freezekern.integrations.peft.lora_config_for_plan`` for the next run;
``frozen_adapters="refuse"`` raises instead.

Progressive freezing
--------------------
Under DDP the reducer is rebuilt over the parameters still trained at each
move (``freezekern.model.engines.stop_updating``); under DeepSpeed ZeRO the
newly frozen parameters are pinned (``freezekern.model.zero_pins``: their fp32
master fragments are kept out of torch Adam/AdamW's steps and written back
after every optimizer step, so they never change; their backward, gradient
communication and Adam arithmetic stop, ZeRO's bookkeeping over its whole
partitions does not).

``reselect_every=N`` re-traces the most recent training batch every N steps
(a forward without the LM head; with the cosine metric the semantic basis
of a frozen head is reused between traces), re-plans with the same policy and moves the
boundary deeper only; parameters that become frozen lose their gradient and
optimizer state. With torch.distributed, traces are merged across ranks and
the minimum boundary is taken, so all ranks move together.

The current boundary is logged as ``freezekern_boundary``: in ``state.log_history``
(so in ``trainer_state.json``) and in the ``logs`` that callbacks after this
one see (reporting integrations registered before it do not).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import weakref

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from freezekern.analysis.trace import DeviationTrace
from freezekern.cut import FreezeHandle, MovingBoundary, active_handle, apply, move_boundary
from freezekern.integrations.distributed import agree_on_boundary, agree_on_plan, is_distributed, merge_traces
from freezekern.integrations.trainer_access import (
    calibration_batches,
    find_trainer,
    planned_steps,
    trace_model,
    trainer_calibration_batches,
    under_engine,
)
from freezekern.model.engines import (
    EngineRefusal,
    check_can_stop_updating,
    engine_name,
    stop_updating,
)
from freezekern.model.parts import discover
from freezekern.model.peft import unwrap_peft
from freezekern.policy.default import default_plan, default_rule, noted
from freezekern.policy.moving import moving_plan, schedule_of
from freezekern.policy.rules import DEFAULT_POLICY, PLAN_FILE, FreezePlan
from freezekern.policy.rules import plan as make_plan

logger = logging.getLogger("freezekern.hf_trainer")

TRACE_FILE = "freezekern_trace.json"


def _model_summary(model):
    """The architecture summary (parameter counts per block, no trace) of ``model``, PEFT wrapper unwrapped."""
    return discover(unwrap_peft(model)[0]).summary()


class FreezeKernCallback(TrainerCallback, ExportableState):
    """Apply a freeze plan to the Trainer's model; analyse first when no plan is given.

    ``policy``/``metric``/``trained_share`` are those of ``freezekern.plan`` /
    ``freezekern.analyze``; ``calibration_batches`` how many training batches
    to analyse; ``calibration_data`` optional batches to analyse at init
    instead; ``reselect_every`` N for progressive freezing; ``train_head`` goes
    to ``freezekern.apply``; ``frozen_adapters`` None (freeze adapters below
    the boundary, with a warning), "freeze" (silently) or "refuse";
    ``fused_loss`` installs the fused LM-head loss (no logits are built for
    training forwards with labels, see ``freezekern.cut.fused_loss``) at init, once, kept
    across boundary moves (``fused_loss_handle``);
    ``policy_kwargs`` (e.g. ``{"boundary": 3}`` for policy "fixed") to
    ``freezekern.plan``. ``plan`` may be a FreezePlan, its dict form, or an
    int k (the boundary; made into policy "fixed"'s plan for the model at init).
    ``moving=True`` (or a dict of ``MovingSchedule`` settings: ``start``,
    ``begin``, ``finish``, ``settle``) moves the boundary with training:
    shallow early, the plan's boundary by ``finish`` of the run; the run's
    length (``max_steps``, or the epochs' steps) makes the schedule
    budget-aware (``freezekern.policy.moving_plan``; the plan says why). A
    plan made by ``moving_plan`` moves by itself. ``moving=None`` (the
    default): the library's default for the run's length
    (``freezekern.policy.default``: no freezing for short runs, where the
    quality study found that freezing does not pay; the trace's boundary for
    longer ones, static, or moving where ``DEFAULT_MOVES`` says so and the
    engine allows it: never under DeepSpeed, whose ZeRO partitions are built
    once), which applies only where the callback chooses the boundary itself
    from the trace (no ``plan=``, policy gain_share or salf, no
    ``reselect_every``) and the weights train in full (no PEFT adapters);
    anywhere else the boundary is static. ``moving=False`` freezes at the
    traced boundary whatever the run's length.
    ``budget`` is the deprecated name of ``trained_share``.
    """

    def __init__(
        self,
        plan: FreezePlan | dict | int | None = None,
        policy: str = DEFAULT_POLICY,
        metric: str = "cosine",
        trained_share: float | None = None,
        calibration_batches: int = 4,
        reselect_every: int | None = None,
        *,
        calibration_data=None,
        train_head: bool | None = None,
        frozen_adapters: str | None = None,
        policy_kwargs: dict | None = None,
        budget: float | None = None,
        fused_loss: bool = False,
        moving: bool | dict | None = None,
    ):
        if budget is not None:
            if trained_share is not None:
                raise TypeError("pass trained_share only (budget is its deprecated name)")
            warnings.warn("FreezeKernCallback(budget=) is deprecated: use trained_share=", DeprecationWarning,
                          stacklevel=2)
            trained_share = budget
        if reselect_every is not None and reselect_every < 1:
            raise ValueError(f"reselect_every must be a positive number of steps, got {reselect_every}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {calibration_batches}")
        if frozen_adapters not in (None, "freeze", "refuse"):
            raise ValueError(f"frozen_adapters must be None, 'freeze' or 'refuse', got {frozen_adapters!r}")
        self._fixed_boundary: int | None = None  # plan=k: planned for the model once it is known
        if isinstance(plan, bool) or not isinstance(plan, (FreezePlan, dict, int, type(None))):
            raise TypeError(f"plan must be a FreezePlan, its dict form or an int boundary, got {type(plan).__name__}")
        if isinstance(plan, int):
            if plan < 0:
                raise ValueError(f"plan=k needs a boundary k >= 0, got {plan}")
            self._fixed_boundary, plan = int(plan), None
        if moving and reselect_every:
            raise ValueError("moving=... and reselect_every=... both move the boundary: choose one")
        if not isinstance(moving, (bool, dict, type(None))):
            raise TypeError(f"moving must be True, False, None or a dict of MovingSchedule settings, got {moving!r}")
        self.moving = moving
        self._chooses_plan = plan is None and self._fixed_boundary is None
        self._default: str | None = None  # moving=None resolved once (default_rule), on first need
        self._decided_for: int | None = None  # the run length it was resolved for (None: unknown)
        self._static_plan: FreezePlan | None = None  # the plan a moving boundary moves towards, as traced
        self.mover = None  # a freezekern.cut.moving.MovingBoundary while the boundary moves
        self.plan = FreezePlan.from_dict(plan) if isinstance(plan, dict) else plan
        self.policy = policy
        self.metric = metric
        self.trained_share = trained_share
        self.calibration_batches = calibration_batches
        self.reselect_every = reselect_every
        self.calibration_data = calibration_data
        self.train_head = train_head
        self.frozen_adapters = frozen_adapters
        self.fused_loss = fused_loss
        self.fused_loss_handle = None  # a freezekern.cut.fused_loss.FusedLossHandle once installed
        self.policy_kwargs = dict(policy_kwargs or {})
        self.trace: DeviationTrace | None = None
        self.handle: FreezeHandle | None = None
        self.analysed = False
        self.restored_from: str | None = None
        self.moves: list[tuple[int, int, int]] = []  # (global_step, old k, new k)
        self._applied_at_init = False
        self._last_batch: dict | None = None
        self._batch_hook = None
        self._trainer = None  # weakref to the Trainer, found at init (for its engine-wrapped model)

    # -- helpers ------------------------------------------------------------------------------
    def _plan_fixed_boundary(self, model) -> None:
        """``plan=k``: the "fixed" policy's plan for ``model`` (refuses a k outside [0, L])."""
        if self.plan is not None or self._fixed_boundary is None:
            return
        kwargs = {"train_head": self.train_head} if self.train_head is not None else {}
        self.plan = make_plan(_model_summary(model), "fixed", boundary=self._fixed_boundary, **kwargs)

    def _default_rule(self, model=None, optimizer=None, run_steps: int | None = None) -> str | None:
        """``default_rule`` for this run, resolved once (None where the user chose: ``moving``, a plan,
        ``reselect_every``); ``run_steps`` the run's length where known."""
        if not self._library_chooses():
            return None
        if self._default is None:
            self._default, self._decided_for = self._rule_for(model, optimizer, run_steps), run_steps
        return self._default

    def _library_chooses(self) -> bool:
        """Whether the library's default applies: the user set neither ``moving``, a plan nor ``reselect_every``."""
        return self.moving is None and self._chooses_plan and not self.reselect_every

    def _rule_for(self, model, optimizer, run_steps: int | None) -> str:
        trainer = self._trainer() if self._trainer is not None else None
        engine = engine_name(self._wrapped_model(model), optimizer) if model is not None else None
        builds_once = getattr(trainer, "is_deepspeed_enabled", False) or (engine or "").startswith("DeepSpeed")
        capped = self.trained_share is not None or self.policy_kwargs.get("flops_budget") is not None
        return default_rule(self.policy, run_steps, adapters=model is not None and unwrap_peft(model)[1],
                            engine_builds_once=bool(builds_once), capped=capped)

    def _check_decided_length(self, model, optimizer, max_steps: int) -> None:
        """Warn where the default was decided at init for a run length other than the one that trains."""
        if self._default is None or self._decided_for == max_steps:
            return
        now = self._rule_for(model, optimizer, max_steps)
        if now != self._default:
            logger.warning(
                "freezekern: the default was decided at Trainer init for a run of %s steps (%s); the run has %d "
                "steps, for which it would be %s. It keeps %s (the boundary was applied before the engine was "
                "built); to choose yourself, pass FreezeKernCallback(moving=False/True) or plan=",
                self._decided_for if self._decided_for is not None else "unknown", self._default, max_steps, now,
                self._default)

    def _moves(self, model=None, optimizer=None) -> bool | dict:
        """``moving``, with None resolved (once) to the library's default for this run (see the class)."""
        if self.moving is not None:
            return self.moving
        return self._default_rule(model, optimizer) == "moving"

    def _make_plan(self, trace: DeviationTrace) -> FreezePlan:
        kwargs = dict(self.policy_kwargs)
        if self.train_head is not None:
            kwargs.setdefault("train_head", self.train_head)
        return make_plan(trace, self.policy, trained_share=self.trained_share, **kwargs)

    def _analyse(self, model, batches) -> FreezePlan:
        trace = merge_traces(trace_model(model, batches, self.metric))
        self.trace = trace
        self.analysed = True
        new_plan = agree_on_plan(self._make_plan(trace), trace.parameter_counts)
        logger.info("freezekern trace [%s] over %d tokens: %s", trace.metric, trace.token_count,
                    ", ".join(f"{d:.4f}" for d in trace.deviations))
        return new_plan

    def _apply(self, model, plan: FreezePlan) -> None:
        existing = self.handle if self.handle is not None and self.handle.active else active_handle(model)
        if existing is not None and existing.active:
            if existing.boundary == plan.boundary and existing.cut == plan.cut:
                self.handle, self.plan = existing, plan
                return
            existing.remove()
        policy = "freeze" if self.frozen_adapters is None else self.frozen_adapters
        if self.fused_loss:
            self._install_fused_loss(model)
        self.handle = apply(model, plan, train_head=self.train_head, frozen_adapters=policy)
        self.plan = plan
        frozen = self.handle.frozen_adapter_names
        if frozen and self.frozen_adapters is None:
            warnings.warn(
                f"freezekern froze {len(frozen)} PEFT adapter tensors below the boundary k={plan.boundary} (they would "
                "only train through the backward the cut skips). Next time build the adapters above the boundary: "
                "peft_config=freezekern.integrations.peft.lora_config_for_plan(plan, model=model, ...)",
                UserWarning, stacklevel=3,
            )
        logger.info("freezekern boundary: blocks 1..%d of %d frozen, backward through %d blocks\n%s",
                    plan.boundary, plan.num_layers, plan.num_layers - plan.boundary, plan)

    def _install_fused_loss(self, model) -> None:
        """The fused loss on ``model``, once, independent of the freeze handle and of boundary moves.

        Installed at init when possible: the Trainer's accelerate wrap (autocast under bf16/fp16) later
        replaces the model's forward, after which it can no longer be installed.
        """
        from freezekern.cut.fused_loss import active_fused_loss, fused_loss

        if not active_fused_loss(model):
            self.fused_loss_handle = fused_loss(model)

    # -- ExportableState: the plan travels in every checkpoint's trainer_state.json ---------------
    def state(self) -> dict:
        return {
            "args": {"policy": self.policy, "metric": self.metric, "trained_share": self.trained_share,
                     "calibration_batches": self.calibration_batches, "reselect_every": self.reselect_every,
                     "train_head": self.train_head, "frozen_adapters": self.frozen_adapters,
                     "fused_loss": self.fused_loss, "policy_kwargs": self.policy_kwargs, "moving": self.moving},
            "attributes": {"plan": self.plan.to_dict() if self.plan is not None else None,
                           "moves": [list(m) for m in self.moves],
                           # who chose the boundary and what the default decided, for a callback rebuilt from
                           # this state (restore_callback_states_from_checkpoint) that gets no plan= argument
                           "_chooses_plan": self._chooses_plan, "_default": self._default,
                           "_decided_for": self._decided_for},
        }

    def _checkpoint_plan(self, args, state) -> tuple[FreezePlan | None, str | None]:
        """The plan of the checkpoint being resumed: trainer_state.json first, then the plan files."""
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        for entry in stored if isinstance(stored, list) else [stored]:
            saved = (entry or {}).get("attributes", {}).get("plan")
            if saved:
                return FreezePlan.from_dict(saved), "trainer_state.json"
        candidates = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str):
            candidates.insert(0, resume)
        for folder in candidates:
            path = os.path.join(folder, PLAN_FILE)
            if os.path.isfile(path):
                return FreezePlan.load(path), folder
        return None, None

    def _wrapped_model(self, model):
        """The model as the Trainer's engine wrapped it (DDP, DeepSpeedEngine), else ``model``."""
        trainer = self._trainer() if self._trainer is not None else None
        wrapped = getattr(trainer, "model_wrapped", None)
        return wrapped if wrapped is not None else model

    def _check_ddp_after_wrap(self, args, model, why: str, optimizer=None, deeper: bool = False) -> None:
        """Raise before freezing after the engine was built, where that cannot work. ``deeper``: a boundary
        moving deeper during training (DeepSpeed ZeRO: newly frozen parameters are pinned, see
        ``freezekern.model.zero_pins``); otherwise the first freeze, which ZeRO must see at init."""
        engine = engine_name(self._wrapped_model(model), optimizer)
        if engine is not None and engine.startswith("DeepSpeed") and deeper:
            check_can_stop_updating(optimizer, self._wrapped_model(model))
            return
        if engine is not None and engine.startswith("DeepSpeed"):
            raise EngineRefusal(
                f"freezekern would {why} after {engine} built its optimizer over every parameter; its flat fp32 "
                "partitions would keep applying Adam and weight decay to the frozen ones. Let the callback decide "
                "at Trainer init (create the Trainer with FreezeKernCallback() in callbacks=, so it can read the "
                "train dataset), or pass FreezeKernCallback(plan=...) or calibration_data=..."
            )
        if engine in ("DDP", "FSDP2") or not is_distributed():
            return  # DDP: the reducer is rebuilt (engines.stop_updating); FSDP2 follows requires_grad
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
        if self.fused_loss:
            self._install_fused_loss(model)
        self._plan_fixed_boundary(model)
        trainer = find_trainer(self)
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
        if self.plan is None and self.calibration_data is not None:
            self.plan = self._analyse(model, self.calibration_data)
        elif self.plan is None and trainer is not None and under_engine(trainer) \
                and getattr(trainer, "train_dataset", None) is not None:
            batches = trainer_calibration_batches(trainer, self.calibration_batches)
            self.plan = self._analyse(model, batches)
        if self.plan is not None:
            run_steps = planned_steps(trainer) if trainer is not None else None
            self._apply(model, self._early_plan(self.plan, model, run_steps=run_steps))
            self._applied_at_init = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None:
            raise RuntimeError("FreezeKernCallback needs the Trainer's model")
        if self._library_chooses():  # resolved at init already where the boundary was applied there
            self._default_rule(model, optimizer, state.max_steps)
            self._check_decided_length(model, optimizer, state.max_steps)
        restored = None
        if isinstance(self.plan, dict):  # restored by the Trainer from trainer_state.json
            self.plan = FreezePlan.from_dict(self.plan)
        self._plan_fixed_boundary(model)
        self.moves = [tuple(m) for m in self.moves]
        if state.global_step > 0:
            restored, folder = self._checkpoint_plan(args, state)
            if restored is not None:
                self.restored_from = folder
                logger.info("freezekern: restoring boundary %d from %s", restored.boundary, folder)
            else:
                logger.warning("freezekern: resumed at step %d but the checkpoint holds no freezekern plan",
                               state.global_step)
        if restored is not None and restored.moving:  # the mover below takes it to where the run was
            current = self.handle if self.handle is not None and self.handle.active else active_handle(model)
            if current is None or not current.active:
                self._apply(model, restored)
            else:
                self.handle = current
            self.plan = restored
        elif restored is not None:
            current = self.handle if self.handle is not None and self.handle.active else active_handle(model)
            if current is not None and current.boundary == restored.boundary:
                self.handle, self.plan = current, restored
            elif current is not None and current.cut and restored.cut and restored.boundary > current.boundary:
                self._check_ddp_after_wrap(args, model, "freeze more parameters", optimizer, deeper=True)
                self.handle = move_boundary(current, restored, optimizer=optimizer,
                                            model=self._wrapped_model(model))
                self.plan = restored
            else:
                if current is not None and current.active and engine_name(self._wrapped_model(model), optimizer):
                    raise EngineRefusal(
                        f"the checkpoint's boundary k={restored.boundary} would unfreeze parameters that "
                        f"{engine_name(self._wrapped_model(model), optimizer)} and the optimizer were built "
                        f"without (boundary k={current.boundary} applied at init); resume with "
                        "FreezeKernCallback(plan=FreezePlan.load('<checkpoint>/freezekern_plan.json'))"
                    )
                self._check_ddp_after_wrap(args, model, "change the frozen parameters", optimizer)
                self._apply(model, restored)
                self._after_late_freeze(model, optimizer)
        elif self.handle is None or not self.handle.active:
            if self.plan is None:
                if train_dataloader is None:
                    raise RuntimeError("FreezeKernCallback got no train dataloader to analyse; pass plan=")
                self.plan = self._analyse(model, calibration_batches(train_dataloader, self.calibration_batches))
            plan = self._early_plan(self.plan, model, optimizer, run_steps=state.max_steps)
            if plan.cut:
                self._check_ddp_after_wrap(args, model, "freeze parameters", optimizer)
            self._apply(model, plan)
            self._after_late_freeze(model, optimizer)
        if self._moves(model, optimizer) or (self.plan is not None and self.plan.moving):
            self._start_moving(args, state, model, optimizer)
        for p in model.parameters():
            if not p.requires_grad:
                p.grad = None
        if self.reselect_every:
            self._check_ddp_after_wrap(args, model, "move the boundary during training (reselect_every)",
                                       optimizer, deeper=True)
            self._batch_hook = model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)

    def _after_late_freeze(self, model, optimizer) -> None:
        """Parameters frozen after the engine was built stop costing and changing (DDP: reducer rebuilt)."""
        frozen = [p for p in model.parameters() if not p.requires_grad]
        stop_updating(frozen, optimizer, self._wrapped_model(model))

    def _remember_batch(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled() and isinstance(kwargs.get("input_ids"), torch.Tensor):
            self._last_batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels")
                                if isinstance(kwargs.get(k), torch.Tensor)}

    def _early_plan(self, plan: FreezePlan, model, optimizer=None, run_steps: int | None = None) -> FreezePlan:
        """What to apply first: the library's default for a run of ``run_steps`` (full fine-tuning for a short
        run, the static boundary under an engine that builds once), or a moving boundary's start."""
        rule = self._default_rule(model, optimizer, run_steps)
        if rule in ("none", "static") and plan.cut and not plan.moving and plan.run_steps is None:
            return default_plan(self._summary(model), plan, self._decided_for, rule=rule)
        moving = self._moves(model, optimizer)
        if not moving or plan.moving or not plan.cut:
            return plan
        self._static_plan = plan
        return moving_plan(plan, **(moving if isinstance(moving, dict) else {}))

    def _summary(self, model):
        """The trace, or the model's summary where the plan came from a checkpoint (no trace here)."""
        return self.trace if self.trace is not None else _model_summary(model)

    def _start_moving(self, args, state, model, optimizer) -> None:
        """Make the plan budget-aware for this run's length and start moving the boundary."""
        if not self.plan.cut:
            return
        moving = self._moves(model, optimizer)
        if moving and (self.plan.run_steps != state.max_steps or not self.plan.moving):
            static = self._static_plan or dataclasses.replace(self.plan, moving=None, run_steps=None)
            self.plan = moving_plan(static, run_steps=state.max_steps, **(moving if isinstance(moving, dict) else {}))
            if self.moving is None:  # the library's default: its plan says why
                self.plan = noted(self.plan, self._decided_for)
        schedule = schedule_of(self.plan)
        if schedule is None:  # too short a run to move: the static boundary
            if self.handle.boundary < self.plan.boundary:
                self._check_ddp_after_wrap(args, model, "freeze more parameters", optimizer, deeper=True)
                self.handle = move_boundary(self.handle, self.plan.boundary, optimizer=optimizer,
                                            model=self._wrapped_model(model))
            return
        self._check_ddp_after_wrap(args, model, "move the boundary during training (moving=...)", optimizer,
                                   deeper=True)
        if self.handle.boundary > schedule.start:
            raise RuntimeError(f"the cut is already at k={self.handle.boundary}, deeper than the moving boundary's "
                               f"start k={schedule.start}: a boundary never moves shallower")
        if self.handle.boundary < schedule.start:
            self.handle = move_boundary(self.handle, schedule.start, optimizer=optimizer,
                                        model=self._wrapped_model(model))
        self.mover = MovingBoundary(self.handle, schedule, optimizer=optimizer, model=self._wrapped_model(model))
        self.handle = self.mover.update(state.global_step / max(state.max_steps, 1), state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.mover is not None:
            old_k = self.mover.boundary
            self.mover.optimizer = optimizer if optimizer is not None else self.mover.optimizer
            self.handle = self.mover.update(state.global_step / max(state.max_steps, 1), state.global_step)
            if self.handle.boundary != old_k:
                self.moves.append((state.global_step, old_k, self.handle.boundary))
            return
        if not self.reselect_every or state.global_step % self.reselect_every != 0:
            return
        if self.handle is None or not self.handle.active or self._last_batch is None:
            return
        batch = {k: v.detach() for k, v in self._last_batch.items()}
        trace = merge_traces(trace_model(model, [batch], self.metric))
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
        self.handle = move_boundary(self.handle, candidate, optimizer=optimizer, model=self._wrapped_model(model))
        self.plan, self.trace = candidate, trace
        self.moves.append((state.global_step, old_k, new_k))
        logger.info("freezekern reselect at step %d: boundary %d -> %d", state.global_step, old_k, new_k)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.handle is None or not self.handle.active:
            return
        if logs is not None:
            logs["freezekern_boundary"] = self.handle.boundary
        # Trainer.log appended a copy of the logs to the history before calling on_log: record it there too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["freezekern_boundary"] = self.handle.boundary

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
