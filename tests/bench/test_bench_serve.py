"""`loraquilt bench serve --quick`: runs end to end, writes the contracted JSON keys (both
pairs of systems, the KV-cache and the log-probability scenarios), and the exact pair
produces the same greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

THROUGHPUT = ("distinct", "same", "base", "recipe_distinct", "recipe_same")


def _fraction(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def check_kv_scenarios(results: dict) -> None:
    """The `prefix` and `high_concurrency` keys: figures, their runs, the ratios."""
    prefix = results["scenarios"]["prefix"]["loraquilt"]
    for label in ("cache_on", "cache_off"):
        entry = prefix[label]
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tokens_per_s"):
            assert _positive(entry[key]), (label, key)
        assert entry["runs"] and all(_positive(run["tokens_per_s"]) for run in entry["runs"]), label
        assert entry["served_dtype"] == "float32"
        assert {"prefix_cache_hit_tokens", "prefix_cache_query_tokens"} <= set(entry)
    assert prefix["adapters"] == ["heavy-0", "heavy-1", "heavy-2", "heavy-3"]
    assert prefix["dtype"] == "float32" and _positive(prefix["requests"])
    assert all(n > prefix["prefix_tokens"] for n in prefix["prompt_tokens_first_round"])
    crowd = results["scenarios"]["high_concurrency"]["loraquilt"]
    for key in ("tokens_per_s", "slots32_tokens_per_s", "kv_cache_mb", "requests"):
        assert _positive(crowd[key]), key
    assert crowd["paged"]["max_batch_size"] >= crowd["requests"] and crowd["slots32"]["max_batch_size"] == 32
    assert crowd["max_request_tokens"] <= 128 and crowd["adapters"]
    assert crowd["paged"]["runs"] and crowd["slots32"]["runs"]
    for key in ("prefix_ttft_p50_on_over_off", "prefix_tokens_per_s_on_over_off", "high_concurrency_over_slots32"):
        assert _positive(results["ratios"][key]), key


@pytest.mark.slow  # 40-90 s on 2 shared cores: four servers started and run
def test_quick_kv_scenarios(tmp_path):
    """`--scenarios prefix,high_concurrency`: only their servers, only their keys."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--scenarios", "prefix,high_concurrency",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prefix ttft p50 ms on/off" in done.stdout and "high_concurrency tok/s" in done.stdout
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"prefix", "high_concurrency"}
    check_kv_scenarios(results)


def check_logprob_scenarios(results: dict) -> None:
    """The `echo` and `logprobs` keys: both kinds of run, their medians, the ratios."""
    echo = results["scenarios"]["echo"]["loraquilt"]
    assert echo["served_dtype"] == "float32" and echo["prefix_cache"] is False
    assert echo["prompt_tokens"] == [32, 32] and echo["prompts"] == 8  # --quick
    assert echo["echo"]["runs"] and echo["prefill"]["runs"] and echo["echo"]["generated_tokens"] == 0
    assert echo["echo"]["logprob_entries"] == 8 * 32 and echo["prefill"]["generated_tokens"] == 8
    scored = results["scenarios"]["logprobs"]["loraquilt"]
    assert scored["logprobs"]["generated_tokens"] == scored["plain"]["generated_tokens"] > 0
    assert scored["logprobs"]["logprob_entries"] == scored["logprobs"]["generated_tokens"]
    for key in ("echo_over_prefill", "logprobs_over_plain"):
        assert _positive(results["ratios"][key]), key


@pytest.mark.slow  # ~30 s on 2 shared cores: one server
def test_quick_logprob_scenarios(tmp_path):
    """`--scenarios echo,logprobs`: one server, only their keys."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--scenarios", "echo,logprobs",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "echo wall s echo/prefill" in done.stdout and "logprobs 5 tok/s" in done.stdout
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"echo", "logprobs"}
    check_logprob_scenarios(results)


def check_kind_scenarios(results: dict) -> None:
    """The `merge`, `dora` and `alora` keys: figures, runs, the ratios."""
    merge = results["scenarios"]["merge"]["loraquilt"]
    for key in ("first_request_s", "build_s", "second_request_s", "tokens_per_s", "single_tokens_per_s",
                "merge_over_single"):
        assert _positive(merge[key]), key
    assert merge["method"] == "ties" and merge["members"] == 3 and len(merge["merge_over_single_rounds"]) >= 1
    dora = results["scenarios"]["dora"]["loraquilt"]
    for key in ("tokens_per_s", "plain_tokens_per_s", "dora_over_plain"):
        assert _positive(dora[key]), key
    alora = results["scenarios"]["alora"]["loraquilt"]
    assert set(alora["ttft_ms"]) == {"alora", "base", "plain"}
    assert all(len(values) == alora["turns"] * alora["conversations"] for values in alora["ttft_ms"].values())
    assert all(_positive(value) for values in alora["ttft_ms"].values() for value in values)
    for key in ("merge_over_single", "dora_over_plain", "alora_over_base_ttft", "plain_over_alora_ttft"):
        assert _positive(results["ratios"][key]), key


@pytest.mark.slow  # ~60 s on 2 shared cores: five servers, one scenario at a time
def test_quick_kind_scenarios(tmp_path):
    """`--scenarios merge,dora,alora`: servers of their own, only their keys."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--scenarios", "merge,dora,alora",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merge ties tok/s" in done.stdout and "alora ttft p50" in done.stdout
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"merge", "dora", "alora"}
    check_kind_scenarios(results)


@pytest.mark.slow
def test_quick_bench_serve(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[bench" in done.stderr  # progress lines
    assert "loraquilt_auto" in done.stdout and "peft_default" in done.stdout  # the table's new columns
    results = json.loads(out.read_text())
    scenarios, settings = results["scenarios"], results["settings"]
    for name in THROUGHPUT:
        for system in ("loraquilt", "peft", "loraquilt_auto", "peft_default"):
            entry = scenarios[name][system]
            assert entry["tokens_per_s"] > 0, (name, system)
            assert entry["runs_tokens_per_s"] and all(v > 0 for v in entry["runs_tokens_per_s"]), (name, system)
        for system in ("loraquilt", "loraquilt_auto"):
            assert _fraction(scenarios[name][system]["compute_bound_fraction"]), (name, system)
    assert scenarios["sequential"]["peft"]["tokens_per_s"] > 0
    assert scenarios["many"]["loraquilt"]["tokens_per_s"] > 0
    assert scenarios["many"]["loraquilt_auto"]["tokens_per_s"] > 0
    for system in ("loraquilt", "peft", "loraquilt_auto"):
        assert scenarios["hotload"][system]["p50_ms"] > 0
    assert scenarios["hotload"]["loraquilt"]["warm_ttft_p50_ms"] > 0
    for system in ("loraquilt", "loraquilt_auto"):
        for label in ("50pct", "80pct"):
            stats = scenarios["latency"][system][label]
            assert {"ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"} <= set(stats)
    machine = results["machine"]
    for key in ("memory_bandwidth_gb_s", "fp32_matmul_gflops", "fp32_matmul_gflops_decode",
                "bf16_matmul_gflops", "bf16_matmul_gflops_decode"):
        assert machine[key] > 0, key
    for name in THROUGHPUT:
        assert results["identical_greedy_fraction"][name] == 1.0, name
        assert _fraction(results["identical_greedy_fraction_auto"][name]), name
    assert settings["auto_dtype"] in ("bfloat16", "float32") and settings["auto_dtype_reason"]
    assert settings["auto_same_as_float32"] == (settings["auto_dtype"] == "float32")
    assert settings["served_dtypes"]["loraquilt"] == "float32"
    assert settings["peer_dtypes"]["peft"]["model_dtype"] == "float32"
    accuracy = results["accuracy"]["bf16_vs_fp32"]
    assert accuracy["prompts"] > 0 and _fraction(accuracy["top1_agreement"])
    assert 0 <= accuracy["max_abs_logit_diff"] < float("inf")
    ratios = results["ratios"]
    for key in ("distinct_vs_peft_distinct", "base_vs_peft_base", "auto_base_vs_peft_default_base",
                "auto_same_vs_peft_default_same", "auto_distinct_vs_peft_default_distinct",
                "auto_distinct_vs_peft_default_base", "auto_same_over_base", "hotload_over_warm_ttft",
                "latency_50pct_itl_p99_over_p50"):
        assert ratios[key] is not None and ratios[key] > 0, key
    assert results["versions"]["torch"] and settings["batch"] > 0
    check_kv_scenarios(results)
    check_logprob_scenarios(results)
    check_kind_scenarios(results)


@pytest.mark.slow
def test_scenarios_subset_runs_only_those(tmp_path):
    """`--scenarios base,accuracy`: both pairs on `base`, the logits check, nothing else."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--scenarios", "base,accuracy",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"base"}
    assert results["scenarios"]["base"]["loraquilt"]["tokens_per_s"] > 0
    assert results["scenarios"]["base"]["peft_default"]["tokens_per_s"] > 0
    assert results["identical_greedy_fraction"] == {"base": 1.0}
    assert results["accuracy"]["bf16_vs_fp32"]["prompts"] > 0
