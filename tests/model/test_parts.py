"""Architecture discovery on a tiny random model of every supported family."""

import pytest
import torch
from torch import nn

from freezekern import discover, tiny_model
from freezekern.model.loading import TINY_FAMILIES
from freezekern.ops.reference import apply_norm

EXPECTED = {
    "llama": ("model.layers", "rms"), "mistral": ("model.layers", "rms"), "qwen2": ("model.layers", "rms"),
    "qwen3": ("model.layers", "rms"), "phi3": ("model.layers", "rms"), "gemma": ("model.layers", "rms"),
    "gemma2": ("model.layers", "rms"), "gemma3_text": ("model.layers", "rms"),
    "gpt2": ("transformer.h", "layer"), "gpt_neox": ("gpt_neox.layers", "layer"),
    "opt": ("model.decoder.layers", "layer"), "falcon": ("transformer.h", "layer"),
    "bloom": ("transformer.h", "layer"), "mpt": ("transformer.blocks", "layer"),
}
STRUCTURAL_NORMS = {"falcon": "transformer.ln_f", "bloom": "transformer.ln_f", "mpt": "transformer.norm_f"}


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_discover_family(family):
    model = tiny_model(family, num_layers=3)
    parts = discover(model)
    path, kind = EXPECTED[family]
    assert parts.blocks_path == path and parts.num_layers == 3
    assert parts.norm_kind == kind
    assert parts.head_weight.shape == (model.config.vocab_size, parts.final_norm.weight.shape[0])
    assert parts.tied == (model.get_input_embeddings().weight is model.get_output_embeddings().weight)
    # The adapter's description of the final norm reproduces the module itself.
    h = torch.randn(5, parts.head_weight.shape[1])
    with torch.no_grad():
        want = parts.final_norm(h)
    got = apply_norm(h, **parts.norm_kwargs())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    counts = parts.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    summary = parts.summary()
    assert summary["num_layers"] == 3 and summary["fingerprint"] == parts.fingerprint()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generic_fallback_finds_the_same_blocks(family, monkeypatch):
    from freezekern.model import parts as adapters

    model = tiny_model(family, num_layers=3)
    monkeypatch.setattr(adapters, "ARCHITECTURES", {})
    parts = discover(model)
    assert parts.blocks_path == EXPECTED[family][0]
    assert parts.final_norm is not None


@pytest.mark.parametrize("family", sorted(STRUCTURAL_NORMS))
def test_structural_fallback_takes_the_norm_after_the_blocks(family):
    """BLOOM registers word_embeddings_layernorm (applied before block 1) ahead of the blocks; ln_f follows them."""
    model = tiny_model(family, num_layers=3)
    parts = discover(model)
    assert parts.final_norm_path == STRUCTURAL_NORMS[family]
    ids = torch.randint(3, 200, (2, 9))
    seen = {}
    hook = parts.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple)
                                                                              else out))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    hook.remove()
    want = parts.lm_head(parts.final_norm(seen["h"]))  # the chosen norm is what the model applies before its head
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_models_are_refused():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=99)
    with pytest.raises(ValueError, match="encoder-decoder"):
        discover(AutoModelForSeq2SeqLM.from_config(config))


def test_overrides_and_errors():
    model = tiny_model("gpt2", num_layers=2)
    parts = discover(model, layers="transformer.h", final_norm=None)
    assert parts.norm_kind is None and parts.norm_kwargs()["norm"] is None
    with pytest.raises(ValueError, match="no module at 'transformer.blocks'"):
        discover(model, layers="transformer.blocks")
    with pytest.raises(ValueError, match="not a non-empty ModuleList"):
        discover(model, layers="transformer.ln_f")


def test_model_without_head_and_without_blocks():
    base = tiny_model("llama", num_layers=2).model
    with pytest.raises(ValueError, match="has no LM head"):
        discover(base)

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no decoder block list found on Flat"):
        discover(Flat())


def test_gemma_norm_weight_is_one_plus_w():
    model = tiny_model("gemma", num_layers=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    parts = discover(model)
    torch.testing.assert_close(parts.norm_kwargs()["norm_weight"], torch.full((64,), 1.5))
