"""`bench serve --peers`: option parsing, skip reporting, the request/answer mapping of each
peer engine (against stand-ins of vLLM and llama-server in tests/bench/fake_peers), the
GGUF conversion commands and caching, and the ratio keys. The real engines run in the slow
test at the end, where they are installed (README: peers)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraquilt.bench.peers import ENGINES, LLAMACPP, LLAMACPP_Q4, VLLM
from loraquilt.bench.peers.engines import NO_THROUGHPUT, EngineSet, adapters_for, start_engines
from loraquilt.bench.peers.gguf_convert import (ConvertTools, base_command, convert, lora_args, lora_batch_command,
                                                quantize_command)
from loraquilt.bench.peers.llamacpp_peer import (LlamaServerPeer, LlamaServerSettings, answer_tokens,
                                                 completion_body, server_command)
from loraquilt.bench.peers.options import PeerOptions, parse_peers
from loraquilt.bench.peers.processes import EngineUnavailable, free_port, make_run
from loraquilt.bench.peers.report import engine_ratios, print_engine_table
from loraquilt.bench.peers.vllm_peer import (VllmPeer, VllmSettings, driver_config, driver_env, generate_request,
                                             run_from_reply)
from loraquilt.bench.serve import add_arguments
from loraquilt.bench.serve_report import print_table, ratios
from loraquilt.bench.serve_scenarios import run_plot, run_throughput
from loraquilt.bench.serve_systems import LQ, LQ_AUTO, ORDER, PEFT, Systems

FAKES = Path(__file__).parent / "fake_peers"


def _quiet(message: str) -> None:
    pass


def _wrapper(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


# --- options --------------------------------------------------------------------------

def test_parse_peers_expands_llamacpp_to_both_ggufs_in_measuring_order():
    assert parse_peers("llamacpp,vllm") == (VLLM, LLAMACPP, LLAMACPP_Q4)
    assert parse_peers("llamacpp_q4") == (LLAMACPP_Q4,)
    with pytest.raises(argparse.ArgumentTypeError, match="bogus"):
        parse_peers("vllm,bogus")


def test_bench_flags_build_peer_options_with_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = PeerOptions.from_args(parser.parse_args(
        ["--json", "x", "--peers", "vllm,llamacpp", "--vllm-python", "/v/bin/python",
         "--llama-server", "/l/bin/llama-server", "--llama-cpp-dir", "/l/src"]))
    assert options.engines == ENGINES
    assert options.vllm_python == Path("/v/bin/python") and options.llama_cpp_dir == Path("/l/src")
    assert options.quantize_binary == Path("/l/bin/llama-quantize")  # beside llama-server
    assert options.q4_type == PeerOptions().q4_type
    assert PeerOptions.from_args(parser.parse_args(["--json", "x"])) == PeerOptions()


def test_peer_options_refuse_what_is_not_4_bit_naming_the_field():
    with pytest.raises(ValueError, match="q4_type"):
        PeerOptions(q4_type="Q8_0")
    with pytest.raises(ValueError, match="engines"):
        PeerOptions(engines=("tgi",))


# --- skips ----------------------------------------------------------------------------

def test_missing_flags_and_programs_are_skipped_with_their_reason(tmp_path):
    engines = start_engines(PeerOptions(engines=ENGINES), tmp_path, {}, tmp_path / "w", 4, _quiet)
    assert not engines.running
    assert "--vllm-python not given" in engines.skipped[VLLM]
    assert "--llama-server not given" in engines.skipped[LLAMACPP] == engines.skipped[LLAMACPP_Q4]
    missing = PeerOptions(engines=ENGINES, vllm_python=tmp_path / "nope" / "python",
                          llama_server=tmp_path / "nope" / "llama-server", llama_cpp_dir=tmp_path)
    engines = start_engines(missing, tmp_path, {}, tmp_path / "w", 4, _quiet)
    assert "does not exist" in engines.skipped[VLLM] and "does not exist" in engines.skipped[LLAMACPP]
    no_tree = PeerOptions(engines=(LLAMACPP,), llama_server=Path(sys.executable))
    assert "--llama-cpp-dir not given" in start_engines(no_tree, tmp_path, {}, tmp_path, 4, _quiet).skipped[LLAMACPP]


def test_skips_land_in_every_throughput_scenario_and_in_peer_engines(tmp_path):
    engines = start_engines(PeerOptions(engines=(VLLM,)), tmp_path, {}, tmp_path, 4, _quiet)
    scenarios = {"base": {LQ: {"tokens_per_s": 10.0}}, "same": {}}
    engines.record_skipped(scenarios, ["base", "same"])
    assert scenarios["base"][VLLM] == scenarios["same"][VLLM] == {"skipped": engines.skipped[VLLM]}
    assert engines.describe(100, scenarios) == {VLLM: {"skipped": engines.skipped[VLLM]}}
    assert ratios(scenarios).get("base", {}) == {}  # a skipped engine has no ratio


def test_no_throughput_scenario_skips_every_engine_without_starting_one(tmp_path):
    options = PeerOptions(engines=ENGINES, vllm_python=Path(sys.executable))
    engines = start_engines(options, tmp_path, {}, tmp_path, 4, _quiet, throughput=False)
    assert engines.skipped == {engine: NO_THROUGHPUT for engine in ENGINES} and not engines.running


def test_adapters_for_keeps_only_what_the_runs_use_in_folder_order(tmp_path):
    folders = {name: tmp_path / name for name in ("heavy-0", "heavy-1", "recipe-0")}
    assert list(adapters_for([[None, None], ["heavy-1", "heavy-0"]], folders)) == ["heavy-0", "heavy-1"]
    assert adapters_for([[None]], folders) == {}


# --- vLLM -----------------------------------------------------------------------------

def test_vllm_request_and_answer_mapping():
    request = generate_request(["a b", "c"], [None, "recipe-0"], ["heavy-0", "recipe-0"], 5)
    assert request == {"op": "generate", "prompts": ["a b", "c"], "new_tokens": 5, "adapters": [None, 1]}
    run = run_from_reply({"wall_s": 2.0, "token_ids": [[1] * 5, [2] * 5], "prompt_tokens": [2, 1]})
    assert (run.tokens_per_s, run.generated_tokens, run.prompt_tokens) == (5.0, 10, 3)
    with pytest.raises(RuntimeError, match="boom"):
        run_from_reply({"error": "boom"})


def test_vllm_llm_keywords_and_environment(tmp_path):
    llm = driver_config(Path("/m"), {"heavy-0": Path("/a/heavy-0")}, VllmSettings(max_loras=1, max_num_seqs=8))
    assert llm["adapters"] == [["heavy-0", "/a/heavy-0"]]
    assert llm["llm"] == {"max_loras": 1, "max_num_seqs": 8, "max_lora_rank": 16, "max_model_len": 256,
                          "dtype": "bfloat16", "enable_lora": True, "seed": 0}
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "lib").mkdir()
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    env = driver_env(tmp_path / "venv" / "bin" / "python", 3, cores=2, base={"PYTHONPATH": "/x", "HOME": "/h"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["LD_PRELOAD"].endswith(str(tmp_path / "venv" / "lib" / "libiomp5.so"))
    assert "PYTHONPATH" not in env and env["HOME"] == "/h"
    with pytest.raises(ValueError):
        VllmSettings(max_loras=0, max_num_seqs=1)


def _fake_vllm_python(tmp_path: Path) -> Path:
    return _wrapper(tmp_path, "vllm-python", f'PYTHONPATH={FAKES} exec {sys.executable} "$@"')


def test_vllm_peer_drives_the_driver_over_its_protocol(tmp_path):
    adapters = {"heavy-0": tmp_path / "heavy-0", "heavy-1": tmp_path / "heavy-1"}
    peer = VllmPeer(_fake_vllm_python(tmp_path), tmp_path, adapters, VllmSettings(max_loras=2, max_num_seqs=3),
                    tmp_path / "vllm", 2, _quiet)
    try:
        run = peer.throughput(["a b c", "d", "e f"], [None, "heavy-1", "heavy-0"], 4)
        assert run.token_ids == [[0] * 4, [2] * 4, [1] * 4]  # LoRA int ids are index + 1
        assert run.generated_tokens == 12 and run.prompt_tokens == 6 and run.wall_s > 0
        base = peer.throughput(["a"], [None], 2)
        assert base.token_ids == [[0, 0]]
        assert peer.describe()["versions"]["vllm"] == "0.0-fake"
        assert "fake vLLM loading" in (tmp_path / "vllm" / "vllm.log").read_text()  # chatter went to the log
    finally:
        peer.stop()
    assert peer.process.poll() is not None


def test_vllm_that_cannot_start_is_unavailable_with_its_error(tmp_path):
    no_vllm = _wrapper(tmp_path, "plain-python", f'exec {sys.executable} "$@"')
    with pytest.raises(EngineUnavailable, match="ModuleNotFoundError"):
        VllmPeer(no_vllm, tmp_path, {}, VllmSettings(max_loras=1, max_num_seqs=1), tmp_path / "v", 2, _quiet)
    refused = VllmSettings(max_loras=1, max_num_seqs=1, max_model_len=-1)
    with pytest.raises(EngineUnavailable, match="refused max_model_len"):
        VllmPeer(_fake_vllm_python(tmp_path), tmp_path, {}, refused, tmp_path / "v2", 2, _quiet)


# --- llama.cpp ------------------------------------------------------------------------

def test_llama_server_command_and_request_body():
    settings = LlamaServerSettings(parallel=8, threads=2)
    command = server_command(Path("/b/llama-server"), Path("/g/base.gguf"), [Path("/g/a.gguf"), Path("/g/b.gguf")],
                             9000, settings)
    assert command[:3] == ["/b/llama-server", "-m", "/g/base.gguf"]
    assert command[command.index("--lora") + 1] == "/g/a.gguf,/g/b.gguf"  # comma separated, one --lora
    assert command.count("--lora") == 1 and "--lora-init-without-apply" in command
    assert command[command.index("--parallel") + 1] == "8" and command[command.index("-c") + 1] == str(8 * 256)
    assert "--lora" not in server_command(Path("s"), Path("m"), [], 1, settings)
    body = completion_body("hello world", 3, 7)
    assert body == {"prompt": "hello world", "n_predict": 7, "ignore_eos": True, "temperature": 0.0,
                    "cache_prompt": False, "return_tokens": True, "lora": [{"id": 3, "scale": 1.0}]}
    assert completion_body("x", None, 1)["lora"] == []
    assert answer_tokens({"tokens": [5, 6], "tokens_predicted": 2, "tokens_evaluated": 9}) == ([5, 6], 9)
    with pytest.raises(RuntimeError):
        answer_tokens({"tokens": [], "tokens_predicted": 2})


def test_llama_server_peer_zeroes_every_scale_and_sends_one_adapter_per_request(tmp_path):
    binary = _wrapper(tmp_path, "llama-server", f'exec {sys.executable} {FAKES / "llama_server.py"} "$@"')
    model = tmp_path / "base.gguf"
    model.write_bytes(b"")
    loras = {"heavy-0": tmp_path / "heavy-0.gguf", "heavy-1": tmp_path / "heavy-1.gguf"}
    peer = LlamaServerPeer(binary, model, loras, LlamaServerSettings(parallel=3, threads=1), free_port(),
                           tmp_path / "server.log", _quiet)
    try:
        run = peer.throughput(["a b", "c", "d e f"], ["heavy-1", None, "heavy-0"], 5)
    finally:
        peer.stop()
    assert run.token_ids == [[2] * 5, [0] * 5, [1] * 5] and run.prompt_tokens == 6 and run.generated_tokens == 15
    sent = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert sent[0] == {"path": "/lora-adapters", "body": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]}
    assert sorted(json.dumps(s["body"]["lora"]) for s in sent[1:]) == sorted(
        json.dumps(x) for x in ([], [{"id": 0, "scale": 1.0}], [{"id": 1, "scale": 1.0}]))


def test_llama_server_killed_by_sigill_at_start_is_restarted_without_repacked_weights(tmp_path):
    # this build's AMX path for Q4_1 stops with SIGILL in a VM whose CPU lists AMX
    binary = _wrapper(tmp_path, "llama-server", f'''case "$*" in
  *--no-repack*) exec {sys.executable} {FAKES / "llama_server.py"} "$@" ;;
  *) kill -ILL $$ ;;
esac''')
    (tmp_path / "m.gguf").write_bytes(b"")
    peer = LlamaServerPeer(binary, tmp_path / "m.gguf", {}, LlamaServerSettings(parallel=1, threads=1), free_port(),
                           tmp_path / "server.log", _quiet)
    try:
        assert peer.throughput(["a"], [None], 2).token_ids == [[0, 0]]
        assert peer.command[-1] == "--no-repack" and "SIGILL" in peer.describe()["notes"][0]
    finally:
        peer.stop()


def test_llama_server_that_exits_is_unavailable_with_its_log(tmp_path):
    binary = _wrapper(tmp_path, "llama-server", 'echo "error: unknown argument" >&2; exit 1')
    with pytest.raises(EngineUnavailable, match="unknown argument"):
        LlamaServerPeer(binary, tmp_path / "m.gguf", {}, LlamaServerSettings(parallel=1, threads=1), free_port(),
                        tmp_path / "server.log", _quiet)


# --- GGUF conversion ------------------------------------------------------------------

def test_conversion_command_lines():
    tools = ConvertTools(Path("/c/python"), Path("/src"), Path("/b/llama-quantize"))
    assert base_command(tools, Path("/m"), Path("/o/base.gguf")) == [
        "/c/python", "/src/convert_hf_to_gguf.py", "/m", "--outtype", "bf16", "--outfile", "/o/base.gguf"]
    assert lora_args(Path("/m"), Path("/a/heavy-0"), Path("/o/heavy-0.gguf")) == [
        "--base", "/m", "--outtype", "f32", "--outfile", "/o/heavy-0.gguf", "/a/heavy-0"]
    command = lora_batch_command(tools, Path("/o/jobs.json"))
    assert command[0] == "/c/python" and command[1].endswith("gguf_batch.py")
    assert command[2:] == ["/src/convert_lora_to_gguf.py", "/o/jobs.json"]
    assert quantize_command(Path("/b/llama-quantize"), Path("/o/b.gguf"), Path("/o/q.gguf"), "Q4_1", 2) == [
        "/b/llama-quantize", "/o/b.gguf", "/o/q.gguf", "Q4_1", "2"]


def _model_and_adapters(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, Path]]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    adapters = {}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        adapters[name] = tmp_path / name
    return model, adapters


def test_convert_makes_base_q4_and_adapters_once_then_reuses_them(tmp_path, monkeypatch):
    runs = tmp_path / "runs.log"
    monkeypatch.setenv("FAKE_CONVERT_RUNS", str(runs))
    model, adapters = _model_and_adapters(tmp_path, ["heavy-0", "heavy-1", "recipe-0"])
    quantize = _wrapper(tmp_path, "llama-quantize", 'cp "$1" "$2"; echo "quant $4" >> "$FAKE_CONVERT_RUNS"')
    tools = ConvertTools(Path(sys.executable), FAKES / "llama_cpp", quantize)
    files = convert(tools, model, adapters, tmp_path / "out", q4_type="Q4_0", want_q4=True, threads=2, log=_quiet)
    assert list(files.loras) == list(adapters) and all(path.exists() for path in files.loras.values())
    assert files.base_bf16.name == "base-bf16.gguf" and files.base_q4.name == "base-Q4_0.gguf"
    assert files.q4_skipped is None
    assert "--outtype bf16" in files.base_bf16.read_text()
    kinds = [line.split()[0] for line in runs.read_text().splitlines()]
    assert kinds == ["base", "lora", "lora", "lora", "quant"]  # the adapters in one batch
    assert not list((tmp_path / "out").rglob("*.part"))
    convert(tools, model, adapters, tmp_path / "out", q4_type="Q4_0", want_q4=True, threads=2, log=_quiet)
    assert len(runs.read_text().splitlines()) == 5  # all reused


def test_convert_without_llama_quantize_skips_q4_and_a_failed_adapter_fails_the_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERT_RUNS", str(tmp_path / "runs.log"))
    model, adapters = _model_and_adapters(tmp_path, ["heavy-0"])
    tools = ConvertTools(Path(sys.executable), FAKES / "llama_cpp", tmp_path / "missing-quantize")
    files = convert(tools, model, adapters, tmp_path / "out", q4_type="Q4_1", want_q4=True, threads=2, log=_quiet)
    assert files.base_q4 is None and "llama-quantize" in files.q4_skipped
    (tmp_path / "other").mkdir()
    _, failing = _model_and_adapters(tmp_path / "other", ["fail-0"])  # the fake script fails on "fail" folders
    with pytest.raises(EngineUnavailable, match="convert_lora_to_gguf.py failed"):
        convert(tools, model, failing, tmp_path / "out", q4_type="Q4_1", want_q4=False, threads=2, log=_quiet)
    with pytest.raises(EngineUnavailable, match="does not exist"):
        ConvertTools(Path(sys.executable), tmp_path, None).check()


# --- in the bench: order, runs, ratios, table -------------------------------------------

class FakeEngine:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.calls: list[int] = []

    def throughput(self, prompts, adapters, new_tokens):
        self.calls.append(new_tokens)
        return make_run(0.5, [[0] * new_tokens for _ in prompts], 3 * len(prompts))

    def describe(self):
        return {"kind": "fake"}

    def stop(self):
        self.process.kill()
        self.process.wait()


def test_engines_run_after_the_loraquilt_systems_in_each_repeat_and_stay_out_of_the_plot():
    engine = FakeEngine()
    systems = Systems(peers={PEFT: object()}, engines={VLLM: engine})
    assert ORDER.index(VLLM) > ORDER.index(LQ_AUTO)
    assert systems.measured == [PEFT, VLLM] and systems.present == [PEFT, VLLM]
    try:
        vllm_only = Systems(engines={VLLM: engine})
        scenarios, tokens = {"same": {}}, {}
        run_throughput(vllm_only, ["same"], ["a", "b"], 4, 2, scenarios, tokens, _quiet)
        assert engine.calls == [2, 4, 4]  # warm-up on every request, then the repeats
        entry = scenarios["same"][VLLM]
        assert entry["tokens_per_s"] == 16.0 and entry["prompt_tokens"] == 6 and len(entry["runs_tokens_per_s"]) == 2
        assert run_plot(vllm_only, (1, 2), ["a", "b"], 4, scenarios, _quiet) == {}
        described = EngineSet(running={VLLM: engine}).describe(6, scenarios)[VLLM]
        assert described["prompt_tokens_match"] and described["idle_cpu_cores"] < 0.5
        assert EngineSet(running={VLLM: engine}).describe(7, scenarios)[VLLM]["prompt_tokens_match"] is False
    finally:
        vllm_only.stop()
    assert engine.process.poll() is not None and not vllm_only.engines


def test_ratio_keys_per_scenario_and_the_table(capsys):
    scenarios = {"distinct": {LQ: {"tokens_per_s": 40.0}, LQ_AUTO: {"tokens_per_s": 60.0},
                              VLLM: {"tokens_per_s": 30.0}, LLAMACPP: {"tokens_per_s": 20.0},
                              LLAMACPP_Q4: {"skipped": "no llama-quantize"}},
                 "base": {LQ_AUTO: {"tokens_per_s": 90.0}, VLLM: {"tokens_per_s": 45.0}}}
    assert engine_ratios(scenarios) == {
        "distinct": {"loraquilt_vs_vllm": 40 / 30, "loraquilt_vs_llamacpp": 2.0,
                     "loraquilt_auto_vs_vllm": 2.0, "loraquilt_auto_vs_llamacpp": 3.0},
        "base": {"loraquilt_auto_vs_vllm": 2.0}}
    all_ratios = ratios(scenarios)
    assert all_ratios["distinct"]["loraquilt_auto_vs_vllm"] == 2.0 and "distinct_vs_peft_distinct" in all_ratios
    results = {"scenarios": scenarios, "ratios": all_ratios, "settings": {"auto_dtype": "bfloat16",
                                                                         "auto_dtype_reason": "r"},
               "peer_engines": {VLLM: {"idle_cpu_cores": 0.0}, LLAMACPP_Q4: {"skipped": "no llama-quantize"}}}
    print_table(results)
    out = capsys.readouterr().out
    assert "auto/vllm" in out and "2.00x" in out and "llamacpp_q4 skipped: no llama-quantize" in out


# --- the real engines (installed as README: peers says) ---------------------------------

PEER_ENV = {"vllm_python": "LORAQUILT_VLLM_PYTHON", "llama_server": "LORAQUILT_LLAMA_SERVER",
            "llama_cpp_dir": "LORAQUILT_LLAMA_CPP_DIR", "convert_python": "LORAQUILT_CONVERT_PYTHON"}


@pytest.mark.slow  # ~5 min on 2 cores: vLLM start-up, GGUF conversion, three servers
def test_quick_bench_serve_with_the_real_peers(tmp_path):
    paths = {key: os.environ.get(var) for key, var in PEER_ENV.items()}
    if not all(paths.values()) or not all(Path(p).exists() for p in paths.values()):
        pytest.skip(f"set {', '.join(PEER_ENV.values())} to the installed peers (README: peers)")
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, "-m", "loraquilt", "bench", "serve", "--quick", "--scenarios", "base,same,distinct",
         "--peers", "vllm,llamacpp", "--vllm-python", paths["vllm_python"], "--llama-server", paths["llama_server"],
         "--llama-cpp-dir", paths["llama_cpp_dir"], "--convert-python", paths["convert_python"],
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("base", "same", "distinct"):
        for engine in ENGINES:
            entry = results["scenarios"][name][engine]
            assert entry["tokens_per_s"] > 0 and entry["generated_tokens"] == 8 * 8, (name, engine)
            assert results["ratios"][name][f"loraquilt_auto_vs_{engine}"] > 0
    for engine in ENGINES:
        assert results["peer_engines"][engine]["idle_cpu_cores"] < 0.2, engine
        assert results["peer_engines"][engine]["prompt_tokens_match"], engine
