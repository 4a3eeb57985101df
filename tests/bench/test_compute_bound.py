"""The GEMM rate `compute_bound_fraction` is taken against: the model's own weight shapes at
the decode batch's rows, in the system's dtype, named in the results."""

from __future__ import annotations

import pytest
import torch

from loraquilt.bench.flops import FlopModel
from loraquilt.bench.machine import gemm_mix_gflops
from loraquilt.bench.serve_report import add_compute_bound, compute_bound_rate
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, PEFT
from loraquilt.server.model.synthetic import SIZES

# synthetic:1b: hidden 2048, 32 heads / 8 KV heads of 64, intermediate 5632, 22 layers, vocab 49152
SYN1B = FlopModel(
    num_layers=22,
    projection_shapes={"q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048),
                       "o_proj": (2048, 2048), "gate_proj": (5632, 2048), "up_proj": (5632, 2048),
                       "down_proj": (2048, 5632)},
    lm_head_params=49152 * 2048,
)


def test_token_gemms_cover_every_weight_once_per_token():
    gemms = SYN1B.token_gemms()
    assert sorted(gemms) == sorted([(2048, 2048, 44), (512, 2048, 44), (5632, 2048, 44), (2048, 5632, 22),
                                    (49152, 2048, 1)])
    assert sum(out * in_ * count for out, in_, count in gemms) == SYN1B.projection_params + SYN1B.lm_head_params
    # the synthetic model's own count: these weights plus the norms
    norms = 2048 * (2 * 22 + 1)
    assert SYN1B.projection_params + SYN1B.lm_head_params + norms == SIZES["1b"].num_parameters


def test_gemm_mix_rate_is_flop_weighted_harmonic_mean(monkeypatch):
    import loraquilt.bench.machine as machine

    rates = {(4, 64, 32): 10.0, (4, 32, 64): 40.0}
    monkeypatch.setattr(machine, "matmul_gflops", lambda m, k, n, **_: rates[(m, k, n)])
    # same flops per call; counts 3 and 1: time 3/10 + 1/40 per unit of flops -> 4 / 0.325
    rate, per_shape = gemm_mix_gflops(4, [(32, 64, 3), (64, 32, 1)])
    assert rate == pytest.approx(4 / (3 / 10 + 1 / 40))
    assert per_shape == {"4x64->32": 10.0, "4x32->64": 40.0}


def test_gemm_mix_measures_for_real():
    rate, per_shape = gemm_mix_gflops(4, [(64, 128, 2), (128, 64, 1)], torch.float32, budget_s=0.05)
    assert rate > 0 and set(per_shape) == {"4x128->64", "4x64->128"}


def test_rate_prefers_the_model_shapes_and_says_which():
    machine = {"fp32_matmul_gflops": 200.0, "bf16_matmul_gflops": 800.0,
               "model_gemm": {"fp32_gflops": 100.0, "bf16_gflops": 400.0}}
    assert compute_bound_rate(machine, "bf16") == ("model_gemm.bf16_gflops", 400.0)
    assert compute_bound_rate({"fp32_matmul_gflops": 200.0}, "fp32") == ("fp32_matmul_gflops", 200.0)


def test_fractions_per_system_dtype():
    machine = {"fp32_matmul_gflops": 200.0, "bf16_matmul_gflops": 800.0,
               "model_gemm": {"fp32_gflops": 100.0, "bf16_gflops": 400.0}}
    scenarios = {"base": {LQ: {"wall_s": 10.0}, PEFT: {"wall_s": 20.0}, LQ_AUTO: {"wall_s": 5.0}}}
    add_compute_bound(scenarios, SYN1B, [40] * 4, 8, machine, "bfloat16", None)
    lq, peft, auto = (scenarios["base"][system] for system in (LQ, PEFT, LQ_AUTO))
    flops = lq["workload_gflop"] * 1e9
    assert lq["compute_bound_rate"] == "model_gemm.fp32_gflops" and lq["compute_bound_rate_gflops"] == 100.0
    assert lq["compute_bound_fraction"] == pytest.approx(flops / (10.0 * 100e9))
    assert lq["compute_bound_fraction_square"] == pytest.approx(flops / (10.0 * 200e9))
    assert peft["compute_bound_fraction"] == pytest.approx(flops / (20.0 * 100e9))
    assert auto["compute_bound_rate"] == "model_gemm.bf16_gflops"
    assert auto["compute_bound_fraction"] == pytest.approx(flops / (5.0 * 400e9))
