from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import generate  # noqa: E402
from models import make_inputs, make_model  # noqa: E402


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A tiny Llama built from a config (one per test module)."""
    return make_model("llama")


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Two left-padded prompts."""
    return make_inputs(2)


@pytest.fixture(scope="module")
def expected(llama, inputs) -> torch.Tensor:
    """What ``llama`` generates greedily from ``inputs`` with transformers' own cache."""
    return generate(llama, inputs, "greedy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
