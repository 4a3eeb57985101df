"""The engine on CUDA against transformers + PEFT on CUDA, on the same NF4 weights.

Mirrors tests/model/test_equivalence.py (which runs on the CPU): one batch of 10 prompts of
different lengths, 8 rows each on its own PEFT adapter (mixed ranks, targets, rsLoRA,
rank/alpha patterns), 1 row on the base model, 1 row on a 0.7/0.3 mix of two adapters.
The reference runs each request alone through transformers + bitsandbytes + PEFT on CUDA
(NF4, double quantization, float32 compute; the mix through
`add_weighted_adapter(..., combination_type="cat")`).

Criterion, float32 compute on both sides (`DeviceConfig("cuda", "float32")`, LoRA backend
auto = the compiled Triton kernels, IEEE fp32 dots): prefill logits within 1e-3 and greedy
tokens identical. Unlike on the CPU, bitsandbytes picks a different CUDA kernel by batch
shape (fused for a few rows, dequantize + F.linear for more), so the batched engine and the
one-request reference round differently in the last bits; a greedy sequence may therefore
part from the reference only where the reference's top two logits are within TIE of each
other (reported), never elsewhere.
bfloat16 (the CUDA default): prefill logits within BF16_REL_ERR (relative L2 per row) of the
float32 reference, and generation completes. The random tiny models amplify rounding: bf16
against fp32 measured 3-10% per row on the CPU (the base-only row too), while leaving a
row's adapter out moves its logits by 24-120% for all adapters but the weakest (4-6%). So
this catches a broken bf16 path (wrong dtype handling, garbage, a missing adapter), not
small numeric drift; the fp32 tests above are the exact check.
Runs in a child process with TRITON_INTERPRET=0 (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo

from _gpu import DEVICE, GPU

pytestmark = GPU
RUN_IN_CHILD = True  # the LoRA backend on CUDA is Triton: compiled kernels, not the interpreter

PROMPTS = (
    "The quick brown fox",
    "In the morning the market opens and people come from",
    "A",
    "Rivers carry water to the sea",
    "Tell me about the weather in the mountains during the long winter months when",
    "One two three",
    "The engine turns",
    "Where do the birds go",
    "Light",
    "Books on the shelf were old and",
)
MIX = ((0, 0.7), (2, 0.3))  # adapter indices and weights of the last row
NEW_TOKENS = 16
LOGITS_ATOL = 1e-3  # float32, as on the CPU
TIE = 1e-3  # float32: logit margin under which the two systems may pick different tokens
BF16_REL_ERR = 0.2  # bfloat16 engine vs float32 reference: ||diff|| / ||reference|| per row


@pytest.fixture(scope="module", autouse=True)
def _ieee_float32_matmuls():
    """float32 GEMMs stay IEEE (torch's default; no TF32) on both sides of the comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _engine(base, dtype: str):
    from loraquilt.server.engine import Engine, EngineConfig
    from loraquilt.server.model.weights import DeviceConfig

    return Engine(EngineConfig(
        model=str(base), device=DeviceConfig(DEVICE, dtype), max_batch_size=16,
        max_active_adapters=8, max_lora_rank=16, lora_backend="auto", progress=False,
    ))


def _requests():
    from loraquilt.server.request import Request, SamplingParams

    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(prompt=p, adapter=f"a{i}", sampling=greedy) for i, p in enumerate(PROMPTS[:8])]
    requests.append(Request(prompt=PROMPTS[8], sampling=greedy))
    requests.append(Request(prompt=PROMPTS[9], mix=tuple((f"a{i}", w) for i, w in MIX), sampling=greedy))
    return requests


def _reference_adapter(index: int) -> str | None:
    return f"a{index}" if index < 8 else (None if index == 8 else "mix")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(root / "base", request.param, seed=1)
    adapters = make_adapter_zoo(base, root / "adapters", count=8, seed=10)
    return base, adapters


def _registered(engine, adapters):
    for index, folder in enumerate(adapters):
        engine.register_adapter(f"a{index}", folder)
    # one batch first: adapters into host memory and device slots, kernels compiled
    results = engine.generate(_requests())
    return engine, results


@pytest.fixture(scope="module")
def engine_fp32(models):
    base, adapters = models
    return _registered(_engine(base, "float32"), adapters)


@pytest.fixture(scope="module")
def engine_bf16(models):
    base, adapters = models
    return _registered(_engine(base, "bfloat16"), adapters)


def _load_nf4_peer(base):
    """transformers + bitsandbytes NF4 on DEVICE: the benchmark peer's settings."""
    if DEVICE == "cpu":  # dry run: the CPU peer, bf16 fast path off
        from fixtures_models import load_nf4_reference

        return load_nf4_reference(base)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, device_map={"": 0}, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def reference(models):
    """PEFT model with all 8 adapters and the weighted mix; runs one request alone."""
    from peft import PeftModel

    base, adapters = models
    model = PeftModel.from_pretrained(_load_nf4_peer(base), adapters[0], adapter_name="a0")
    for index, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{index}")
    model.add_weighted_adapter(
        [f"a{i}" for i, _ in MIX], [w for _, w in MIX], adapter_name="mix", combination_type="cat"
    )
    model.eval()
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    assert device.type == DEVICE

    @torch.no_grad()
    def run(ids: list[int], adapter: str | None):
        """(greedy NEW_TOKENS tokens, float32 logits before each of them); eos does not stop."""
        def forward(tokens, past):
            return model(input_ids=torch.tensor([tokens], device=device), past_key_values=past, use_cache=True)

        if adapter is None:
            with model.disable_adapter():
                return _greedy(forward, ids)
        model.set_adapter(adapter)
        return _greedy(forward, ids)

    return run


def _greedy(forward, ids):
    out = forward(ids, None)
    tokens, logits = [], []
    for _ in range(NEW_TOKENS):
        step = out.logits[0, -1].float()
        logits.append(step)
        tokens.append(int(step.argmax()))
        out = forward([tokens[-1]], out.past_key_values)
    return tokens, logits


def _assert_same_greedy(actual: list[int], expected: list[int], logits: list[torch.Tensor], label: str):
    assert len(actual) == len(expected) == NEW_TOKENS, label
    for step, (mine, theirs) in enumerate(zip(actual, expected)):
        if mine == theirs:
            continue
        margin = float(logits[step][theirs] - logits[step][mine])
        assert margin <= TIE, (
            f"{label}: token {step} is {mine}, transformers + PEFT chose {theirs} by a logit "
            f"margin of {margin:.3g} (> {TIE}); engine {actual}, reference {expected}")
        print(f"{label}: parts from the reference at token {step} on a near-tie (margin {margin:.2e})")
        return


def test_engine_runs_on_the_device(engine_fp32, engine_bf16):
    for engine, dtype in ((engine_fp32[0], torch.float32), (engine_bf16[0], torch.bfloat16)):
        assert engine.model.device.type == DEVICE and engine.model.dtype == dtype
        assert engine.slots.device.type == DEVICE
        if DEVICE == "cuda":
            from loraquilt.kernels.lora import resolve_backend

            assert resolve_backend(engine.config.lora_backend, engine.model.device) == "triton"


def test_greedy_tokens_equal_peft_one_request_at_a_time(engine_fp32, reference):
    engine, _ = engine_fp32
    requests = _requests()
    results = engine.generate(requests)  # all 10 in one batch
    for index, (request, result) in enumerate(zip(requests, results)):
        ids = engine.encode(request)
        expected, logits = reference(ids, _reference_adapter(index))
        _assert_same_greedy(list(result.token_ids), expected, logits, f"row {index} ({_reference_adapter(index)})")
        assert result.finish_reason == "length" and result.completion_tokens == NEW_TOKENS
        assert result.prompt_tokens == len(ids)


def _prefill_logits(engine) -> torch.Tensor:
    """One forward over the 10 prompts (one prefill batch, each row on its adapters):
    the last position's logits per prompt, [10, vocab] float32."""
    from loraquilt.server.adapters.slots import LoraSpan
    from loraquilt.server.model.batch import build_forward_batch, contiguous_tables

    requests = _requests()
    prompts = [engine.encode(r) for r in requests]
    names = [[name for name, _ in r.adapter_weights] for r in requests]
    leases = [engine.adapters.acquire(n).lease if n else None for n in names]
    try:
        for lease in leases:  # the warm-up batch put every adapter in memory and on the device
            assert lease is None or hasattr(lease, "slots"), f"adapters not resident: {lease!r}"
        block_size = engine.cache.block_size
        batch = build_forward_batch(
            prefill_tokens=prompts, prefill_tables=contiguous_tables([len(p) for p in prompts], block_size),
            prefill_starts=[0] * len(prompts), decode_tokens=[], decode_tables=[], decode_positions=[],
            block_size=block_size, device=engine.model.device,
        )
        spans = [LoraSpan(len(ids), tuple(zip(lease.slots if lease else (), (w for _, w in request.adapter_weights))))
                 for request, lease, ids in zip(requests, leases, prompts)]
        engine.slots.begin_step(spans)
        logits = engine.model(batch, engine.cache, engine.slots)  # [10, vocab]
        engine.slots.end_step()
    finally:
        for lease in leases:
            if lease:
                engine.adapters.release(lease)
    return logits.float()


def _reference_prefill(engine, reference) -> list[torch.Tensor]:
    return [reference(engine.encode(r), _reference_adapter(i))[1][0] for i, r in enumerate(_requests())]


def test_prefill_logits_match_within_1e3(engine_fp32, reference):
    engine, _ = engine_fp32
    logits = _prefill_logits(engine)
    for index, expected in enumerate(_reference_prefill(engine, reference)):
        diff = (logits[index] - expected).abs().max().item()
        assert diff <= LOGITS_ATOL, f"row {index}: max abs diff {diff}"


def test_bfloat16_prefill_logits_close_to_float32_reference(engine_bf16, reference):
    engine, results = engine_bf16
    assert all(r.finish_reason == "length" and r.completion_tokens == NEW_TOKENS for r in results)
    logits = _prefill_logits(engine)
    assert torch.isfinite(logits).all()
    for index, expected in enumerate(_reference_prefill(engine, reference)):
        rel = ((logits[index] - expected).norm() / expected.norm()).item()
        assert rel <= BF16_REL_ERR, f"row {index}: relative L2 error {rel:.3g} > {BF16_REL_ERR}"
