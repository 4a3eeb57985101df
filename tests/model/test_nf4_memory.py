"""NF4 weights cost the same in every compute dtype: one 4-bit copy (packed codes and
float32 block scales, about 0.56 bytes per parameter), no second copy for bf16."""

import pytest
import torch
from fixtures_models import build_tiny_model

from loraquilt.server.model.weights import DeviceConfig, load_causal_lm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = build_tiny_model(tmp_path_factory.mktemp("nf4_memory") / "llama", "llama", seed=4)
    return {dtype: load_causal_lm(base, DeviceConfig(device="cpu", dtype=dtype), progress=False)
            for dtype in ("float32", "bfloat16")}


def test_one_four_bit_copy_whatever_the_dtype(models):
    f32, bf16 = models["float32"], models["bfloat16"]
    assert (f32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    for model in (f32, bf16):
        assert model.quantized_params() > 0
        assert model.quantized_bytes() / model.quantized_params() <= 0.6, model.dtype
        for linear in model.quantized_linears():  # the packed codes are the 4-bit copy
            assert linear.weight.packed.dtype == torch.uint8
            assert linear.weight.packed.numel() * 2 == linear.num_params
    assert f32.quantized_params() == bf16.quantized_params()
    assert f32.quantized_bytes() == bf16.quantized_bytes()
