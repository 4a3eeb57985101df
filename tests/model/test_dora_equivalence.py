"""DoRA adapters through the engine against transformers + PEFT on the same NF4 weights
(Llama, and Qwen2 whose q/k/v biases DoRA does not scale).

Two PEFT DoRA adapters (random non-zero B, random magnitudes; one on parts of the fused
q/k/v and gate/up weights, one rsLoRA on every projection), one plain LoRA adapter and
the base model share batches. Each DoRA row equals PEFT's DoRA model run alone (float32:
prefill logits within 1e-3, greedy tokens identical); every row of a mixed batch equals
its answer alone; a mix that includes a DoRA adapter is refused naming it.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import build_peft_adapter, build_tiny_model, load_nf4_reference, prefill_logits, tiny_engine
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loraquilt.server.generation import ErrorKind, classify
from loraquilt.server.request import Request, RequestError, SamplingParams

NEW_TOKENS = 12
PROMPTS = {
    "dora": "The quick brown fox jumps over",
    "dora_all": "Rivers carry water to the sea and",
    "plain": "In the morning the market opens",
    None: "Books on the shelf were old",
    "dora_as_lora": "The quick brown fox jumps over",
}
BATCH = ("dora", "dora_all", "plain", None)  # the adapter of each row of the mixed batch


def randomize_magnitudes(folder, seed: int) -> None:
    """PEFT initialises m to the base rows' norms; draw them anew (x0.6-1.4, per row)."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(tensors):
        if key.endswith("lora_magnitude_vector"):
            tensors[key] = tensors[key] * (0.6 + 0.8 * torch.rand(tensors[key].shape, generator=generator))
    save_file(tensors, str(path), metadata={"format": "pt"})


def as_plain_lora(dora_folder, out_folder):
    """The same A and B without DoRA: what the DoRA scale changes is measured against it."""
    out_folder.mkdir()
    config = json.loads((dora_folder / "adapter_config.json").read_text())
    config["use_dora"] = False
    (out_folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(str(dora_folder / "adapter_model.safetensors")).items()
               if not k.endswith("lora_magnitude_vector")}
    save_file(tensors, str(out_folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases, added after the scale
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dora-{request.param}")
    base = build_tiny_model(root / "base", request.param, seed=21)
    adapters = {
        "dora": build_peft_adapter(base, root / "dora", r=8, lora_alpha=16, seed=31, scale=0.2, use_dora=True,
                                   target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
        "dora_all": build_peft_adapter(base, root / "dora_all", r=4, lora_alpha=8, seed=32, scale=0.2,
                                       use_dora=True, use_rslora=True,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
        "plain": build_peft_adapter(base, root / "plain", r=8, lora_alpha=16, seed=33, scale=0.2,
                                    target_modules=["q_proj", "v_proj", "up_proj"]),
    }
    randomize_magnitudes(adapters["dora"], 41)
    randomize_magnitudes(adapters["dora_all"], 42)
    adapters["dora_as_lora"] = as_plain_lora(adapters["dora"], root / "dora_as_lora")
    return base, adapters


@pytest.fixture(scope="module")
def peft_model(folders):
    base, adapters = folders
    model = None
    for name, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(load_nf4_reference(base), folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    return model.eval()


# torch: on this CPU the fused NF4 + LoRA kernel, then the scale; reference: dequantize +
# GEMM, the LoRA reference loop per projection, then the scale
@pytest.fixture(scope="module", params=["torch", "reference"])
def world(request, folders, peft_model):
    base, adapters = folders
    engine = tiny_engine(base, max_batch_size=8, max_active_adapters=4, lora_backend=request.param)
    for name, folder in adapters.items():
        engine.register_adapter(name, folder)
    return engine, peft_model


def request_on(adapter: str | None) -> Request:
    return Request(prompt=PROMPTS[adapter], adapter=adapter,
                   sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


@torch.no_grad()
def peft_answer(model, ids: list[int], adapter: str | None) -> tuple[list[int], torch.Tensor]:
    """PEFT alone: greedy NEW_TOKENS tokens and the prefill's last logits [vocab]."""
    def forward(tokens, past):
        return model(input_ids=torch.tensor([tokens]), past_key_values=past, use_cache=True)

    def greedy():
        out = forward(ids, None)
        logits, tokens = out.logits[0, -1].float(), []
        for _ in range(NEW_TOKENS):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = forward([tokens[-1]], out.past_key_values)
        return tokens, logits

    if adapter is None:
        with model.disable_adapter():
            return greedy()
    model.set_adapter(adapter)
    return greedy()


def engine_prefill_logits(engine, adapters) -> torch.Tensor:
    """One prefill step of the requests on `adapters` in one batch -> last logits [N, vocab]."""
    return prefill_logits(engine, [engine.encode(request_on(adapter)) for adapter in adapters], adapters)


def test_dora_rows_equal_peft_alone(world):
    """Logits within 1e-3 and greedy tokens identical, in one batch with a plain LoRA row
    and a base row."""
    engine, model = world
    logits = engine_prefill_logits(engine, BATCH)
    results = engine.generate([request_on(adapter) for adapter in BATCH])
    for row, (adapter, result) in enumerate(zip(BATCH, results)):
        expected_tokens, expected_logits = peft_answer(model, engine.encode(request_on(adapter)), adapter)
        diff = (logits[row] - expected_logits).abs().max().item()
        assert diff <= 1e-3, f"{adapter}: max abs logit diff {diff}"
        assert list(result.token_ids) == expected_tokens, adapter


def test_every_row_of_a_mixed_batch_equals_its_answer_alone(world):
    engine, _ = world
    batched_logits = engine_prefill_logits(engine, BATCH)
    batched = engine.generate([request_on(adapter) for adapter in BATCH])
    for row, adapter in enumerate(BATCH):
        alone_logits = engine_prefill_logits(engine, (adapter,))[0]
        torch.testing.assert_close(batched_logits[row], alone_logits, atol=1e-5, rtol=1e-5)
        assert batched[row].token_ids == engine.generate([request_on(adapter)])[0].token_ids, adapter


def test_the_dora_scale_changes_the_output(world):
    """The same A and B served as plain LoRA give other logits: the scale is applied."""
    engine, _ = world
    dora, plain = engine_prefill_logits(engine, ("dora", "dora_as_lora"))
    assert (dora - plain).abs().max().item() > 0.05


@pytest.mark.parametrize("mix", [(("dora", 0.5), ("plain", 0.5)), (("plain", 1.0), ("dora_all", 1.0))])
def test_a_mix_with_a_dora_adapter_is_refused_naming_it(world, mix):
    engine, _ = world
    dora_name = next(name for name, _ in mix if name.startswith("dora"))
    request = Request(prompt="Hello there", mix=mix, sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestError, match=f"{dora_name!r} is a DoRA adapter") as caught:
        engine.generate([request])
    assert classify(caught.value).kind == ErrorKind.INVALID_ARGUMENT
    assert all(record.pins == 0 for record in engine.adapters.records())  # nothing stays pinned
    assert engine.adapters.check_mix([("plain", 0.5)]) == [engine.adapters.get("plain")]
    with pytest.raises(RequestError, match="alone at weight 1"):
        engine.adapters.check_mix([("dora", 0.5)])
