"""2-process CPU Trainer runs under DDP or DeepSpeed ZeRO-1/2/3 for tests/integrations/test_engines.py (started by torchrun).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/integrations/engine_trainer_script.py zero3 OUT_DIR

Cases, one Trainer each (tiny Llama, gradient checkpointing, weight decay
0.1, constant learning rate, gradient clipping off): ``defaults``
(``FreezeKernCallback(moving=False)``: the traced boundary), ``library``
(``FreezeKernCallback()``: the library's default, which trains so short a run
in full), ``plan`` (``plan=3``), ``fused`` (defaults with the
fused loss, untied head so the head trains), ``moved`` (``plan=2``, then the
boundary moved to 4 after step 1 through ``move_boundary``, as
``reselect_every`` does) and ``reselect`` (``reselect_every=1``). Every rank
records the batches each rank trained on and which parameters were trainable,
replays them in one process with plain ``requires_grad=False`` freezing and
torch AdamW (the reference), and writes OUT_DIR/<engine>.rank<r>.json with, per
case: the boundary, the largest difference to the reference, whether the
frozen weights are bitwise unchanged, and the frozen blocks whose output
required grad in a training forward (a backward would run through them).
"""

import copy
import json
import os
import sys
import traceback

import torch

STEPS = 3
LR = 1e-2


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=12):
        self.ids = torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }


def _full(model):
    """name -> full fp32 copy of every parameter (ZeRO-3 partitions gathered)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


class Recorder:
    """Batches and trainable parameter names of every training forward; frozen blocks reached by autograd."""

    def __init__(self, model):
        self.model = model
        self.steps = []
        self.graph_blocks = set()
        self.hooks = [model.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        for index, block in enumerate(model.model.layers):
            self.hooks.append(block.register_forward_hook(self._on_block(index)))

    def _on_call(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            batch = {k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")}
            trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
            self.steps.append((batch, trainable))

    def _on_block(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if module.training and torch.is_grad_enabled() and hidden.requires_grad:
                self.graph_blocks.add(index)
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def _reference(base, initial, all_steps, decay_names, fused):
    """One process: the plain model, frozen as recorded, each step's gradient the mean over the ranks."""
    from freezekern.cut.fused_loss import fused_loss

    model = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(initial[n])
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fused:
        fused_loss(model)
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n in decay_names], "weight_decay": 0.1},
              {"params": [p for n, p in named.items() if n not in decay_names], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR)
    world = len(all_steps)
    for step in range(len(all_steps[0])):
        trainable = set(all_steps[0][step][1])
        for n, p in named.items():
            p.requires_grad_(n in trainable)
            if n not in trainable:
                p.grad = None
                optimizer.state.pop(p, None)
        optimizer.zero_grad(set_to_none=True)
        for rank in range(world):
            batch, _ = all_steps[rank][step]
            (model(**batch, use_cache=False).loss / world).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in named.items()}


def run_case(engine, case, out_dir, base, base_untied):
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    import freezekern as fk
    from freezekern.cut import move_boundary
    from freezekern.integrations import FreezeKernCallback
    from freezekern.model.engines import EngineRefusal

    stage = {"ddp": None, "zero1": 1, "zero2": 2, "zero3": 3}[engine]
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, case), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=LR,
        weight_decay=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=_ds_config(stage) if stage else None,
    )
    record = {"case": case}
    _ = args.device  # sets up torch.distributed before the model is built, as for from_pretrained
    if stage:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # zero.Init (ZeRO-3 from_config) partitions over it
    tie = case != "fused"
    model = fk.tiny_model("llama", num_layers=6, hidden=32, vocab=97, tie=tie, seed=0)  # ZeRO-3: zero.Init
    initial = _full(model)
    record["partitioned_at_init"] = any(hasattr(p, "ds_id") for p in model.parameters())
    callback = {
        # the traced boundary, static although the run is short (the default would train so short a run in full)
        "defaults": lambda: FreezeKernCallback(calibration_batches=2, moving=False),
        # the library's default for so short a run, decided at init from the run's length: train in full
        "library": lambda: FreezeKernCallback(calibration_batches=2),
        "plan": lambda: FreezeKernCallback(plan=3),
        "fused": lambda: FreezeKernCallback(calibration_batches=2, fused_loss=True, moving=False),
        "moved": lambda: FreezeKernCallback(plan=2),
        "reselect": lambda: FreezeKernCallback(plan=2, reselect_every=1),
        # the moving boundary: block 3 trains for two steps, then freezes for the third (one move)
        "moving": lambda: FreezeKernCallback(plan=4, moving={"start": 3, "begin": 0.0, "finish": 0.34,
                                                             "min_steps_per_move": 1}),
    }[case]()

    class Mover(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step > 1 and stage:  # the steps after the move: pinned ranges left out of Adam
                from freezekern.model.zero_pins import left_out_of_last_step

                record.setdefault("left_out", []).append(left_out_of_last_step(optimizer, trainer.model_wrapped))
            if state.global_step != 1:
                return
            try:
                callback.handle = move_boundary(callback.handle, 4, optimizer=optimizer, model=trainer.model_wrapped)
                record["moved_to"] = callback.handle.boundary
                if stage:
                    from freezekern.model.zero_pins import pinned_count

                    record["pinned_fragments"] = pinned_count(optimizer, trainer.model_wrapped)
            except EngineRefusal as exc:
                record["move_refused"] = str(exc)
                record["boundary_after_refusal"] = callback.handle.boundary

    class Watcher(TrainerCallback):
        """Every parameter frozen during training, as it was right after the step that froze it."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, **kwargs):
            now = {n for n, p in model.named_parameters() if p.requires_grad}
            if self.trainable - now:  # the same on every rank: ZeRO-3's gather below is entered by all
                at_move.update({n: t for n, t in _full(model).items() if n in self.trainable - now})
            self.trainable = now

    at_move = {}
    callbacks = [callback] + ([Mover()] if case == "moved" else []) + [Watcher()]
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                      callbacks=callbacks)
    record["applied_at_init"] = callback.handle is not None and callback.handle.active
    recorder = Recorder(model)
    try:
        trainer.train()
    except EngineRefusal as exc:
        record["refused"] = str(exc)
        record["steps_trained"] = len(recorder.steps)
        record["unchanged_after_refusal"] = all(torch.equal(initial[n], t) for n, t in _full(model).items())
        return record
    finally:
        recorder.remove()
    final = _full(model)
    record["boundary"] = callback.handle.boundary
    record["graph_blocks"] = sorted(recorder.graph_blocks)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, recorder.steps)
    decay = set(trainer.get_decay_parameter_names(model))
    reference = _reference(base if tie else base_untied, initial, gathered, decay, fused=case == "fused")
    trained_ever = set().union(*(set(t) for _, t in recorder.steps))
    never = [n for n in final if n not in trained_ever]
    record["never_trained"] = never
    record["frozen_bitwise_unchanged"] = all(torch.equal(final[n], initial[n]) for n in never)
    record["trained"] = sorted(trained_ever)
    record["max_diff"] = max(float((final[n] - reference[n]).abs().max()) for n in final)
    if at_move:
        record["moved_frozen_unchanged"] = all(torch.equal(final[n], t) for n, t in at_move.items())
        record["moved_frozen_tensors"] = len(at_move)
        record["moved_frozen_elements"] = sum(t.numel() for t in at_move.values())
    record["trained_changed"] = all(not torch.equal(final[n], initial[n]) for n in trained_ever)
    record["fused_calls"] = (callback.fused_loss_handle.stats["fused"] if callback.fused_loss_handle else 0)
    record["moves"] = [list(m) for m in callback.moves]
    record["plan_cut"] = bool(callback.plan.cut)
    return record


def main(engine, out_dir):
    import torch.distributed as dist

    import freezekern as fk

    torch.set_num_threads(1)
    if engine.startswith("zero"):
        import deepspeed

        # gloo instead of DeepSpeed's shared-memory collectives: no C++ build at launch (DeepSpeed keeps and
        # reads this one dict of compatible ops)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # the reference models are built before any DeepSpeed config exists (no zero.Init for them)
    base = fk.tiny_model("llama", num_layers=6, hidden=32, vocab=97, tie=True, seed=0)
    base_untied = fk.tiny_model("llama", num_layers=6, hidden=32, vocab=97, tie=False, seed=0)
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["defaults", "library", "plan", "fused", "moved",
                                                                  "reselect", "moving"]
    records = []
    for case in cases:
        try:
            records.append(run_case(engine, case, out_dir, base, base_untied))
        except Exception:
            records.append({"case": case, "error": traceback.format_exc()[-4000:]})
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(out_dir, f"{engine}.rank{rank}.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
