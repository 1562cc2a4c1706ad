import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct in fp32 (prepared once into the cache)."""
    from freezekern import load_default_model

    return load_default_model()
