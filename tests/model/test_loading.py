"""Default-model cache: complete entries load, incomplete ones are detected and rebuilt."""

import json
import math
import shutil

import pytest
import torch

from freezekern.model import loading as models
from freezekern.model.loading import TINY_FAMILIES


def test_cache_marker_detects_incomplete_entries(tmp_path):
    entry = tmp_path / "m"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"x" * 10)
    assert not models._cache_is_complete(entry)
    (entry / models.COMPLETE_MARKER).write_text(json.dumps({"files": {"model.safetensors": 10}}))
    assert models._cache_is_complete(entry)
    (entry / "model.safetensors").write_bytes(b"x" * 5)  # truncated by an interrupted copy
    assert not models._cache_is_complete(entry)
    (entry / models.COMPLETE_MARKER).write_text("{garbage")
    assert not models._cache_is_complete(entry)


def test_parse_dtype():
    assert models.parse_dtype("bf16") is models.DTYPES["bfloat16"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        models.parse_dtype("int8")


@pytest.mark.slow
def test_default_model_cache_is_rebuilt_when_corrupt(default_model, tmp_path, monkeypatch):
    # Work on a private copy: the session's default model memory-maps the real cache's weights.
    real = models.default_model_dir()
    assert models._cache_is_complete(real)
    monkeypatch.setenv("FREEZEKERN_CACHE", str(tmp_path / "cache"))
    copy = models.default_model_dir()
    shutil.copytree(real, copy)
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted write
    assert not models._cache_is_complete(copy)
    model, tokenizer = models.load_default_model()
    assert models._cache_is_complete(copy) and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 576
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_tiny_family_analyses_plans_applies_and_trains(family):
    import freezekern as fk

    model = fk.tiny_model(family, num_layers=4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 12), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for metric in ("cosine", "logit_lens"):
        trace = fk.analyze(model, [batch], metric=metric, progress=False)
        assert all(math.isfinite(d) for d in trace.deviations)
    plan = fk.plan(trace)
    assert 2 <= plan.boundary <= 3
    handle = fk.apply(model, plan)
    model.train()
    model(**batch, use_cache=False).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} and trained
    frozen_block = handle.parts.blocks[0]
    assert all(p.grad is None and not p.requires_grad for p in frozen_block.parameters())
    handle.remove()
