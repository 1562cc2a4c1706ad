"""Hugging Face Trainer (and TRL trainers): profile the first real training steps and log where the backward goes.

    from freezekern.integrations.profile_callback import BackwardProfileCallback

    trainer = Trainer(..., callbacks=[BackwardProfileCallback(steps=4)])     # SFTTrainer, DPOTrainer alike
    trainer.train()        # prints the verdict after 2 x (2 + 4) steps; callback.report holds the ProfileReport

The callback times the Trainer's own steps with ``freezekern.profile``'s
hooks (``StepRecorder``): per block forward, recomputation and backward,
which blocks the backward reached, step time and peak memory. When the cut
cannot change the training (nothing in freezekern's frozen prefix, the
embeddings and the blocks below the lowest trained one, requires grad),
every other profiled step runs with ``freezekern.apply(model, k)`` and is
removed right after: the gradients of such steps are exactly those of the
plain setup (``freezekern.cut.freeze``'s guarantee), so the training is the
same and the two setups are compared on the same run, alternating (A B B A).
When the embeddings train (LISA-style recipes), or a freeze plan is already
applied (``FreezeKernCallback``), the setup is profiled as it is, and the
verdict says why there is no comparison (``freezekern.profile`` outside the
training run compares them anyway).

The analytic ideal is priced from the profiled steps' own part times
(``freezekern.profiler.run.step_part_costs``); ``isolated_parts=True`` also times
each part alone on the last training batch for the parts the steps do not
show (without a comparison: the cut's weight-only block). The verdict
is printed on the main process and logged (``freezekern.profile`` logger); the
report is written to ``<output_dir>/backward_profile.json`` and ``.png``
(``backward_profile.rank<r>.json`` per rank under torch.distributed, where
every rank profiles its own steps). Steps with gradient accumulation count
as one step (all their forwards and backwards).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from freezekern.model.training import device_of
from freezekern.profiler.memory import PeakMemory
from freezekern.profiler.part_costs import measure_part_costs
from freezekern.profiler.result import CUT, YOURS, ProfileReport
from freezekern.profiler.run import assemble_report
from freezekern.profiler.setup import SetupFacts, describe_setup
from freezekern.profiler.step_timing import StepRecorder

logger = logging.getLogger("freezekern.profile")

REPORT_FILE = "backward_profile"


class BackwardProfileCallback(TrainerCallback):
    """Profile ``steps`` real training steps per setup after ``warmup`` rounds (the last of which measures the
    peak memory); see the module docstring.

    ``compare``: alternate with freezekern's cut where that leaves the training
    unchanged; ``isolated_parts``: time the parts alone afterwards too;
    ``output_dir``: where the report goes (default: the Trainer's).
    """

    def __init__(self, steps: int = 4, warmup: int = 2, *, compare: bool = True, isolated_parts: bool = False,
                 repeats: int = 2, output_dir: str | None = None, print_verdict: bool = True):
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (a median and an alternation need two), got {steps}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.steps, self.warmup, self.compare = steps, warmup, compare
        self.isolated_parts, self.repeats = isolated_parts, repeats
        self.output_dir, self.print_verdict = output_dir, print_verdict
        self.report: ProfileReport | None = None
        self.notes: list[str] = []
        self._schedule: list[tuple[str, bool]] = []  # (setup, counted) per profiled step
        self._index = 0
        self._recorder: StepRecorder | None = None
        self._facts: SetupFacts | None = None
        self._boundary = 0
        self._timings: dict[str, list] = {YOURS: [], CUT: []}
        self._peaks: dict[str, list[int]] = {YOURS: [], CUT: []}
        self._memory_kind = ""
        self._handle = None
        self._memory: PeakMemory | None = None
        self._batch: dict | None = None
        self._batch_hook = None
        self._done = False
        self._started = False

    # -- set-up at the first step (after every other callback's on_train_begin) ---------------------
    def _start(self, model) -> None:
        from freezekern.cut import active_handle
        from freezekern.model.parts import discover

        self._started = True
        parts = discover(model)
        self._parts = parts
        facts = describe_setup(model, parts)
        self._facts = facts
        self._boundary = facts.frozen_prefix
        handle = active_handle(model)
        compare = self.compare
        if handle is not None and handle.active:
            compare = False
            self._boundary = handle.boundary
            self.notes.append(f"freezekern's cut is already applied (k={handle.boundary}): profiled as it is")
        elif compare and (deprived := self._deprived(model, parts)):
            compare = False
            shown = ", ".join(deprived[:3]) + (" ..." if len(deprived) > 3 else "")
            self.notes.append(f"the cut would change what trains ({len(deprived)} trainable parameter tensors would "
                              f"get no gradient on its steps: {shown}): your setup is profiled alone; "
                              "freezekern.profile() compares both outside the training run")
        labels = [YOURS, CUT] if compare else [YOURS]
        self._labels = labels
        self._compared = compare
        for r in range(self.warmup + self.steps):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                self._schedule.append((label, r >= self.warmup))
        self._recorder = StepRecorder(model, parts).install()
        self._batch_hook = model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)

    def _deprived(self, model, parts) -> list[str]:
        """Trainable parameters the cut's steps would freeze: every one, not only the prefix's."""
        from freezekern.cut.freeze import cut_would_freeze

        return cut_would_freeze(model, self._boundary, train_head=self._facts.head_trains, train_final_norm=True,
                                parts=parts)

    def _remember_batch(self, module, args, kwargs):
        if self._batch is None and module.training and torch.is_grad_enabled() \
                and isinstance(kwargs.get("input_ids"), torch.Tensor):
            self._batch = {k: kwargs[k].detach() for k in ("input_ids", "attention_mask", "labels")
                           if isinstance(kwargs.get(k), torch.Tensor)}

    # -- events -------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._done or model is None:
            return
        if not self._started:
            self._start(model)
        if self._index >= len(self._schedule):
            return
        label, _ = self._schedule[self._index]
        if label == CUT:
            from freezekern.cut import apply

            self._handle = apply(model, self._boundary, train_head=self._facts.head_trains, train_final_norm=True,
                                 parts=self._parts)
        label, counted = self._schedule[self._index]
        # peak memory in the last warm-up round only (the first steps carry one-time allocations, and returning
        # freed pages to the system would slow a timed step)
        last_warmup = not counted and self._index >= (self.warmup - 1) * len(self._labels)
        self._memory = PeakMemory(device_of(model)).__enter__() if last_warmup or self.warmup == 0 else None
        self._recorder.begin_step()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._done or self._recorder is None or not self._recorder.recording:
            return
        timing = self._recorder.end_step()
        label, counted = self._schedule[self._index]
        if self._memory is not None:
            self._memory.__exit__(None, None, None)
            self._peaks[label].append(int(self._memory.peak_bytes))
            self._memory_kind = self._memory.kind
            self._memory = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if counted:
            self._timings[label].append(timing)
        self._index += 1
        if self._index >= len(self._schedule):
            self._finish(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._done and self._started:
            if self._recorder is not None and self._recorder.recording:
                self._recorder.end_step()
            if self._memory is not None:
                self._memory.__exit__(None, None, None)
                self._memory = None
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            if self._timings[YOURS]:
                self.notes.append(f"training ended after {self._index} of {len(self._schedule)} profiled steps")
                self._finish(args, state, model)
            else:
                self._cleanup()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.report is not None and not getattr(self, "_logged", False):
            self._logged = True
            if self.report.time_ratio is not None:
                logs["freezekern_profile_cut_step_ratio"] = self.report.time_ratio
            if self.report.yours.lowest_reached is not None:
                logs["freezekern_profile_lowest_reached"] = self.report.yours.lowest_reached

    # -- the report ---------------------------------------------------------------------------
    def _cleanup(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None
        self._done = True

    def _finish(self, args, state, model) -> None:
        recorder, facts, k = self._recorder, self._facts, self._boundary
        self._cleanup()
        costs = None
        if self.isolated_parts and self._batch is not None and model is not None:
            try:
                costs = measure_part_costs(model, self._batch, parts=self._parts, repeats=self.repeats)
            except (ValueError, RuntimeError, TypeError) as exc:
                self.notes.append(f"per-part costs not measured: {exc}")
        report = assemble_report(
            model, recorder, facts, k, self._timings, peaks=self._peaks, isolated=costs, compared=self._compared,
            batch_shape=list(self._batch["input_ids"].shape) if self._batch is not None else [],
            warmup=self.warmup, memory_kind=self._memory_kind,
            notes=self.notes, descriptions=("the Trainer's setup", f"freezekern.apply(model, {k}) on alternate steps"))
        self.report = report
        self._write(args, state, report)
        logger.info("freezekern backward profile (rank %d):\n%s", report.rank, report.verdict)
        if self.print_verdict and getattr(state, "is_world_process_zero", True):
            print(f"freezekern backward profile:\n{report.verdict}")

    def _write(self, args, state, report: ProfileReport) -> None:
        folder = self.output_dir or getattr(args, "output_dir", None)
        if not folder:
            return
        os.makedirs(folder, exist_ok=True)
        suffix = f".rank{report.rank}" if report.world_size > 1 else ""
        report.save(os.path.join(folder, f"{REPORT_FILE}{suffix}.json"))
        if report.rank == 0:
            from freezekern.profiler.report import plot_profile

            plot_profile(report, os.path.join(folder, f"{REPORT_FILE}.png"))

