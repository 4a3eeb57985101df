"""A catalogue of bad input against a live server (127.0.0.1, ephemeral port).

Every refusal has its exact status code and a message naming the problem, and the server
keeps serving: a canary request (fixed prompt, a registered adapter, greedy, ignore_eos)
answered at the start must come back token for token after each case. One server (a tiny
random Llama) serves the whole module. Broken adapter folders are copies of a good PEFT
adapter, each damaged in exactly one way, each in its own folder under the adapter root.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from fixtures_models import build_tiny_model, make_adapter_zoo
from safetensors.torch import load_file, save_file

from loraquilt.server.app import MAX_MESSAGE_BYTES, RunningServer, ServerConfig
from loraquilt.server.engine import Engine, EngineConfig
from loraquilt.server.request import MAX_STOP_CHARS, MAX_STOP_STRINGS
from loraquilt.server.adapter_admin import MAX_PATH_CHARS
from loraquilt.server.generation import ServiceConfig
from loraquilt.server.request import MAX_MIX
from loraquilt.v1 import loraquilt_pb2 as pb
from loraquilt.v1 import loraquilt_pb2_grpc as pb_grpc
from loraquilt.server.model.weights import DeviceConfig

EXACT = DeviceConfig(dtype="float32")  # the exact path: tests compare tokens

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXISTS = grpc.StatusCode.ALREADY_EXISTS
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

MAX_SEQ_LEN = 128
NEW_TOKENS_LIMIT = 64
MAX_LORA_RANK = 16
TIMEOUT = 30
CANARY = dict(prompt="The river", adapter="a0", max_new_tokens=8, ignore_eos=True)  # greedy
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# tensors of the good adapter (recipe 0 of make_adapter_zoo: r=8, alpha=16, q_proj + v_proj)
FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
FIRST_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@dataclass
class Live:
    server: RunningServer
    channel: grpc.Channel
    stub: pb_grpc.LoraQuiltStub
    root: Path  # the server's adapter root
    good: Path  # a valid adapter folder under the root (registered as a0), copied to be damaged
    outside: Path  # a valid adapter folder outside the root
    canary: tuple[int, ...] = field(default=())

    def canary_tokens(self) -> tuple[int, ...]:
        return tuple(self.stub.Generate(pb.GenerateRequest(**CANARY), timeout=TIMEOUT).token_ids)

    def assert_still_serving(self) -> None:
        assert self.canary_tokens() == self.canary

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    base = build_tiny_model(tmp / "base", "llama", seed=7)
    root = tmp / "adapters"
    good, other = make_adapter_zoo(base, root, count=2, seed=70)
    outside = shutil.copytree(good, tmp / "outside" / "adapter")
    engine_config = EngineConfig(device=EXACT, model=str(base), max_batch_size=4, max_active_adapters=4,
                                 max_lora_rank=MAX_LORA_RANK, max_seq_len=MAX_SEQ_LEN,
                                 lora_backend="torch", progress=False)
    server = RunningServer(Engine(engine_config), ServerConfig(
        port=0, metrics_port=None, grace_seconds=5, preload=(("a0", str(good)), ("a1", str(other))),
        service=ServiceConfig(adapter_root=root, default_max_new_tokens=8,
                              max_new_tokens_limit=NEW_TOKENS_LIMIT)))
    channel = grpc.insecure_channel(server.target)
    live = Live(server, channel, pb_grpc.LoraQuiltStub(channel), root, good, Path(outside))
    live.canary = live.canary_tokens()
    assert len(live.canary) == CANARY["max_new_tokens"]
    yield live
    channel.close()
    server.shutdown(grace=5)


def expect_refusal(call: Callable[[], object], code: grpc.StatusCode, needle: str) -> str:
    """`call` must fail with `code`, its message containing `needle`; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    assert needle in details, f"{needle!r} not in {details!r}"
    return details


# -- Generate / GenerateStream ----------------------------------------------------------

BAD_NAMES = {
    "slash": "a0/../a1", "dotdot": "..", "nul": "a0\x00", "10kB": "a" * 10_000,
    "non-ascii": "ad\u00e4pter", "trailing-newline": "a0\n", "leading-dot": ".a0",
    "129-chars": "a" * 129, "space": "a 0",
}


def mix(*pairs: tuple[str, float]) -> list[pb.AdapterWeight]:
    return [pb.AdapterWeight(name=name, weight=weight) for name, weight in pairs]


def gen(case_id: str, code: grpc.StatusCode, needle: str, **fields):
    fields.setdefault("prompt", "The river")
    return pytest.param(fields, code, needle, id=case_id)


GENERATE_CASES = [
    gen("empty-prompt", INVALID, "prompt: must not be empty", prompt=""),
    gen("prompt-longer-than-the-context", INVALID, f"the context holds {MAX_SEQ_LEN} tokens",
        prompt="The river bends " * 100),
    gen("max-new-tokens-over-the-limit", INVALID, f"max_new_tokens: {NEW_TOKENS_LIMIT + 1} is over",
        max_new_tokens=NEW_TOKENS_LIMIT + 1),
    gen("max-new-tokens-uint32-max", INVALID, "max_new_tokens", max_new_tokens=2**32 - 1),
    gen("temperature-negative", INVALID, "temperature", temperature=-0.5),
    gen("temperature-nan", INVALID, "temperature", temperature=math.nan),
    gen("temperature-inf", INVALID, "temperature", temperature=math.inf),
    gen("temperature-minus-inf", INVALID, "temperature", temperature=-math.inf),
    gen("top-p-negative", INVALID, "top_p", top_p=-0.1),
    gen("top-p-over-one", INVALID, "top_p", top_p=1.5),
    gen("top-p-nan", INVALID, "top_p", top_p=math.nan),
    gen("top-p-inf", INVALID, "top_p", top_p=math.inf),
    gen("unknown-adapter", NOT_FOUND, "'ghost' is not registered", adapter="ghost"),
    gen("adapter-and-adapters-both-set", INVALID, "adapters: set either", adapter="a0",
        adapters=mix(("a1", 1.0))),
    gen("mix-with-an-unknown-name", NOT_FOUND, "'ghost' is not registered",
        adapters=mix(("a0", 0.5), ("ghost", 0.5))),
    gen("mix-with-a-duplicate-name", INVALID, "twice", adapters=mix(("a0", 0.5), ("a0", 0.5))),
    gen("mix-nan-weight", INVALID, "adapters.weight", adapters=mix(("a0", math.nan), ("a1", 1.0))),
    gen("mix-inf-weight", INVALID, "adapters.weight", adapters=mix(("a0", math.inf), ("a1", 1.0))),
    gen("mix-minus-inf-weight", INVALID, "adapters.weight", adapters=mix(("a0", 1.0), ("a1", -math.inf))),
    gen("mix-negative-sum", INVALID, "sum to a positive", adapters=mix(("a0", -1.0), ("a1", 0.5))),
    gen("mix-zero-sum", INVALID, "sum to a positive", adapters=mix(("a0", 0.0))),
    gen("mix-too-many-entries", INVALID, f"at most {MAX_MIX} adapters",
        adapters=mix(*[(f"m{i}", 1.0) for i in range(MAX_MIX + 1)])),
    gen("mix-empty-name", INVALID, "adapters.name", adapters=mix(("", 1.0))),
    gen("mix-name-with-nul", INVALID, "adapters.name", adapters=mix(("a0\x00", 1.0))),
    gen("mix-name-with-slash", INVALID, "adapters.name", adapters=mix(("a0/../a1", 1.0))),
    *[gen(f"adapter-name-{key}", INVALID, "adapter: adapter names", adapter=name)
      for key, name in BAD_NAMES.items()],
    gen("too-many-stop-strings", INVALID, f"at most {MAX_STOP_STRINGS} stop strings",
        stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
    gen("stop-string-too-long", INVALID, f"stop strings must be 1..{MAX_STOP_CHARS}",
        stop=["x" * (MAX_STOP_CHARS + 1)]),
    gen("empty-stop-string", INVALID, "stop strings must be", stop=[""]),
]


def call_generate(live: Live, rpc: str, request: pb.GenerateRequest):
    if rpc == "unary":
        return live.stub.Generate(request, timeout=TIMEOUT)
    return list(live.stub.GenerateStream(request, timeout=TIMEOUT))


@pytest.mark.parametrize("rpc", ["unary", "stream"])
@pytest.mark.parametrize("fields, code, needle", GENERATE_CASES)
def test_generate_refuses(live, rpc, fields, code, needle):
    expect_refusal(lambda: call_generate(live, rpc, pb.GenerateRequest(**fields)), code, needle)
    live.assert_still_serving()


def test_huge_top_k_means_no_top_k(live):
    """top_k is a uint32: anything at or past the vocabulary keeps every token (as 0 does)."""
    def tokens(**fields) -> tuple[int, ...]:
        fields = dict(prompt="The river", adapter="a0", temperature=1.5, seed=2024, max_new_tokens=16,
                      ignore_eos=True) | fields
        request = pb.GenerateRequest(**fields)
        return tuple(live.stub.Generate(request, timeout=TIMEOUT).token_ids)

    vocab = live.server.engine.model.config.vocab_size
    off = tokens(top_k=0)
    assert tokens(top_k=vocab) == off
    assert tokens(top_k=vocab + 1) == off
    assert tokens(top_k=2**32 - 1) == off
    greedy = tokens(top_k=0, temperature=0)
    assert off != greedy  # it did sample
    assert tokens(top_k=1) == greedy  # and top_k is applied when it means something
    live.assert_still_serving()


def test_the_whole_uint64_seed_range_is_accepted(live):
    """seed is a uint64 on the wire, so no seed the proto can carry is out of range."""
    for seed in (0, 2**32, 2**64 - 1):
        request = pb.GenerateRequest(prompt="The river", temperature=1.0, seed=seed, max_new_tokens=8,
                                     ignore_eos=True)
        first, again = (live.stub.Generate(request, timeout=TIMEOUT) for _ in range(2))
        assert first.completion_tokens == 8 and first.token_ids == again.token_ids
    live.assert_still_serving()


@pytest.mark.parametrize("method", ["Generate", "RegisterAdapter"])
def test_message_over_the_grpc_size_limit(live, method):
    """gRPC itself refuses a request over MAX_MESSAGE_BYTES before the service sees it."""
    huge = "x" * (MAX_MESSAGE_BYTES + 1)
    if method == "Generate":
        call = lambda: live.stub.Generate(pb.GenerateRequest(prompt=huge), timeout=TIMEOUT)  # noqa: E731
    else:
        call = lambda: live.stub.RegisterAdapter(  # noqa: E731
            pb.RegisterAdapterRequest(name="huge", path=huge), timeout=TIMEOUT)
    expect_refusal(call, TOO_BIG, f"vs. {MAX_MESSAGE_BYTES}")
    live.assert_still_serving()


def test_prompt_just_under_the_size_limit_is_refused_by_length(live):
    prompt = "The river bends " * ((MAX_MESSAGE_BYTES - 1024) // 16)
    started = time.monotonic()
    expect_refusal(lambda: live.stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=TIMEOUT),
                   INVALID, f"the context holds {MAX_SEQ_LEN} tokens")
    assert time.monotonic() - started < 15
    live.assert_still_serving()


@pytest.mark.parametrize("payload", [
    pytest.param(b"\x0a\x03\xff\xfe\xfd", id="prompt-not-utf8"),
    pytest.param(b"\xff\xff\xff\xff", id="not-protobuf"),
])
def test_bytes_that_are_no_generate_request(live, payload):
    """Undecodable bytes are a client error naming the RPC (the service never sees them)."""
    raw = live.channel.unary_unary("/loraquilt.v1.LoraQuilt/Generate")  # bytes in, bytes out
    expect_refusal(lambda: raw(payload, timeout=TIMEOUT), INVALID, "Generate: the request is not a valid protobuf")
    live.assert_still_serving()


# -- RegisterAdapter: names and paths ---------------------------------------------------


def link_folder_outside(live: Live) -> str:
    (live.root / "escape-dir").symlink_to(live.outside, target_is_directory=True)
    return "escape-dir"


def link_file(name: str, target: Callable[[Live], Path]) -> Callable[[Live], str]:
    """A folder under the root holding the good adapter, but with `name` a symlink to `target`."""
    def setup(live: Live) -> str:
        folder = live.root / f"escape-{name.split('.')[0]}-{target(live).name}"
        shutil.copytree(live.good, folder)
        (folder / name).unlink()
        (folder / name).symlink_to(target(live))
        return folder.name
    return setup


def symlink_loop(live: Live) -> str:
    (live.root / "loop").symlink_to(live.root / "loop")
    return "loop"


def reg(case_id: str, path: str | Callable[[Live], str], code: grpc.StatusCode, needle: str):
    return pytest.param(path, code, needle, id=case_id)


OUTSIDE = "outside the adapter root"
PATH_CASES = [
    reg("dotdot", "../outside/adapter", DENIED, OUTSIDE),
    reg("dotdot-through-an-adapter", "adapter-0/../../outside/adapter", DENIED, OUTSIDE),
    reg("absolute-path-outside", lambda live: str(live.outside), DENIED, OUTSIDE),
    reg("absolute-etc", "/etc", DENIED, OUTSIDE),
    reg("symlinked-folder-escaping", link_folder_outside, DENIED, OUTSIDE),
    reg("symlinked-weights-escaping", link_file(WEIGHTS_FILE, lambda live: live.outside / WEIGHTS_FILE),
        DENIED, f"{WEIGHTS_FILE} in"),
    reg("symlinked-config-escaping", link_file(CONFIG_FILE, lambda live: live.outside / CONFIG_FILE),
        DENIED, f"{CONFIG_FILE} in"),
    reg("weights-linked-to-dev-zero", link_file(WEIGHTS_FILE, lambda live: Path("/dev/zero")),
        DENIED, f"{WEIGHTS_FILE} in"),
    reg("symlink-loop", symlink_loop, INVALID, "path: 'loop' cannot be resolved: symlink loop"),
    reg("empty-path", "", INVALID, "path: must be a non-empty path"),
    reg("path-with-nul", "adapter-0\x00", INVALID, "path: must be a non-empty path without NUL"),
    reg("path-10kB", "a/" * 5_000, INVALID, f"path: at most {MAX_PATH_CHARS} characters"),
    reg("path-10kB-outside", "../" * 3_400, INVALID, f"path: at most {MAX_PATH_CHARS} characters"),
    reg("path-component-too-long", "a" * 300, INVALID, "File name too long"),
    reg("missing-folder", "no-such-folder", INVALID, "does not exist"),
    reg("path-is-a-file", f"adapter-0/{CONFIG_FILE}", INVALID, "is not a folder"),
    reg("the-root-itself", ".", INVALID, f"has no {CONFIG_FILE}"),
]


@pytest.mark.parametrize("path, code, needle", PATH_CASES)
def test_register_refuses_path(live, request, path, code, needle):
    name = "x-" + request.node.callspec.id
    path = path(live) if callable(path) else path
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path=path),
                                                     timeout=TIMEOUT), code, needle)
    assert name not in live.adapter_names()
    live.assert_still_serving()


@pytest.mark.parametrize("name", [pytest.param(n, id=key) for key, n in {"empty": "", **BAD_NAMES}.items()])
def test_register_refuses_name(live, name):
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, path="adapter-1"),
                                                     timeout=TIMEOUT), INVALID, "name: adapter names")
    assert sorted(live.adapter_names()) == ["a0", "a1"]
    live.assert_still_serving()


def test_register_refuses_a_taken_name(live):
    """a0 stays the adapter it was: the canary (on a0) is unchanged."""
    expect_refusal(lambda: live.stub.RegisterAdapter(pb.RegisterAdapterRequest(name="a0", path="adapter-1"),
                                                     timeout=TIMEOUT), EXISTS, "'a0' is already registered")
    live.assert_still_serving()


# -- RegisterAdapter: broken adapter folders --------------------------------------------


def without(name: str):
    return lambda folder: (folder / name).unlink()


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def rewrite(name: str, change: Callable[[bytes], bytes]):
    return lambda folder: (folder / name).write_bytes(change((folder / name).read_bytes()))


def config_with(**fields):
    def damage(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.update(fields)
        (folder / CONFIG_FILE).write_text(json.dumps(config))  # NaN / Infinity as Python writes them
    return damage


def tensors_with(change: Callable[[dict[str, torch.Tensor]], None]):
    def damage(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, folder / WEIGHTS_FILE)
    return damage


def put(key: str, value: float):
    return lambda tensors: tensors[key].view(-1).__setitem__(0, value)


def transpose_first_a(tensors):
    tensors[FIRST_A] = tensors[FIRST_A].T.contiguous()


def to_int32(tensors):
    for key in tensors:
        tensors[key] = (tensors[key] * 100).to(torch.int32)


def overflow_first_b(tensors):
    tensors[FIRST_B] = torch.full_like(tensors[FIRST_B], 3e38)  # finite; alpha/r = 2 takes it past fp32


def drop_first_b(tensors):
    del tensors[FIRST_B]


def add_lm_head(tensors):
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4)


def move_layer_0_to_7(tensors):
    for key in [k for k in tensors if ".layers.0." in k]:
        tensors[key.replace(".layers.0.", ".layers.7.")] = tensors.pop(key)


def rank_32(folder: Path) -> None:
    config_with(r=32)(folder)

    def pad(tensors):
        for key, tensor in tensors.items():
            if ".lora_A." in key:
                tensors[key] = torch.cat([tensor, torch.zeros(32 - tensor.shape[0], tensor.shape[1])])
            else:
                tensors[key] = torch.cat([tensor, torch.zeros(tensor.shape[0], 32 - tensor.shape[1])], dim=1)
    tensors_with(pad)(folder)


def weights_a_folder(folder: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).mkdir()


def pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS_FILE), folder / "adapter_model.bin")
    (folder / WEIGHTS_FILE).unlink()


def no_tensors(folder: Path) -> None:
    save_file({}, folder / WEIGHTS_FILE)


def broken(case_id: str, damage: Callable[[Path], None], needle: str):
    return pytest.param(damage, needle, id=case_id)


NOT_SAFETENSORS = f"{WEIGHTS_FILE} is not a valid safetensors file"
BROKEN_FOLDERS = [
    broken("no-config", without(CONFIG_FILE), f"has no {CONFIG_FILE}"),
    broken("no-weights", without(WEIGHTS_FILE), f"has no {WEIGHTS_FILE}"),
    broken("weights-a-folder", weights_a_folder, f"has no {WEIGHTS_FILE}"),
    broken("config-not-json", write(CONFIG_FILE, b"{not json"), f"{CONFIG_FILE} is not valid JSON"),
    broken("config-not-utf8", write(CONFIG_FILE, b'\xff\xfe{"r": 8}'), f"{CONFIG_FILE} is not valid JSON"),
    broken("config-a-json-list", write(CONFIG_FILE, b"[]"), "must hold a JSON object"),
    broken("config-over-1MiB", write(CONFIG_FILE, b" " * (2 << 20) + b"{}"), f"{CONFIG_FILE} is larger than"),
    broken("r-zero", config_with(r=0), "r must be >= 1"),
    broken("r-a-string", config_with(r="8"), "r must be an integer"),
    broken("r-over-the-server-limit", rank_32, f"r = 32 is over the server's max LoRA rank {MAX_LORA_RANK}"),
    broken("rank-pattern-over-the-limit", config_with(rank_pattern={"q_proj": 64}), "rank_pattern['q_proj'] = 64"),
    broken("rank-pattern-bad-regex", config_with(rank_pattern={"(": 4}), "not a valid pattern"),
    broken("unknown-target-module", config_with(target_modules=["q_proj", "lm_head"]),
           "target_modules ['lm_head'] are not supported"),
    broken("target-modules-a-number", config_with(target_modules=42), "target_modules must be"),
    broken("lora-alpha-nan", config_with(lora_alpha=math.nan), "lora_alpha must be a finite number"),
    broken("lora-alpha-inf", config_with(lora_alpha=math.inf), "lora_alpha must be a finite number"),
    broken("lora-alpha-a-string", config_with(lora_alpha="16"), "lora_alpha must be a finite number"),
    broken("use-rslora-a-string", config_with(use_rslora="yes"), "use_rslora must be true or false"),
    broken("dora", config_with(use_dora=True), "DoRA (use_dora)"),
    broken("trained-bias", config_with(bias="all"), "trained biases (bias)"),
    broken("modules-to-save", config_with(modules_to_save=["lm_head"]), "modules_to_save"),
    broken("peft-type-ia3", config_with(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    broken("unknown-config-field", config_with(fancy_new_thing=True), "unknown LoraConfig field 'fancy_new_thing'"),
    broken("weights-transposed", tensors_with(transpose_first_a), "do not fit the base model"),
    broken("weights-rank-differs-from-config", config_with(r=4), "expected (4, 64)"),
    broken("weights-nan", tensors_with(put(FIRST_B, math.nan)), "q_proj.lora_B has NaN or infinite values"),
    broken("weights-inf", tensors_with(put(FIRST_A, math.inf)), "q_proj.lora_A has NaN or infinite values"),
    broken("weights-integer-dtype", tensors_with(to_int32), "dtype torch.int32; a float dtype is required"),
    broken("weights-overflow-once-scaled", tensors_with(overflow_first_b), "overflow once scaled"),
    broken("lora-b-missing", tensors_with(drop_first_b), "q_proj: lora_B weight missing"),
    broken("unexpected-tensor", tensors_with(add_lm_head), "unexpected tensor 'base_model.model.lm_head.weight'"),
    broken("layer-out-of-range", tensors_with(move_layer_0_to_7), "layer 7 but the model has 2"),
    broken("no-tensors", no_tensors, "holds no LoRA weights"),
    broken("safetensors-truncated", rewrite(WEIGHTS_FILE, lambda data: data[: len(data) // 2]), NOT_SAFETENSORS),
    broken("safetensors-garbage", write(WEIGHTS_FILE, random.Random(0).randbytes(4096)), NOT_SAFETENSORS),
    broken("safetensors-empty-file", write(WEIGHTS_FILE, b""), NOT_SAFETENSORS),
    broken("safetensors-header-length-lie", rewrite(WEIGHTS_FILE, lambda data: struct.pack("<Q", 1 << 40) + data[8:]),
           NOT_SAFETENSORS),
    broken("pickle-only", pickle_only, "adapter_model.bin (pickle); refused for security"),
]


def register_broken(live: Live, case_id: str, damage: Callable[[Path], None]) -> Callable[[], object]:
    folder = live.root / f"broken-{case_id}"
    shutil.copytree(live.good, folder)
    damage(folder)
    request = pb.RegisterAdapterRequest(name=folder.name, path=folder.name)
    return lambda: live.stub.RegisterAdapter(request, timeout=TIMEOUT)


@pytest.mark.parametrize("damage, needle", BROKEN_FOLDERS)
def test_register_refuses_broken_folder(live, request, damage, needle):
    case_id = request.node.callspec.id
    expect_refusal(register_broken(live, case_id, damage), INVALID, needle)
    assert f"broken-{case_id}" not in live.adapter_names()
    live.assert_still_serving()


def test_register_refuses_a_1gib_sparse_weights_file_by_its_size(live):
    def sparse(folder: Path) -> None:
        with open(folder / WEIGHTS_FILE, "wb") as handle:
            handle.truncate(1 << 30)

    call = register_broken(live, "sparse-1GiB", sparse)
    started = time.monotonic()
    expect_refusal(call, INVALID, f"{WEIGHTS_FILE} is {1 << 30} bytes, more than any rank-{MAX_LORA_RANK}")
    assert time.monotonic() - started < 2  # refused by its size, never read
    (live.root / "broken-sparse-1GiB" / WEIGHTS_FILE).unlink()
    live.assert_still_serving()


# -- UnregisterAdapter ------------------------------------------------------------------


@pytest.mark.parametrize("name, code, needle", [
    pytest.param("ghost", NOT_FOUND, "'ghost' is not registered", id="unknown"),
    pytest.param("", INVALID, "name: adapter names", id="empty"),
    *[pytest.param(n, INVALID, "name: adapter names", id=key) for key, n in BAD_NAMES.items()],
])
def test_unregister_refuses(live, name, code, needle):
    expect_refusal(lambda: live.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(name=name), timeout=TIMEOUT),
                   code, needle)
    assert sorted(live.adapter_names()) == ["a0", "a1"]
    live.assert_still_serving()
