import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
