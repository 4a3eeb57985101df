"""Runs inside the vLLM python (`--vllm-python`), not in loraquilt's: imports nothing of
loraquilt. One `vllm.LLM` answers batches the bench sends, one JSON object per line.

    python vllm_driver.py CONFIG.json
    CONFIG: {"model": HF_DIR, "adapters": [[name, PEFT_DIR], ...], "llm": {LLM(...) keywords}}
    stdin:  {"op": "generate", "prompts": [str, ...], "adapters": [index | null, ...], "new_tokens": T}
            {"op": "quit"}
    stdout: first {"ready": true, "versions": {...}} or {"error": str}; then per generate
            {"wall_s": s, "token_ids": [[int, ...], ...], "prompt_tokens": [int, ...]} or {"error": str}

Everything else the libraries print goes to stderr (stdout is the protocol alone). The
batch is timed around `LLM.generate` over all prompts: first request added to last answer.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _send(protocol, message: dict) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()


def _error(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        config = json.load(handle)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (and child processes) go to stderr
    sys.stdout = sys.stderr
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(model=config["model"], **config["llm"])
    except BaseException as error:  # import or start-up failure: the bench reports the peer skipped
        _send(protocol, _error(error))
        return 1
    loras = [LoRARequest(name, index + 1, path) for index, (name, path) in enumerate(config["adapters"])]
    _send(protocol, {"ready": True, "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                                 "python": sys.version.split()[0]}})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            new_tokens = request["new_tokens"]
            # greedy, exactly new_tokens per request whatever the model emits
            params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
            lora = [None if index is None else loras[index] for index in request["adapters"]]
            if all(entry is None for entry in lora):
                lora = None
            start = time.perf_counter()
            outputs = llm.generate(request["prompts"], params, lora_request=lora, use_tqdm=False)
            wall = time.perf_counter() - start
            _send(protocol, {"wall_s": wall, "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
                             "prompt_tokens": [len(out.prompt_token_ids) for out in outputs]})
        except Exception as error:
            _send(protocol, _error(error))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
