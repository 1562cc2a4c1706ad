"""2-process CPU runs under FSDP2 (``fully_shard``) for tests/integrations/test_engines.py (started by torchrun).

    torchrun --standalone --nproc_per_node 2 tests/integrations/fsdp2_script.py OUT_DIR

Checks, each against a single-process reference (the plain model, frozen
with ``requires_grad=False`` as recorded, each step's gradient the mean of both
ranks' batches, torch AdamW with weight decay 0.1):

* ``plan``: ``apply(model, 2)`` then ``fully_shard`` per block and the root;
  gradient checkpointing; the boundary moved to 4 after step 1
  (``move_boundary``); blocks all-gathered in backward; ``remove()`` afterwards.
* ``defaults``: ``FreezeKernCallback()`` analysing and applying on the model
  *after* sharding (the trace reads the DTensor head with ``full_tensor()``);
  its trace must equal the unsharded trace.
* ``fused``: untied head sharded on its own, ``apply(..., fused_loss=True)``;
  loss and gradients against the plain unsharded loss.

Writes OUT_DIR/fsdp2.rank<r>.json.
"""

import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

WORLD = 2
L = 6


def _model(tie=True):
    import freezekern as fk

    model = fk.tiny_model("llama", num_layers=L, hidden=32, vocab=97, tie=tie, seed=0)
    model.train()
    return model


def _batch(rank, step):
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(3, 97, (2, 10), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _full(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().clone()
    return out


def _shard(model, head_alone=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    if head_alone:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class GatherLog:
    """Which FSDP2 units all-gather in backward, and which blocks an autograd graph reached."""

    def __init__(self, model):
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.backward_gathers = []
        self.graph_blocks = set()
        original = FSDPParamGroup.unshard
        log = self

        def unshard(group, async_op=False):
            if group._training_state == TrainingState.PRE_BACKWARD and not group.is_unsharded \
                    and group._all_gather_result is None:
                log.backward_gathers.append(group._module_fqn)
            return original(group, async_op)

        self._restore = lambda: setattr(FSDPParamGroup, "unshard", original)
        FSDPParamGroup.unshard = unshard
        self.hooks = [block.register_forward_hook(self._on_block(i)) for i, block in enumerate(model.model.layers)]

    def _on_block(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and hidden.requires_grad:
                self.graph_blocks.add(index)
        return hook

    def close(self):
        self._restore()
        for hook in self.hooks:
            hook.remove()

    def gathered_blocks(self):
        return sorted({int(f.split(".")[2]) for f in self.backward_gathers if f.startswith("model.layers.")})


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _reference_step(reference, optimizer, step, trainable):
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)
        if n not in trainable:
            p.grad = None
            optimizer.state.pop(p, None)
    optimizer.zero_grad(set_to_none=True)
    for rank in range(WORLD):
        (reference(**_batch(rank, step), use_cache=False).loss / WORLD).backward()
    optimizer.step()


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def case_plan(rank):
    from freezekern.cut import apply, move_boundary

    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    initial = _full(model)
    handle = apply(model, 2)
    _shard(model)
    optimizer, ref_optimizer = _optimizer(model), _optimizer(reference)
    log = GatherLog(model)
    record = {"case": "plan"}
    trainable_per_step = []
    for step in range(3):
        if step == 1:
            handle = move_boundary(handle, 4, optimizer=optimizer)
            record["moved_to"] = handle.boundary
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        trainable_per_step.append(sorted(trainable))
        optimizer.zero_grad(set_to_none=True)
        model(**_batch(rank, step), use_cache=False).loss.backward()
        optimizer.step()
        _reference_step(reference, ref_optimizer, step, trainable)
        if step == 0:
            record["gathered_step0"] = log.gathered_blocks()
            record["graph_step0"] = sorted(log.graph_blocks)
            log.backward_gathers.clear()
            log.graph_blocks.clear()
    record["gathered_after_move"] = log.gathered_blocks()
    record["graph_after_move"] = sorted(log.graph_blocks)
    log.close()
    final = _full(model)
    never = [n for n in final if not any(n in t for t in trainable_per_step)]
    record["never_trained"] = len(never)
    record["frozen_bitwise_unchanged"] = all(torch.equal(final[n], initial[n]) for n in never)
    record["max_diff"] = _max_diff(final, _full(reference))
    record["trained_changed"] = all(not torch.equal(final[n], initial[n]) for n in trainable_per_step[-1])
    cut_block = model.model.layers[4]
    record["prefetch_set"] = len(cut_block._get_fsdp_state()._states_to_backward_prefetch)
    handle.remove()
    record["prefetch_after_remove"] = len(cut_block._get_fsdp_state()._states_to_backward_prefetch)
    record["all_trainable_after_remove"] = all(p.requires_grad for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model(**_batch(rank, 9), use_cache=False).loss.backward()
    record["embedding_grad_after_remove"] = model.model.embed_tokens.weight.grad is not None
    return record


def case_defaults(rank):
    from freezekern.integrations import FreezeKernCallback
    from freezekern.integrations.trainer_access import trace_model as _trace

    model = _model()
    reference = copy.deepcopy(model)
    batches = [_batch(rank, 50)]
    plain = _trace(reference, [_batch(0, 50), _batch(1, 50)], "cosine")
    _shard(model)
    callback = FreezeKernCallback(calibration_batches=1)
    plan = callback._analyse(model, batches)
    callback._apply(model, plan)
    record = {"case": "defaults", "boundary": plan.boundary,
              "trace_diff": max(abs(a - b) for a, b in zip(callback.trace.deviations, plain.deviations)),
              "tokens": [callback.trace.token_count, plain.token_count],
              "parameter_counts_equal": callback.trace.parameter_counts == plain.parameter_counts}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer, ref_optimizer = _optimizer(model), _optimizer(reference)
    log = GatherLog(model)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(**_batch(rank, step), use_cache=False).loss.backward()
        optimizer.step()
        _reference_step(reference, ref_optimizer, step, trainable)
    record["gathered"] = log.gathered_blocks()
    record["graph_blocks"] = sorted(log.graph_blocks)
    log.close()
    final, expected = _full(model), _full(reference)
    record["max_diff"] = _max_diff(final, expected)
    return record


def case_fused(rank):
    from freezekern.cut import apply

    model = _model(tie=False)
    reference = copy.deepcopy(model)
    handle = apply(model, 2, fused_loss=True)
    _shard(model, head_alone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)
    loss = model(**_batch(rank, 0), use_cache=False).loss
    loss.backward()
    ref_losses = [reference(**_batch(r, 0), use_cache=False).loss for r in range(WORLD)]
    (sum(ref_losses) / WORLD).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    return {"case": "fused", "fused_calls": handle.fused_loss.stats["fused"],
            "loss_diff": float((loss.detach() - ref_losses[rank].detach()).abs()),
            "grad_names_equal": sorted(grads) == sorted(ref_grads),
            "head_grad": "lm_head.weight" in grads,
            "grad_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads)}


def main(out_dir):
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = []
    for case in (case_plan, case_defaults, case_fused):
        try:
            records.append(case(rank))
        except Exception:
            records.append({"case": case.__name__, "error": traceback.format_exc()[-4000:]})
    with open(os.path.join(out_dir, f"fsdp2.rank{rank}.json"), "w") as f:
        json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
