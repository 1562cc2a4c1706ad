"""Preference and RL trainers (TRL's DPOTrainer, KTOTrainer, ...): share the frozen prefix with the reference.

    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=..., train_dataset=...,
                         callbacks=[FreezeKernCallback(plan=plan), SharedPrefixCallback(reference_model=ref_model)])

``FreezeKernCallback`` cuts the policy's backward as for any Trainer (the
reference forward runs under ``torch.no_grad()`` and is never cut or
trained). ``SharedPrefixCallback`` then computes the frozen prefix once per
batch for both models (``freezekern.cut.shared_prefix.SharedPrefix``): pass the
reference model you gave the trainer, or nothing when the reference is the
policy with its PEFT adapters disabled (``peft_config=plan.to_peft_config(...)``
and no ``ref_model``). It attaches at the first training step, after every
callback's ``on_train_begin`` (so the plan may be applied there), and
detaches at the end of training. ``TRL``'s ``precompute_ref_log_probs=True``
has no reference forward to share; the callback then serves nothing.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from freezekern.cut import active_handle
from freezekern.cut.shared_prefix import SharedPrefix

logger = logging.getLogger("freezekern.cut.shared_prefix")


class SharedPrefixCallback(TrainerCallback):
    """Attach a ``SharedPrefix`` between the Trainer's model and ``reference_model`` (None: the model itself)."""

    def __init__(self, reference_model=None, *, slots: int = 2):
        self.reference_model = reference_model
        self.slots = slots
        self.shared: SharedPrefix | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.shared is not None or model is None:
            return
        handle = active_handle(model)
        if handle is None or not handle.active:
            raise RuntimeError("SharedPrefixCallback needs a freeze plan applied to the model: put "
                               "FreezeKernCallback(plan=...) (or FreezeKernCallback()) in the callbacks too")
        self.shared = SharedPrefix(handle, reference=self.reference_model, slots=self.slots)
        logger.info("frozen prefix (blocks 1..%d) shared between the policy and the reference", handle.boundary)

    def on_train_end(self, args, state, control, **kwargs):
        if self.shared is not None:
            logger.info("shared prefix: %s", self.shared.stats)
            self.shared.detach()

    @property
    def stats(self) -> dict:
        return dict(self.shared.stats) if self.shared is not None else {}
