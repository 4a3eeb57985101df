"""The engines a CPU user would pick instead of loraquilt, measured by `bench serve --peers`.

Each runs from an interpreter or binary the user names, outside this package's venv:

* ``vllm``: vLLM's CPU build, offline ``vllm.LLM`` API in a child process
  (``vllm_peer`` drives ``vllm_driver``), bf16 base, LoRA enabled;
* ``llamacpp`` / ``llamacpp_q4``: ``llama-server`` on a bf16 GGUF of the same base and on
  a 4-bit GGUF made from it with ``llama-quantize``, the PEFT adapters converted to GGUF
  LoRA (``gguf_convert``), one HTTP request per prompt (``llamacpp_peer``).

Only the throughput scenarios run on them, alternating with the loraquilt systems run by
run. A peer that cannot run (flag not given, binary missing, import or start-up failure)
is reported as ``{"skipped": reason}``, never measured in another way.
"""

from __future__ import annotations

VLLM, LLAMACPP, LLAMACPP_Q4 = "vllm", "llamacpp", "llamacpp_q4"
ENGINES = (VLLM, LLAMACPP, LLAMACPP_Q4)  # their order within a repeat, after the loraquilt pairs
PEER_CHOICES = {VLLM: (VLLM,), LLAMACPP: (LLAMACPP, LLAMACPP_Q4)}  # --peers value -> engines
