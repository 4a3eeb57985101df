"""A stand-in for vLLM's offline API, enough for the bench's driver: greedy answers are
the adapter's id (0 for the base model) repeated, prompt tokens are the prompt's words."""

import sys
from types import SimpleNamespace

__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, temperature, max_tokens, min_tokens, ignore_eos):
        assert temperature == 0.0 and max_tokens == min_tokens and ignore_eos
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, model, **keywords):
        print("fake vLLM loading", model, keywords)  # library chatter on stdout: must not reach the protocol
        if keywords.get("max_model_len") == -1:
            raise ValueError("refused max_model_len")
        self.keywords = keywords

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        print("generating", len(prompts))
        sys.stdout.flush()
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        answers = []
        for prompt, lora in zip(prompts, loras):
            tokens = [lora.lora_int_id if lora else 0] * params.max_tokens
            answers.append(SimpleNamespace(prompt_token_ids=list(range(len(prompt.split()))),
                                           outputs=[SimpleNamespace(token_ids=tokens)]))
        return answers
