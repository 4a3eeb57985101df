"""Fast checks of `bench serve`'s arithmetic and options: the workload FLOPs, the
compute-bound fraction, `--scenarios` parsing, the systems' order, the ratios, the KV
scenarios' prompts and cache size."""

from __future__ import annotations

import argparse

import pytest

from loraquilt.bench.flops import FlopModel, RequestWork, compute_bound_fraction, workload_flops
from loraquilt.bench.serve import add_arguments, parse_scenarios
from loraquilt.bench.serve_report import ratios
from loraquilt.bench.serve_kv import counter_total, kv_cache_mb
from loraquilt.bench.serve_scenarios import OTHER, SCENARIOS, THROUGHPUT, median_run
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, PEFT, PEFT_DEFAULT, Systems
from loraquilt.bench.workload import ALL_PROJECTIONS, make_bounded_prompts, make_prefix_prompts

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
    assert parser.parse_args(["--json", "x.json"]).no_peft is False
    assert parser.parse_args(["--json", "x.json", "--no-peft"]).no_peft is True


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


def test_ratios_of_the_kv_scenarios():
    scenarios = {
        "prefix": {LQ: {"cache_on": {"ttft_p50_ms": 50.0, "tokens_per_s": 30.0},
                        "cache_off": {"ttft_p50_ms": 200.0, "tokens_per_s": 20.0}}},
        "high_concurrency": {LQ: {"tokens_per_s": 90.0, "slots32_tokens_per_s": 30.0}},
    }
    got = ratios(scenarios)
    assert got["prefix_ttft_p50_on_over_off"] == 0.25
    assert got["prefix_tokens_per_s_on_over_off"] == 1.5
    assert got["high_concurrency_over_slots32"] == 3
    empty = ratios({})
    assert empty["prefix_ttft_p50_on_over_off"] is None and empty["high_concurrency_over_slots32"] is None


def test_ratios_of_the_logprob_scenarios():
    scenarios = {"echo": {LQ: {"wall_s": 2.4, "prefill_wall_s": 2.0, "echo_over_prefill": 1.2}},
                 "logprobs": {LQ: {"tokens_per_s": 45.0, "plain_tokens_per_s": 50.0, "logprobs_over_plain": 0.9}}}
    got = ratios(scenarios)
    assert got["echo_over_prefill"] == pytest.approx(1.2) and got["logprobs_over_plain"] == pytest.approx(0.9)
    assert ratios({})["echo_over_prefill"] is None and ratios({})["logprobs_over_plain"] is None
    for name in ("echo", "logprobs"):
        assert name in OTHER and name not in THROUGHPUT and name in SCENARIOS


def test_kv_scenarios_are_other_scenarios_by_default():
    for name in ("prefix", "high_concurrency"):
        assert name in OTHER and name not in THROUGHPUT and name in SCENARIOS
    assert parse_scenarios("high_concurrency,prefix") == ("prefix", "high_concurrency")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from fixtures_models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_prefix_prompts_share_one_prefix_per_adapter_and_have_unique_tails(tokenizer):
    prompts = make_prefix_prompts(tokenizer, 12, 4, prefix_tokens=48, tail_tokens=(6, 14), seed=3)
    assert [p.adapter for p in prompts] == [i % 4 for i in range(12)]  # round robin
    prefixes = {p.adapter: p.prefix for p in prompts}
    assert len(set(prefixes.values())) == 4  # one prefix per adapter, different per adapter
    for p in prompts:
        assert p.prefix == prefixes[p.adapter] and p.prompt.startswith(p.prefix + " ")
        prefix_ids, prompt_ids = _ids(tokenizer, p.prefix), _ids(tokenizer, p.prompt)
        assert len(prefix_ids) == 48
        assert prompt_ids[:len(prefix_ids)] == prefix_ids  # the prefix's tokens start the prompt's
        assert 6 <= len(prompt_ids) - len(prefix_ids) <= 14
    tails = [p.prompt[len(p.prefix):] for p in prompts]
    assert len(set(tails)) == len(tails)
    again = make_prefix_prompts(tokenizer, 12, 4, prefix_tokens=48, tail_tokens=(6, 14), seed=3)
    assert again == prompts  # seeded
    other = make_prefix_prompts(tokenizer, 12, 4, prefix_tokens=48, tail_tokens=(6, 14), seed=4)
    assert {p.prefix for p in other}.isdisjoint(prefixes.values())


def test_bounded_prompts_stay_within_their_token_range(tokenizer):
    prompts = make_bounded_prompts(tokenizer, 20, seed=1, min_tokens=10, max_tokens=16)
    assert all(10 <= len(_ids(tokenizer, p)) <= 16 for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_kv_cache_mb_is_32_sequences_of_1024_float32_positions(tmp_path):
    import json

    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 576 / 9 = 64
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True}))
    assert kv_cache_mb(tmp_path, 32, 1024) == pytest.approx(32 * 1024 * 2 * 30 * 3 * 64 * 4 / 2**20)


def test_counter_total_sums_label_sets_and_knows_missing_metrics():
    samples = {("loraquilt_prefix_cache_hits_total", (("kind", "a"),)): 3.0,
               ("loraquilt_prefix_cache_hits_total", (("kind", "b"),)): 4.0,
               ("loraquilt_preemptions_created", ()): 1e9}
    assert counter_total(samples, "loraquilt_prefix_cache_hits_total") == 7.0
    assert counter_total(samples, "loraquilt_preemptions_total") is None
