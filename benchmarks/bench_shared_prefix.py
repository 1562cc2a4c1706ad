"""DPO step with the frozen prefix shared between the policy and its reference model, against unshared.

    pytest benchmarks/bench_shared_prefix.py --benchmark-only -s                      # tiny llama (CI speed)
    FREEZEKERN_BENCH_FULL=1 pytest benchmarks/bench_shared_prefix.py --benchmark-only -s -k smollm2

One DPO step: zero_grad, the policy's forward on the chosen and rejected
sequences of each pair in one batch, the reference's forward on the same
batch under ``torch.no_grad()``, the sigmoid DPO loss (beta 0.1), backward,
AdamW over the trainable parameters. The sequence log-probabilities come
either from the logits (``logits``: log_softmax over the vocabulary and a
gather, as most DPO implementations and TRL before 1.0 compute them) or from
TRL 1.16's fused LM head (``trl_fused``: what its DPOTrainer runs; on the CPU
it scores every position and recomputes the logits in the backward, so the
head is a larger share of the step and the prefix a smaller one). The policy is cut at k =
round(0.8 L) (``freezekern.apply``); the reference is a frozen copy of the
base model. ``shared`` adds ``freezekern.cut.shared_prefix.SharedPrefix``: the
reference forward is served the policy's boundary state and skips the
embedding and blocks 1..k.

Before timing, the policy's and the reference's log-probabilities with and
without sharing are compared on the same weights (they must be equal: the
benchmark fails otherwise). The two variants are stepped alternately (ABBA)
and ``paired_ratio_median`` is the median over rounds of t(shared) /
t(unshared) (target <= 0.8 on SmolLM2 on the CPU). FREEZEKERN_BENCH_PAIRS
(default 2) pairs of FREEZEKERN_BENCH_SEQ (default 256) tokens per batch,
FREEZEKERN_BENCH_ROUNDS rounds. Nothing is asserted about time.
"""

from __future__ import annotations

import copy
import os
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F

from freezekern import discover, tiny_model
from freezekern.cut import apply, trainable_parameters
from freezekern.cut.shared_prefix import SharedPrefix
from freezekern.profiler.timing import paired_times

warnings.filterwarnings("ignore", category=FutureWarning)
trl_utils = pytest.importorskip("trl.trainer.utils")

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIGS = ["tiny"] + (["smollm2"] if FULL else [])
LOGPS = ["logits", "trl_fused"]
BETA = 0.1


class _Setup:
    def __init__(self, name: str):
        pairs = int(os.environ.get("FREEZEKERN_BENCH_PAIRS", "2"))
        seq = int(os.environ.get("FREEZEKERN_BENCH_SEQ", "256" if name == "smollm2" else "64"))
        if name == "tiny":
            model = tiny_model("llama", num_layers=10, hidden=128, vocab=2048, tie=True)
            ids = torch.randint(3, 2048, (2 * pairs, seq), generator=torch.Generator().manual_seed(0))
            rounds = 4
        else:
            from freezekern import load_default_model, make_batches

            model, tokenizer = load_default_model()
            ids = make_batches(tokenizer, seq_len=seq, num_tokens=2 * pairs * seq, batch_size=2 * pairs)[0]["input_ids"]
            rounds = 4
        self.rounds = int(os.environ.get("FREEZEKERN_BENCH_ROUNDS", rounds))
        self.name = name
        self.base = model.to(DEVICE)
        self.num_layers = discover(model).num_layers
        self.boundary = round(0.8 * self.num_layers)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # the prompt part of each sequence is not scored
        self.batch = {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE),
                      "labels": labels.to(DEVICE)}


@pytest.fixture(scope="module", params=CONFIGS)
def setup(request):
    return _Setup(request.param)


def _pair(setup: _Setup, shared: bool, logps: str):
    """(policy, reference, SharedPrefix or None): a cut policy and a frozen copy of the base as its reference."""
    policy = copy.deepcopy(setup.base).train()
    reference = copy.deepcopy(setup.base).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    if logps == "trl_fused":
        for model in (policy, reference):
            trl_utils.add_fused_lm_head(model)
    handle = apply(policy, setup.boundary)
    source = SharedPrefix(handle, reference=reference) if shared else None
    return policy, reference, source


def _logps(model, batch, logps: str):
    """Sequence log-probabilities [B] of the scored tokens."""
    if logps == "trl_fused":
        return model(**batch, fused_lm_head=True).log_probs.sum(dim=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * (labels != -100)).sum(dim=1)


def _stepper(setup: _Setup, shared: bool, logps: str):
    policy, reference, source = _pair(setup, shared, logps)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=1e-6)
    batch = setup.batch

    def step():
        optimizer.zero_grad(set_to_none=True)
        policy_logps = _logps(policy, batch, logps)
        with torch.no_grad():
            ref_logps = _logps(reference, batch, logps)
        chosen, rejected = policy_logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return step, source


@pytest.mark.parametrize("logps", LOGPS)
def test_shared_prefix_log_probs_are_exact(setup, logps):
    """Not a timing: sharing must give the same log-probabilities as two full forwards."""
    plain_policy, plain_ref, _ = _pair(setup, False, logps)
    policy, reference, source = _pair(setup, True, logps)
    expected = _logps(plain_policy, setup.batch, logps)
    got = _logps(policy, setup.batch, logps)
    with torch.no_grad():
        expected_ref = _logps(plain_ref, setup.batch, logps)
        got_ref = _logps(reference, setup.batch, logps)
    assert source.stats["served"] == 1
    assert torch.equal(got, expected) and torch.equal(got_ref, expected_ref)
    source.detach()


@pytest.mark.parametrize("logps", LOGPS)
def test_paired_dpo_step(benchmark, setup, logps):
    """DPO steps with and without the shared prefix, alternately (ABBA); extra_info has the paired ratio."""
    benchmark.group = f"dpo_shared_prefix[{setup.name}]"
    steppers = {"unshared": _stepper(setup, False, logps), "shared": _stepper(setup, True, logps)}
    paired_times(steppers["shared"][0], steppers["unshared"][0], 1, DEVICE)  # warm-up round, not counted
    measured = {}

    def both():
        measured["ratios"], measured["times"] = paired_times(steppers["shared"][0], steppers["unshared"][0],
                                                             max(setup.rounds, 2), DEVICE)

    benchmark.pedantic(both, rounds=1, iterations=1)
    ratios = measured["ratios"]
    times = {"shared": measured["times"][0], "unshared": measured["times"][1]}
    source = steppers["shared"][1]
    info = {"config": setup.name, "logps": logps, "device": str(DEVICE), "boundary": setup.boundary,
            "num_layers": setup.num_layers, "threads": torch.get_num_threads(),
            "batch_shape": list(setup.batch["input_ids"].shape), "paired_ratio_median": statistics.median(ratios),
            "paired_ratios": ratios, "target": 0.8, "shared_s": sorted(times["shared"]),
            "unshared_s": sorted(times["unshared"]), "shared_stats": dict(source.stats)}
    benchmark.extra_info.update(info)
    print(f"\nDPO step [{setup.name}, {logps}] k={setup.boundary}/{setup.num_layers}, batch {info['batch_shape']} "
          f"on {DEVICE} ({torch.get_num_threads()} threads): "
          f"unshared {statistics.median(times['unshared']):.3f} s, shared {statistics.median(times['shared']):.3f} s, "
          f"paired ratio {info['paired_ratio_median']:.3f} (target <= 0.8); {source.stats}")
    source.detach()
