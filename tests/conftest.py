"""Shared fixtures: tiny models per family, built from configs (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

from expertlens import ExpertModel  # noqa: E402
from expertlens.testing import DENSE_FAMILIES, MOE_FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

ALL_FAMILIES = MOE_FAMILIES + DENSE_FAMILIES
PRE_NORM_MOE = tuple(f for f in MOE_FAMILIES if f not in ("flex_olmo", "granitemoe", "minimax"))


def make_ids(batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (batch, pos), generator=gen)


@pytest.fixture(scope="module")
def wrapped():
    """``wrapped(family)`` -> ExpertModel of a fresh tiny model (cached per module)."""
    cache: dict = {}

    def get(family: str) -> ExpertModel:
        if family not in cache:
            cache[family] = ExpertModel(tiny_model(family), tiny_tokenizer())
        return cache[family]

    return get
