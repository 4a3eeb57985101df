"""Fixtures of the adapter registry's tests: a tiny Llama's shapes, two LoRA slots, a
registry holding two adapters on host, and `make(name, targets, r)` for PEFT folders."""

from __future__ import annotations

from itertools import count

import pytest
import torch
from fixtures_registry import MAX_RANK, QV, EventLog, write_adapter
from transformers import LlamaConfig

from loraquilt.server.adapters.registry import AdapterRegistry
from loraquilt.server.adapters.slots import LoraSlots, SlotConfig
from loraquilt.server.model.config import ModelConfig, model_config_from_hf


@pytest.fixture(scope="module")
def model() -> ModelConfig:
    return model_config_from_hf(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))


@pytest.fixture
def slots(model) -> LoraSlots:
    return LoraSlots(model, SlotConfig(num_slots=2, max_rank=MAX_RANK, backend="torch"),
                     torch.float32, torch.device("cpu"))


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
def registry(model, slots, log) -> AdapterRegistry:
    return AdapterRegistry(model, slots, max_cpu_adapters=2, events=log.events())


@pytest.fixture
def make(tmp_path, model):
    """make(name, targets, r) writes a valid PEFT LoRA folder with its own random weights."""
    seeds = count()
    return lambda name, targets=QV, r=4: write_adapter(tmp_path / name, model, next(seeds), targets, r)
