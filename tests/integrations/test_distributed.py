"""torch.distributed on 2 CPU processes (gloo): agreement on the boundary, DDP and FSDP2 with a plan."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from freezekern import analyze, discover, tiny_model
from freezekern.analysis.trace import DeviationTrace
from freezekern.cut import apply, trainable_parameters
from freezekern.integrations.distributed import agree_on_boundary, agree_on_plan, is_distributed, merge_traces
from freezekern.policy.rules import plan as make_plan

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
L = 6


def _batch(rank, step=0):
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(3, 257, (2, 10), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _model():
    model = tiny_model("llama", num_layers=L, hidden=64, vocab=257, tie=True, seed=0)
    model.train()
    return model


def _reference_grads(reference, step):
    """Mean over both ranks' batches of a plain backward (what DDP/FSDP average to)."""
    reference.zero_grad(set_to_none=True)
    for rank in range(WORLD):
        (reference(**_batch(rank, step), use_cache=False).loss / WORLD).backward()
    return {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}


def _freeze_like(reference, model):
    trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)


def _agreement(rank):
    assert is_distributed()
    local_k = 2 if rank == 0 else 4
    assert agree_on_boundary(local_k) == 2
    model = _model()
    summary = discover(model).summary()
    agreed = agree_on_plan(make_plan(summary, "fixed", boundary=local_k), summary["parameter_counts"])
    assert agreed.boundary == 2 and agreed.num_layers == L
    if rank == 1:
        assert "lowered from 4 to 2" in agreed.notes[-1]
        assert agreed.trainable_params > make_plan(summary, "fixed", boundary=4).trainable_params
    # Every rank traces its own data; the merged trace equals one trace over all the data.
    merged = merge_traces(analyze(model, [_batch(rank)], progress=False))
    whole = analyze(model, [_batch(0), _batch(1)], progress=False)
    assert merged.token_count == whole.token_count
    torch.testing.assert_close(torch.tensor(merged.deviations), torch.tensor(whole.deviations), rtol=1e-9,
                               atol=1e-9)
    bad = DeviationTrace.from_dict(merged.to_dict())
    bad.metric = "logit_lens" if rank == 1 else bad.metric
    with pytest.raises(ValueError, match="different models"):
        merge_traces(bad)
    return agreed


def _ddp(rank, agreed, checkpointing):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="before wrapping"):
        apply(DistributedDataParallel(copy.deepcopy(model)), agreed)
    handle = apply(model, agreed)
    _freeze_like(reference, model)
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False: every trainable parameter gets a grad
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    ref_optimizer = torch.optim.AdamW(trainable_parameters(reference), lr=1e-3)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        ddp(**_batch(rank, step), use_cache=False).loss.backward()
        expected = _reference_grads(reference, step)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7)
            else:
                assert p.grad is None
        optimizer.step()
        ref_optimizer.step()
    assert handle.stats["cuts"] == 2
    handle.remove()


def _fsdp2(rank, agreed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    reference = copy.deepcopy(model)
    handle = apply(model, agreed)  # before sharding: the flags are on the original parameters
    _freeze_like(reference, model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(**_batch(rank), use_cache=False).loss.backward()
    expected = _reference_grads(reference, 0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), expected[n], rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None
    assert handle.stats["cuts"] == 1


def _worker(rank, world, init_file):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        agreed = _agreement(rank)
        _ddp(rank, agreed, checkpointing=False)
        _ddp(rank, agreed, checkpointing=True)
        _fsdp2(rank, agreed)
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_and_train_with_ddp_and_fsdp2(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init")), nprocs=WORLD, join=True)


def test_single_process_helpers_are_identities():
    assert not is_distributed()
    assert agree_on_boundary(3) == 3
    model = _model()
    summary = discover(model).summary()
    plan = make_plan(summary, "fixed", boundary=3)
    assert agree_on_plan(plan) is plan
    trace = analyze(model, [_batch(0)], progress=False)
    assert merge_traces(trace) is trace
