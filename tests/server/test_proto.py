"""The committed generated code matches the .proto (regenerated with the pinned grpcio-tools)."""

import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GENERATED = ("loraquilt_pb2.py", "loraquilt_pb2.pyi", "loraquilt_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path):
    shutil.copytree(PROTO_ROOT / "loraquilt", tmp_path / "loraquilt")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "loraquilt/v1/loraquilt.proto"],
        check=True, cwd=tmp_path,
    )
    for name in GENERATED:
        fresh = (tmp_path / "loraquilt" / "v1" / name).read_text()
        committed = (PROTO_ROOT / "loraquilt" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `bash proto/generate.sh`"


def test_wire_contract_field_numbers():
    from loraquilt.v1 import loraquilt_pb2 as pb

    fields = {f.name: f.number for f in pb.GenerateRequest.DESCRIPTOR.fields}
    assert fields == {"prompt": 1, "adapter": 2, "adapters": 3, "max_new_tokens": 4, "temperature": 5,
                      "top_p": 6, "top_k": 7, "seed": 8, "stop": 9, "chat": 10, "ignore_eos": 11,
                      # added with the logits processing and log probabilities (none renamed)
                      "logit_bias": 12, "min_tokens": 13, "repetition_penalty": 14, "presence_penalty": 15,
                      "frequency_penalty": 16, "min_p": 17, "stop_token_ids": 18, "logprobs": 19,
                      "prompt_logprobs": 20, "json_schema": 21, "json_object": 22, "regex": 23, "grammar": 24,
                      "n": 25, "best_of": 26, "choice": 27, "merge": 28}
    response = {f.name: f.number for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert response == {"text": 1, "token_ids": 2, "finish_reason": 3, "prompt_tokens": 4,
                        "completion_tokens": 5, "logprobs": 6, "cached_tokens": 7, "prompt_logprobs": 8,
                        "index": 9, "choices": 10}
    entry = {f.name: f.number for f in pb.TokenLogprob.DESCRIPTOR.fields}
    assert entry == {"token_id": 1, "logprob": 2, "top": 3, "text": 4}
    info = {f.name: f.number for f in pb.AdapterInfo.DESCRIPTOR.fields}
    assert info == {"name": 1, "rank": 2, "target_modules": 3, "size_bytes": 4, "tier": 5, "kind": 6}
