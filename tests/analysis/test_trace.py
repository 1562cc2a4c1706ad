"""Streaming tracer invariants against naive computations."""

import json

import pytest
import torch
import torch.nn.functional as F

import freezekern as fk
from freezekern.analysis.semantic import SemanticBasis
from freezekern.analysis.trace import shifted_targets
from freezekern.ops.reference import apply_norm


def random_batches(vocab, n_batches=3, batch=2, seq=11, seed=0, pad_tail=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if pad_tail:
            mask[0, -4:] = 0
            labels[0, -4:] = -100
            labels[1, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def naive_trace(model, batches, metric):
    """D_k from output_hidden_states and materialised logits (the memory-hungry way)."""
    parts = fk.discover(model)
    norm = parts.norm_kwargs()
    weight = parts.head_weight.detach().double()
    basis = SemanticBasis(parts.head_weight) if metric == "cosine" else None
    sums = torch.zeros(parts.num_layers + 1, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            targets = shifted_targets(b).reshape(-1)
            keep = targets != -100
            count += int(keep.sum())
            for k, h in enumerate(out.hidden_states):
                flat = h.reshape(-1, h.shape[-1])[keep].double()
                # HF's last hidden state is already normed; the others are raw block outputs.
                x = flat if k == parts.num_layers else apply_norm(flat, **norm)
                y = targets[keep]
                if metric == "cosine":
                    d = 1 - F.cosine_similarity(x, basis.rows(y).double(), dim=-1)
                else:
                    d = F.cross_entropy(x @ weight.t(), y, reduction="none")
                sums[k] += d.sum()
    return (sums / count).tolist(), count


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "qwen3"])
@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
def test_trace_equals_naive_hidden_states(family, metric):
    model = fk.tiny_model(family, num_layers=4)
    batches = random_batches(model.config.vocab_size, pad_tail=True)
    trace = fk.analyze(model, batches, metric=metric, impl="torch", progress=False)
    want, count = naive_trace(model, batches, metric)
    assert trace.token_count == count and trace.num_layers == 4 and len(trace.deviations) == 5
    torch.testing.assert_close(torch.tensor(trace.deviations), torch.tensor(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "opt"])
def test_logit_lens_last_space_is_the_model_loss(family):
    model = fk.tiny_model(family, num_layers=3)
    batches = random_batches(model.config.vocab_size, n_batches=2, pad_tail=True)
    trace = fk.analyze(model, batches, metric="logit_lens", impl="torch", progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            targets = shifted_targets(b)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    assert trace.deviations[-1] == pytest.approx(total / count, rel=1e-5)


def test_batch_size_invariance_and_merge():
    model = fk.tiny_model("llama", num_layers=3)
    batches = random_batches(model.config.vocab_size, n_batches=4, batch=2)
    whole = fk.analyze(model, batches, progress=False)
    singles = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(2)]
    split = fk.analyze(model, singles, progress=False)
    torch.testing.assert_close(torch.tensor(whole.deviations), torch.tensor(split.deviations), rtol=1e-5, atol=1e-6)
    halves = [fk.analyze(model, batches[:1], progress=False), fk.analyze(model, batches[1:], progress=False)]
    merged = fk.DeviationTrace.merge(halves)
    assert merged.token_count == whole.token_count
    torch.testing.assert_close(torch.tensor(merged.deviations), torch.tensor(whole.deviations), rtol=1e-6, atol=1e-7)


def test_ignored_labels_and_padding_change_nothing_else():
    model = fk.tiny_model("llama", num_layers=3)
    batch = random_batches(model.config.vocab_size, n_batches=1, batch=1, seq=12)[0]
    short = {k: v[:, :6] for k, v in batch.items()}
    padded = {k: v.clone() for k, v in batch.items()}
    padded["attention_mask"][:, 6:] = 0
    padded["labels"][:, 6:] = -100
    padded["input_ids"][:, 6:] = 0
    a = fk.analyze(model, [short], progress=False)
    b = fk.analyze(model, [padded], progress=False)
    assert a.token_count == b.token_count == 5
    torch.testing.assert_close(torch.tensor(a.deviations), torch.tensor(b.deviations), rtol=1e-5, atol=1e-6)


def test_plain_tensor_batches_and_json_round_trip(tmp_path):
    model = fk.tiny_model("gpt2", num_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    trace = fk.analyze(model, [ids], metric="logit_lens", progress=False)
    assert trace.token_count == 14
    path = tmp_path / "trace.json"
    trace.save(path)
    again = fk.DeviationTrace.load(path)
    assert again == trace
    assert json.loads(path.read_text())["metric"] == "logit_lens"


def test_head_is_never_run_and_model_state_restored():
    model = fk.tiny_model("llama", num_layers=3)
    model.train()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    fk.analyze(model, random_batches(model.config.vocab_size, n_batches=1), progress=False)
    assert calls == [] and model.training
    assert not model.model.layers[0]._forward_pre_hooks and not model.model.layers[0]._forward_hooks


def test_all_ignored_and_non_finite_are_clear_errors():
    model = fk.tiny_model("llama", num_layers=3)
    batch = random_batches(model.config.vocab_size, n_batches=1)[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no counted tokens"):
        fk.analyze(model, [batch], progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="latent space h_2"):
        fk.analyze(model, random_batches(model.config.vocab_size, n_batches=1), progress=False)


def test_bad_metric_and_bad_batch():
    model = fk.tiny_model("llama", num_layers=3)
    with pytest.raises(ValueError, match="metric must be"):
        fk.analyze(model, [], metric="l2", progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        fk.analyze(model, [{"ids": torch.zeros(1, 3, dtype=torch.long)}], progress=False)
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    for metric in ("cosine", "logit_lens"):
        with pytest.raises(ValueError, match="impl must be"):  # refused before any forward
            fk.analyze(model, random_batches(model.config.vocab_size), metric=metric, impl="cuda", progress=False)
    assert not calls


@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
def test_negative_labels_other_than_ignore_index_are_refused(metric):
    model = fk.tiny_model("llama", num_layers=2)
    batches = random_batches(model.config.vocab_size, n_batches=1)
    batches[0]["labels"][0, 5:] = -1
    with pytest.raises(ValueError, match=r"labels \[-1\] are negative; only -100"):
        fk.analyze(model, batches, metric=metric, progress=False)


@pytest.mark.slow
def test_default_model_loss_and_boundary(default_model):
    model, tokenizer = default_model
    assert fk.discover(model).num_layers == 30
    batches = fk.make_batches(tokenizer, seq_len=128, num_tokens=512, batch_size=2)
    trace = fk.analyze(model, batches, metric="logit_lens", progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            n = int((shifted_targets(b) != -100).sum())
            total += out.loss.item() * n
            count += n
    assert trace.deviations[-1] == pytest.approx(total / count, rel=1e-4)
    assert 1.0 < trace.deviations[-1] < 4.0  # code perplexity of a 135M model
    plan = fk.plan(trace, "salf")
    assert 2 <= plan.boundary <= 29 and plan.tied and not plan.train_head
