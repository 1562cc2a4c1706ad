"""freezekern.model.engines in one process: optimizer hygiene, parameters replaced by sharding, the
Trainer found at init, whole tensors for the trace."""

import types

import pytest
import torch
from torch import nn

from freezekern import discover, tiny_model
from freezekern.cut import apply, move_boundary, trainable_parameters
from freezekern.model.engines import (
    EngineRefusal,
    check_can_stop_updating,
    engine_name,
    full_head,
    stop_updating,
    zero_stage,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _model(**kw):
    model = tiny_model("llama", num_layers=4, hidden=32, vocab=97, tie=True, seed=0, **kw)
    model.train()
    return model


def _batch():
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_stop_updating_drops_grad_and_state_and_refuses_trainable():
    model = _model()
    handle = apply(model, 1)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    model(**_batch()).loss.backward()
    optimizer.step()
    handle = move_boundary(handle, 3, optimizer=optimizer)
    frozen = [p for n, p in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))]
    assert all(p.grad is None and p not in optimizer.state for p in frozen)
    before = [p.detach().clone() for p in frozen]
    model(**_batch()).loss.backward()
    optimizer.step()  # weight decay included: a parameter without a gradient is skipped
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    with pytest.raises(ValueError, match="still requires grad"):
        stop_updating([next(p for p in model.parameters() if p.requires_grad)], optimizer)
    assert engine_name(model, optimizer) is None and zero_stage(model, optimizer) is None
    check_can_stop_updating(optimizer, model)  # a torch optimizer: nothing to refuse


def test_remove_restores_parameters_replaced_after_apply():
    """Sharding (FSDP2's fully_shard) replaces the Parameter objects; remove() finds them by name."""
    model = _model()
    handle = apply(model, 2)
    block = model.model.layers[0].mlp.up_proj
    old = block.weight
    block.weight = nn.Parameter(old.detach().clone(), requires_grad=False)  # what sharding does
    assert any(p is block.weight for p in handle.frozen_parameters())
    handle.remove()
    assert block.weight.requires_grad and old.requires_grad
    assert all(p.requires_grad for p in model.parameters())


def test_full_head_copies_sharded_head_and_keeps_whole_one():
    model = _model()
    parts = discover(model)
    with full_head(parts) as whole:
        assert whole is parts  # nothing sharded: nothing copied

    class Sharded(torch.Tensor):
        """A tensor standing for a DTensor shard: full_tensor() gives the whole weight."""

    weight = parts.lm_head.weight
    shard = weight.detach()[:10].as_subclass(Sharded)
    shard.full_tensor = types.MethodType(lambda self: weight.detach(), shard)
    parts.lm_head._parameters["weight"] = shard
    try:
        with full_head(parts) as whole:
            assert whole is not parts and torch.equal(whole.head_weight, weight)
            assert whole.norm_kwargs()["norm_eps"] == parts.norm_kwargs()["norm_eps"]
    finally:
        parts.lm_head._parameters["weight"] = weight


def _fake_zero(inner, stage=2, **attrs):
    """A DeepSpeed ZeRO optimizer as freezekern sees one: recognised by its module, stepping ``inner``."""
    cls = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2",
                                             "zero_stage": stage})
    zero = cls()
    zero.optimizer = inner
    for k, v in attrs.items():
        setattr(zero, k, v)
    return zero


def test_zero_refusal_names_engine_and_fix():
    # a DeepSpeedEngine is recognised by its module and asked for its stage; without its ZeRO optimizer
    # nothing can hold newly frozen parameters: refused, naming the engine and what to pass
    fake = type("DeepSpeedEngine", (), {"__module__": "deepspeed.runtime.engine",
                                        "zero_optimization_stage": lambda self: 2})()
    with pytest.raises(EngineRefusal, match="ZeRO-2.*pass optimizer="):
        check_can_stop_updating(None, fake)
    model = _model()
    handle = apply(model, 1)
    with pytest.raises(EngineRefusal, match="ZeRO-2"):
        move_boundary(handle, 2, model=fake)
    assert handle.active and handle.boundary == 1  # refused before anything changed
    stage0 = type("DeepSpeedEngine", (), {"__module__": "deepspeed.runtime.engine",
                                          "zero_optimization_stage": lambda self: 0})()
    stage0.optimizer = torch.optim.AdamW(model.parameters())  # no ZeRO optimizer: a plain one
    with pytest.raises(EngineRefusal, match="ZeRO-0.*stage 0.*ZeRO-1/2/3 or DDP"):
        move_boundary(handle, 2, model=stage0)
    flat = torch.zeros(4, requires_grad=True)
    swapped = _fake_zero(torch.optim.AdamW([flat]), swap_optimizer=True)
    with pytest.raises(EngineRefusal, match="ZeRO-2 with the optimizer offloaded to NVMe"):
        move_boundary(handle, 2, optimizer=swapped)
    assert handle.active and handle.boundary == 1


def _zero_layout(model, groups):
    """ZeRO-1/2 layout of ``model``'s parameters over ``groups`` flat fp32 partitions (the parameters dealt in
    order, as DeepSpeed flattens each param group): each parameter's ``_hp_mapping.hp_fragment`` a view."""
    params = list(model.parameters())
    share = -(-len(params) // groups)
    flats = []
    for g in range(groups):
        members = params[g * share: (g + 1) * share]
        flat = torch.cat([p.detach().reshape(-1) for p in members]).clone().requires_grad_(True)
        offset = 0
        for p in members:
            p._hp_mapping = types.SimpleNamespace(hp_fragment=flat.detach()[offset: offset + p.numel()])
            offset += p.numel()
        flats.append(flat)
    return params, flats


def _step_and_check_held(inner, flat, frozen_now, trained, steps):
    """Step ``inner`` over the single partition ``flat`` with random gradients ``steps`` times: every
    parameter of ``frozen_now`` keeps its fp32 fragment bitwise, ``trained`` (a parameter) still changes."""
    held = [p._hp_mapping.hp_fragment.clone() for p in frozen_now]
    before = trained._hp_mapping.hp_fragment.clone()
    for _ in range(steps):
        flat.grad = torch.randn_like(flat)
        inner.step()
    assert all(torch.equal(p._hp_mapping.hp_fragment, h) for p, h in zip(frozen_now, held))
    assert not torch.equal(trained._hp_mapping.hp_fragment, before)  # the rest still trains


def test_zero_pins_hold_newly_frozen_parameters_bitwise(caplog):
    """ZeRO-1/2 layout: each parameter's fp32 master is a fragment of a flat partition that AdamW (weight
    decay 0.1) steps whatever the gradient; after a move the newly frozen fragments never change, the others
    keep training, and the cut's handle moved."""
    model = _model()
    params, (flat,) = _zero_layout(model, 1)
    inner = torch.optim.AdamW([flat], lr=1e-2, weight_decay=0.1)
    zero = _fake_zero(inner)
    handle = apply(model, 1)
    for _ in range(2):
        flat.grad = torch.randn_like(flat)
        inner.step()
    with caplog.at_level("WARNING", logger="freezekern.engines"):
        handle = move_boundary(handle, 2, optimizer=zero)
    warned = [r for r in caplog.records if "pinned" in r.getMessage()]
    assert len(warned) == 1 and "decide it before the engine is built" in warned[0].getMessage()
    frozen_now = [p for p in handle.parts.blocks[1].parameters()]
    assert frozen_now and not any(p.requires_grad for p in frozen_now)
    from freezekern.model.zero_pins import pinned_count

    assert pinned_count(zero) == len(frozen_now)
    _step_and_check_held(inner, flat, frozen_now, params[-1], steps=3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="freezekern.engines"):
        handle = move_boundary(handle, 3, optimizer=zero)  # the same optimizer: said once
    assert pinned_count(zero) > len(frozen_now) and not [r for r in caplog.records if "pinned" in r.getMessage()]
    handle.remove()
    for p in params:
        del p._hp_mapping


def test_zero_move_that_cannot_pin_leaves_the_old_boundary():
    """A newly frozen parameter ZeRO holds no fp32 master for: the move is refused with nothing half-done (the
    old boundary applied, nothing pinned, gradients kept)."""
    from freezekern.model.zero_pins import pinned_count

    model = _model()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    offset = 0
    missing = next(iter(discover(model).blocks[1].parameters()))
    for p in params:
        if p is not missing:
            p._hp_mapping = types.SimpleNamespace(hp_fragment=flat[offset: offset + p.numel()])
        offset += p.numel()
    zero = _fake_zero(torch.optim.AdamW([flat.requires_grad_(True)], lr=1e-2, weight_decay=0.1))
    handle = apply(model, 1)
    model(**_batch()).loss.backward()
    block1 = list(handle.parts.blocks[1].parameters())
    with pytest.raises(EngineRefusal, match="no fp32 master"):
        move_boundary(handle, 2, optimizer=zero)
    assert all(p.requires_grad and p.grad is not None for p in block1)
    assert not any(p.requires_grad for p in handle.parts.blocks[0].parameters())
    assert pinned_count(zero) == 0
    for p in params:
        if p is not missing:
            del p._hp_mapping


def test_callback_finds_its_trainer_at_init(tmp_path):
    from transformers import Trainer, TrainingArguments

    from freezekern.integrations import FreezeKernCallback
    from freezekern.integrations.trainer_access import (
        trainer_calibration_batches as _trainer_calibration_batches,
    )

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(3, 11) + i
            return {"input_ids": ids, "labels": ids, "unused_column": i}

    callback = FreezeKernCallback(calibration_batches=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                             remove_unused_columns=True)
    trainer = Trainer(model=_model(), args=args, train_dataset=Rows(), callbacks=[callback])
    assert callback._trainer() is trainer
    assert callback.handle is None  # one process: decided at train begin, as before
    batches = _trainer_calibration_batches(trainer, 2)
    assert len(batches) == 2 and set(batches[0]) == {"input_ids", "labels"}  # the column the model does not take
    assert torch.equal(batches[1]["input_ids"][0], torch.arange(3, 11) + 2)


def test_fsdp1_is_refused_with_the_fsdp2_recipe(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = _model()
    block_type = type(model.model.layers[0])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = FSDP(_model(), auto_wrap_policy=ModuleWrapPolicy({block_type}), use_orig_params=True,
                       device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
            apply(wrapped, 1)
        handle = apply(model, 1)  # applied first, then wrapped per block: refused at the first forward
        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({block_type}), use_orig_params=True,
                       device_id=torch.device("cpu"))
        with pytest.raises(RuntimeError, match="FSDP1.*fully_shard"):
            wrapped(**_batch())
        assert handle.active
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["adamw", "adam-amsgrad", "adamw-two-groups", "adamw-per-parameter",
                                  "adamw-fused"])
def test_zero_pins_take_pinned_ranges_out_of_adam(kind):
    """With torch Adam/AdamW stepping the partitions, pinned ranges are left out of the step itself: their
    moments stop moving too, and every other element gets exactly the update a whole-partition step gives
    (a reference optimizer stepping copies of the partitions with the same gradients; the fused CPU kernel
    rounds a range's edge elements as it does its own thread chunks' edges, so it is held to 1e-6).
    "per-parameter": one partition per parameter, so whole partitions are pinned and must still count steps."""
    from freezekern.model.zero_pins import left_out_of_last_step, pinned_count

    model = _model()
    groups = {"adamw-two-groups": 2, "adamw-per-parameter": len(list(model.parameters()))}.get(kind, 1)
    params, flats = _zero_layout(model, groups)
    refs = [f.detach().clone().requires_grad_(True) for f in flats]

    def make(tensors):
        if kind == "adam-amsgrad":
            return torch.optim.Adam(tensors, lr=1e-2, weight_decay=0.1, amsgrad=True)
        groups = [{"params": [t], "weight_decay": 0.1 if i % 2 == 0 else 0.0} for i, t in enumerate(tensors)]
        return torch.optim.AdamW(groups, lr=1e-2, fused=kind == "adamw-fused")

    def same(a, b):
        if kind == "adamw-fused":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            return True
        return torch.equal(a, b)

    inner, ref = make(flats), make(refs)
    zero = _fake_zero(inner)
    torch.manual_seed(0)

    def step(n):
        for _ in range(n):
            for f, r in zip(flats, refs):
                f.grad = torch.randn_like(f)
                r.grad = f.grad.clone()
            inner.step()
            ref.step()

    handle = apply(model, 1)
    step(2)
    handle = move_boundary(handle, 3, optimizer=zero)
    frozen_now = [p for b in handle.parts.blocks[1:3] for p in b.parameters()]
    assert pinned_count(zero) == len(frozen_now)
    moments = {k: [v.clone() for v in (inner.state[f][k] for f in flats)] for k in inner.state[flats[0]]
               if k != "step"}
    held = [p._hp_mapping.hp_fragment.clone() for p in frozen_now]
    step(3)
    frozen = torch.zeros(sum(f.numel() for f in flats), dtype=torch.bool)
    starts = [0]
    for f in flats[:-1]:
        starts.append(starts[-1] + f.numel())
    for p in frozen_now:
        fragment = p._hp_mapping.hp_fragment
        g = next(i for i, f in enumerate(flats) if f.untyped_storage().data_ptr()
                 == fragment.untyped_storage().data_ptr())
        a = starts[g] + fragment.storage_offset() - flats[g].storage_offset()
        frozen[a: a + fragment.numel()] = True
    got, want = torch.cat([f.detach() for f in flats]), torch.cat([r.detach() for r in refs])
    assert frozen.any() and not frozen.all()
    assert same(got[~frozen], want[~frozen])  # the step's arithmetic, element for element
    assert not torch.equal(got[frozen], want[frozen])  # the reference kept moving them
    assert all(torch.equal(p._hp_mapping.hp_fragment, h) for p, h in zip(frozen_now, held))
    for k, before in moments.items():  # moments of pinned ranges untouched: the optimizer never saw them
        now = torch.cat([inner.state[f][k] for f in flats])
        assert torch.equal(now[frozen], torch.cat(before)[frozen])
        assert same(now[~frozen], torch.cat([ref.state[r][k] for r in refs])[~frozen])
    assert all(torch.equal(inner.state[f]["step"], ref.state[r]["step"]) for f, r in zip(flats, refs))
    assert [g["params"] for g in inner.param_groups] == [[f] for f in flats]
    if kind == "adamw-per-parameter":
        assert any(f.numel() == frozen[s: s + f.numel()].sum() for f, s in zip(flats, starts))  # wholly pinned
    assert len(inner.state) == len(flats)  # the step's range views are gone again
    assert left_out_of_last_step(zero) == int(frozen.sum())
    inner.state_dict()  # a checkpoint still maps every state to its partition
    handle.remove()
    for p in params:
        del p._hp_mapping


def test_zero_pins_with_a_non_elementwise_optimizer_write_back():
    """An optimizer not known to be elementwise steps the whole partition; the pinned fragments are written
    back (held bitwise) while the rest trains."""
    model = _model()
    params, (flat,) = _zero_layout(model, 1)
    inner = torch.optim.SGD([flat], lr=1e-2, momentum=0.9, weight_decay=0.1)
    zero = _fake_zero(inner)
    handle = apply(model, 1)
    flat.grad = torch.randn_like(flat)
    inner.step()
    handle = move_boundary(handle, 2, optimizer=zero)
    frozen_now = list(handle.parts.blocks[1].parameters())
    _step_and_check_held(inner, flat, frozen_now, params[-1], steps=2)
    from freezekern.model.zero_pins import left_out_of_last_step

    assert left_out_of_last_step(zero) == 0  # stepped whole, then written back
    handle.remove()
    for p in params:
        del p._hp_mapping


def test_zero_pins_refuse_a_copied_master_and_partial_offload():
    """A parameter whose fp32 "fragment" is a copy (DeepSpeed's ZeRO-3 with the optimizer offloaded from an
    accelerator) cannot be held through it, and a partly offloaded or ZenFlow optimizer steps partitions
    outside the hooked one: the move is refused, naming the fix, with nothing changed."""
    from freezekern.model.zero_pins import pinned_count

    model = _model()
    params, (flat,) = _zero_layout(model, 1)
    zero = _fake_zero(torch.optim.AdamW([flat], lr=1e-2), single_partition_of_fp32_groups=[flat])
    handle = apply(model, 1)
    copied = next(iter(handle.parts.blocks[1].parameters()))
    copied._hp_mapping = types.SimpleNamespace(hp_fragment=copied._hp_mapping.hp_fragment.clone())
    with pytest.raises(EngineRefusal, match="a copy of a parameter's fp32 master.*without offloading"):
        move_boundary(handle, 2, optimizer=zero)
    assert pinned_count(zero) == 0  # the old boundary applied again: block 1 still trains
    assert all(p.requires_grad for p in handle.parts.blocks[1].parameters())
    assert not any(p.requires_grad for p in handle.parts.blocks[0].parameters())
    from freezekern.cut.freeze import active_handle

    handle = active_handle(model)
    assert handle.boundary == 1
    for attrs, match in (({"backup_optimizer": object()}, "partly offloaded"), ({"zenflow": True}, "ZenFlow")):
        with pytest.raises(EngineRefusal, match=match):
            move_boundary(handle, 2, optimizer=_fake_zero(torch.optim.AdamW([flat]), **attrs))
        assert handle.active and handle.boundary == 1
    handle.remove()
    for p in params:
        del p._hp_mapping


def test_zero_pins_after_a_step_that_raised_leave_the_next_step_alone():
    """ZeRO-3 sets a group's params around each sub-group's step; when one step raises between the hooks and
    the engine goes on, the next sub-group's step runs on its own partition (not the stale one)."""
    from freezekern.model import zero_pins

    a, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    inner = torch.optim.AdamW([{"params": [a]}], lr=1e-1)
    for x in (a, b):
        inner.param_groups[0]["params"] = [x]
        x.grad = torch.randn(8)
        inner.step()
    zero = _fake_zero(inner)
    model = _model()
    handle = apply(model, 1)
    param = next(iter(handle.parts.blocks[1].parameters()))
    param._hp_mapping = types.SimpleNamespace(hp_fragment=a.detach()[:2])
    inner.param_groups[0]["params"] = []
    zero_pins.pin([param], optimizer=zero)
    fail = {"once": True}

    def raise_once(*_):
        if fail.pop("once", False):
            raise RuntimeError("out of memory")

    inner.register_step_pre_hook(raise_once)  # runs after freezekern's narrowing
    inner.param_groups[0]["params"] = [a]
    a.grad = torch.randn(8)
    with pytest.raises(RuntimeError):
        inner.step()
    inner.param_groups[0]["params"] = [b]  # the engine goes on with the next sub-group
    before = b.detach().clone()
    b.grad = torch.randn(8)
    inner.step()
    assert inner.param_groups[0]["params"] == [b] and not torch.equal(b.detach(), before)
    del param._hp_mapping
    handle.remove()
