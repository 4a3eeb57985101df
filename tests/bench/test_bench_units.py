"""Fast checks of `bench serve`'s arithmetic and options: the workload FLOPs, the
compute-bound fraction, `--scenarios` parsing, the systems' order and the ratios."""

from __future__ import annotations

import argparse

import pytest

from loraquilt.bench.flops import FlopModel, RequestWork, compute_bound_fraction, workload_flops
from loraquilt.bench.serve import add_arguments, parse_scenarios
from loraquilt.bench.serve_report import ratios
from loraquilt.bench.serve_scenarios import SCENARIOS, median_run
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, PEFT, PEFT_DEFAULT, Systems
from loraquilt.bench.workload import ALL_PROJECTIONS

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, 30 layers, vocab 49152
SMOL = FlopModel(
    num_layers=30,
    projection_shapes={"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                       "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)},
    lm_head_params=49152 * 576,
)


def test_projection_params_of_smollm2():
    assert SMOL.projection_params == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576) == 106_168_320


def test_base_request_counts_fed_tokens_and_logit_rows():
    # 10 prompt tokens + 4 generated: 13 tokens fed (the last token is never fed back), 4 lm_head rows
    flops = workload_flops(SMOL, [RequestWork(prompt_tokens=10, generated_tokens=4)])
    assert flops == 2 * SMOL.projection_params * 13 + 2 * SMOL.lm_head_params * 4


def test_lora_flops_per_token_and_per_request():
    # heavy: rank 16 on all seven projections; per layer sum of 2 * 16 * (in + out)
    per_layer = sum(2 * 16 * (out + in_) for out, in_ in SMOL.projection_shapes.values())
    assert SMOL.lora_flops_per_token(16, ALL_PROJECTIONS) == 30 * per_layer == 9_768_960
    # recipe: rank 8 on q and v
    assert SMOL.lora_flops_per_token(8, ("q_proj", "v_proj")) == 30 * (2 * 8 * 1152 + 2 * 8 * 768)
    base = workload_flops(SMOL, [RequestWork(10, 4)])
    heavy = workload_flops(SMOL, [RequestWork(10, 4, "heavy")])
    assert heavy - base == 13 * 9_768_960
    # the bench workload (32 prompts of ~40 tokens, 32 new each) is about 550 GFLOP
    assert 500e9 < workload_flops(SMOL, [RequestWork(40, 32)] * 32) < 600e9


def test_compute_bound_fraction():
    assert compute_bound_fraction(100e9, 2.0, 100.0) == pytest.approx(0.5)
    assert compute_bound_fraction(1e9, 0.0, 100.0) is None
    assert compute_bound_fraction(1e9, 1.0, None) is None


def test_parse_scenarios_keeps_the_bench_order():
    assert parse_scenarios("latency,base, distinct") == ("distinct", "base", "latency")
    assert parse_scenarios(",".join(SCENARIOS)) == SCENARIOS


def test_unknown_scenario_is_an_argparse_error_listing_the_valid_ones(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--json", "x.json", "--scenarios", "base,bogus"])
    err = capsys.readouterr().err
    assert "bogus" in err and all(name in err for name in SCENARIOS)
    args = parser.parse_args(["--json", "x.json", "--scenarios", "accuracy"])
    assert args.scenarios == ("accuracy",)
    assert parser.parse_args(["--json", "x.json"]).scenarios == SCENARIOS


def test_systems_order_alternates_pairs_and_skips_a_shared_auto_server():
    server, peer = object(), object()
    both = Systems(servers={LQ: server, LQ_AUTO: object()}, peers={PEFT: peer, PEFT_DEFAULT: object()})
    assert both.measured == [LQ, PEFT, LQ_AUTO, PEFT_DEFAULT]
    shared = Systems(servers={LQ: server, LQ_AUTO: server}, peers={PEFT: peer, PEFT_DEFAULT: object()},
                     auto_shared=True)
    assert shared.measured == [LQ, PEFT, PEFT_DEFAULT]
    assert shared.distinct_servers() == [LQ]


class _Run:
    def __init__(self, tps):
        self.tokens_per_s = tps


def test_median_run_reports_runs_in_order():
    best, runs = median_run([_Run(3.0), _Run(1.0), _Run(2.0)])
    assert best.tokens_per_s == 2.0 and runs == [3.0, 1.0, 2.0]


def test_ratios_of_both_pairs():
    def entry(tps):
        return {"tokens_per_s": tps}

    scenarios = {
        "distinct": {LQ: entry(100), PEFT: entry(10), LQ_AUTO: entry(200), PEFT_DEFAULT: entry(40)},
        "base": {LQ: entry(120), PEFT: entry(50), LQ_AUTO: entry(240), PEFT_DEFAULT: entry(80)},
        "same": {LQ: entry(110), PEFT: entry(40), LQ_AUTO: entry(220), PEFT_DEFAULT: entry(55)},
        "hotload": {LQ: {"p50_ms": 30.0, "warm_ttft_p50_ms": 10.0}},
        "latency": {LQ: {"50pct": {"itl_p50_ms": 20.0, "itl_p99_ms": 50.0}}},
    }
    got = ratios(scenarios)
    assert got["distinct_vs_peft_distinct"] == 10
    assert got["auto_distinct_vs_peft_default_distinct"] == 5
    assert got["auto_distinct_vs_peft_default_base"] == 2.5
    assert got["auto_base_vs_peft_default_base"] == 3
    assert got["auto_same_vs_peft_default_same"] == 4
    assert got["auto_same_over_base"] == pytest.approx(220 / 240)
    assert got["hotload_over_warm_ttft"] == 3
    assert got["latency_50pct_itl_p99_over_p50"] == 2.5
    assert got["many_over_distinct"] is None
