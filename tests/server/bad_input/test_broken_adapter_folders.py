"""Broken adapter folders refused by RegisterAdapter: copies of a good PEFT adapter, each
damaged in exactly one way (missing or malformed files, config fields the engine does not
implement, weights that do not fit, are not finite or are pickles), each in its own folder
under the adapter root."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures_bad_input import CONFIG_FILE, INVALID, MAX_LORA_RANK, TIMEOUT, WEIGHTS_FILE, Live, expect_refusal
from safetensors.torch import load_file, save_file

from loraquilt.v1 import loraquilt_pb2 as pb

# tensors of the good adapter (recipe 0 of make_adapter_zoo: r=8, alpha=16, q_proj + v_proj)
FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
FIRST_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


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
    broken("dora-without-magnitudes", config_with(use_dora=True), "q_proj: DoRA lora_magnitude_vector missing"),
    broken("use-dora-a-string", config_with(use_dora="yes"), "use_dora must be true or false"),
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
