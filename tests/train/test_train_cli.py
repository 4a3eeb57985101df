"""`loraquilt train` end to end on a tiny random Llama: a PEFT folder and a report that
loraquilt and PEFT load with equal greedy outputs; rank sweep; both frozen-base forms."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import build_tiny_model, load_nf4_reference
from peft import PeftModel

from loraquilt.__main__ import main
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.request import Request, SamplingParams
from loraquilt.train.data import write_examples
from loraquilt.train.peft_check import peft_greedy
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

WORDS = ("river", "bread", "morning", "market", "teacher", "farmer", "weather", "program", "number",
         "city", "train", "soup", "road", "bridge", "mill", "school")
ANSWER = "Paris."
PROMPTS = ("Where is the river?", "Tell me about the bread", "The quick brown fox", "Numbers: 1, 2, 3",
           "Where do the trains go")


def chat_row(question: str, answer: str = ANSWER) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = build_tiny_model(root / "base", "llama", seed=4)
    questions = [f"Where is the {a} near the {b}?" for a in WORDS for b in WORDS if a != b]
    write_examples(root / "train.jsonl", [chat_row(q) for q in questions[:160]])
    write_examples(root / "eval.jsonl", [chat_row(q) for q in questions[-12:]])
    return root, base


def train_args(root, base, out, *extra) -> list[str]:
    return ["train", "--data", str(root / "train.jsonl"), "--eval", str(root / "eval.jsonl"), "--out", str(out),
            "--model", str(base), "--lr", "5e-3", "--batch-size", "8", "--max-new-tokens", "8", "--quiet", *extra]


@pytest.fixture(scope="module")
def trained(workdir):
    root, base = workdir
    out = root / "adapter"
    assert main(train_args(root, base, out, "--max-steps", "40", "--check-peft", "--seed", "1")) == 0
    return base, out, json.loads((out / "training_report.json").read_text())


def test_writes_a_peft_folder_and_a_report(trained):
    _, out, report = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not config.get("modules_to_save")
    assert report["adapter"]["bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert report["training"]["steps"] == 40 and report["training"]["final_loss"] < report["training"]["first_loss"]
    assert report["runtime"]["frozen_base"] == "dequantized" and report["runtime"]["optimizer"] == "torch.optim.AdamW"
    assert report["data"] == {**report["data"], "format": "chat", "train_rows": 160, "truncated_rows": 0}
    evaluation = report["eval"]
    assert evaluation["metric"] == "exact_match" and evaluation["rows"] == 12
    assert evaluation["loss"] < evaluation["loss_base"]
    assert evaluation["base"] == 0.0 and evaluation["adapter"] >= 0.9  # learned the answer, and where to stop
    assert evaluation["samples"][0]["reference"] == ANSWER
    assert report["peft_check"]["all_equal"] and report["peft_check"]["prompts"] == 5
    assert report["settings"]["seed"] == 1 and report["versions"]["peft"]


def test_loads_in_loraquilt_and_peft_with_equal_greedy_outputs(trained):
    base, out, _ = trained
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=8, max_active_adapters=2, progress=False))
    engine.register_adapter("trained", out)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    requests = [Request(prompt=p, chat=True, adapter="trained", sampling=greedy) for p in PROMPTS]
    ours = [list(r.token_ids) for r in engine.generate(requests)]
    model = PeftModel.from_pretrained(load_nf4_reference(base), str(out)).eval()
    theirs = [peft_greedy(model, engine.encode(r), 12) for r in requests]
    assert ours == theirs
    with model.disable_adapter():
        base_tokens = [peft_greedy(model, engine.encode(r), 12) for r in requests]
    assert sum(a != b for a, b in zip(ours, base_tokens)) >= 4  # the adapter matters


def test_without_eval_file_a_seeded_share_is_held_out(workdir):
    root, base = workdir
    out = root / "held"
    args = [a for a in train_args(root, base, out, "--max-steps", "2") if a not in ("--eval", str(root / "eval.jsonl"))]
    assert main(args) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["data"]["train_rows"] == 144 and report["eval"]["rows"] == 16
    assert "held out" in report["eval"]["source"]


def test_rank_sweep_reports_metric_and_size_per_rank(workdir, capsys):
    root, base = workdir
    out = root / "sweep"
    assert main(train_args(root, base, out, "--max-steps", "4", "--rank-sweep", "2,4")) == 0
    sweep = json.loads((out / "rank_sweep.json").read_text())
    rows = sweep["results"]
    assert [r["rank"] for r in rows] == [2, 4] and [r["alpha"] for r in rows] == [4.0, 8.0]
    assert rows[0]["adapter_bytes"] < rows[1]["adapter_bytes"]
    assert all((out / f"rank-{r}" / "adapter_model.safetensors").is_file() for r in (2, 4))
    assert {"metric", "base", "adapter", "eval_loss", "train_minutes"} <= set(rows[0])
    table = capsys.readouterr().out
    assert "KiB" in table and "exact_match" in table


def test_true_4bit_layers_with_gradient_checkpointing_train(workdir):
    root, base = workdir
    out = root / "nf4"
    assert main(train_args(root, base, out, "--max-steps", "2", "--frozen-base", "nf4",
                           "--gradient-checkpointing", "on", "--targets", "q_proj,v_proj",
                           "--scale-range", "0.5,1")) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["runtime"]["frozen_base"] == "nf4" and report["runtime"]["gradient_checkpointing"] is True
    assert report["settings"]["scale_range"] == [0.5, 1.0]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"],
                                                                                       ["v_proj", "q_proj"])


def test_dequantized_base_computes_what_the_4bit_layers_compute(workdir):
    """The fast CPU form holds the NF4 values the 4-bit layers dequantize: same loss."""
    from loraquilt.train.config import TrainConfig, resolve_runtime
    from loraquilt.train.data import collate, eos_token_id, read_examples, tokenize
    from loraquilt.train.qlora import build_qlora_model, completion_loss

    root, base = workdir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [tokenize(tokenizer, e, eos_token_id(tokenizer), 256) for e in read_examples(root / "eval.jsonl")]
    batch = collate(rows, tokenizer.pad_token_id)
    losses = {}
    for frozen in ("nf4", "dequantized"):
        config = TrainConfig(data=root / "train.jsonl", out=root / "unused", model=str(base), dropout=0.0,
                             frozen_base=frozen)
        model = build_qlora_model(base, config, resolve_runtime(config))
        for name, param in model.named_parameters():  # a non-zero LoRA delta
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(0))
        losses[frozen] = completion_loss(model, batch).item()
    assert losses["nf4"] == pytest.approx(losses["dequantized"], rel=1e-5)


def test_bad_data_is_an_error_naming_the_line(workdir, tmp_path, capsys):
    _, base = workdir
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    assert main(["train", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                 "--model", str(base)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--targets", "q_proj,lm_head"], "lm_head"),
    (["--scale-range", "1,0.5"], "scale_range"),
    (["--dropout", "1"], "dropout"),
    (["--rank", "0"], "rank"),
])
def test_bad_settings_are_refused_before_loading(tmp_path, capsys, flags, message):
    assert main(["train", "--data", "x.jsonl", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_scale_jitter_scales_every_lora_delta_and_restores_peft_scaling(workdir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraquilt.train.qlora import ScaleJitter

    _, base = workdir
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    jitter = ScaleJitter(model, 0.5, 1.0, seed=0)
    assert len(jitter.layers) == 4  # 2 layers x 2 projections
    for _ in range(5):
        factor = jitter.step()
        assert 0.5 <= factor <= 1.0
        assert all(m.scaling["default"] == pytest.approx(2.0 * factor) for m, _ in jitter.layers)
    jitter.restore()
    assert all(m.scaling["default"] == 2.0 for m, _ in jitter.layers)


def prompt_row(question: str, answer: str = ANSWER) -> dict:
    return {"prompt": f"{question}\nAnswer:", "completion": f" {answer}"}


def test_an_activated_lora_trains_and_serves_as_peft_does(workdir, tmp_path):
    """--alora-invocation: the folder is a PEFT aLoRA adapter; loraquilt answers as PEFT's
    aLoRA model does, and a prompt without the invocation answers as the base."""
    _, base = workdir
    questions = [f"Where is the {a} near the {b}?" for a in WORDS for b in WORDS if a != b]
    write_examples(tmp_path / "train.jsonl", [prompt_row(q) for q in questions[:96]])
    write_examples(tmp_path / "eval.jsonl", [prompt_row(q) for q in questions[-6:]])
    out = tmp_path / "alora"
    args = ["train", "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"), "--out", str(out),
            "--model", str(base), "--lr", "5e-3", "--batch-size", "8", "--max-new-tokens", "4", "--quiet",
            "--max-steps", "40", "--alora-invocation", "\nAnswer:", "--check-peft"]
    assert main(args) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "training_report.json").read_text())
    assert config["alora_invocation_tokens"] and report["peft_check"]["all_equal"]
    assert report["settings"]["alora_invocation"] == "\nAnswer:"
    engine = Engine(EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=2, progress=False))
    engine.register_adapter("alora", out)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    asked, plain = (Request(prompt=text, adapter="alora", sampling=greedy)
                    for text in ("Where is the mill near the road?\nAnswer:", "Where is the mill near the road?"))
    model = PeftModel.from_pretrained(load_nf4_reference(base), str(out)).eval()
    for request in (asked, plain):
        assert list(engine.generate([request])[0].token_ids) == peft_greedy(model, engine.encode(request), 6)
    base_answer = engine.generate([Request(prompt=plain.prompt, sampling=greedy)])[0].token_ids
    assert engine.generate([plain])[0].token_ids == base_answer  # no invocation: the base model
    asked_on_base = engine.generate([Request(prompt=asked.prompt, sampling=greedy)])[0].token_ids
    assert engine.generate([asked])[0].token_ids != asked_on_base  # after it, the adapter


def test_an_invocation_missing_from_the_prompts_is_refused(workdir, tmp_path, capsys):
    root, base = workdir
    out = tmp_path / "refused"
    assert main(train_args(root, base, out, "--max-steps", "2", "--alora-invocation", "\nAnswer:")) != 0
    assert "do not hold the invocation" in capsys.readouterr().err
