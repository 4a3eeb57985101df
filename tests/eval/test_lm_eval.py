"""lm-evaluation-harness against a real `loraquilt serve`: a loglikelihood (multiple-choice)
task and a `generate_until` task, defined in local YAML over the JSON Lines files in data/
(nothing downloaded), run with lm-eval's `local-completions` model once per adapter (its
loglikelihood calls are completions with echo, logprobs 1 and max_tokens 1; its
generations completions with stop strings), score exactly as the same tasks run with
lm-eval's `hf` model on the same NF4 base with the PEFT adapter in float32: the same
accuracy and exact match, the same generated texts, and every choice's summed
log-likelihood within 1e-3.

Needs `pip install 'loraquilt[eval]'` (lm_eval 0.4.13 and its dependencies; not in the
default test install: they pull datasets, pandas, pyarrow, scipy and scikit-learn)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
SHIPPED = Path(__file__).resolve().parents[2] / "train" / "demo" / "shipped"
ADAPTERS = ("pirate", "shout")
TASKS = ("loraquilt_choice", "loraquilt_answer")
TASK_YAML = {
    "loraquilt_choice": """task: loraquilt_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/multiple_choice.json
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "loraquilt_answer": """task: loraquilt_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/generate.json
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """lm_eval and a TaskManager that knows the two local tasks."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: "
                                                    "pip install 'loraquilt[eval]'")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    for name, text in TASK_YAML.items():
        (folder / f"{name}.yaml").write_text(text.format(data=DATA))
    return lm_eval, TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def shipped() -> dict[str, Path]:
    found = {name: next(SHIPPED.glob(f"{name}-*")) for name in ADAPTERS}
    return found


@pytest.fixture(scope="module")
def model_folder() -> Path:
    from loraquilt.server.model.sources import resolve_model

    return resolve_model(None).folder  # the embedded SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def server(model_folder, shipped, tmp_path_factory):
    """`loraquilt serve` (float32, the exact path) with the HTTP API and both adapters."""
    from loraquilt.bench.server_side import ServedLoraQuilt

    http_port = free_port()
    served = ServedLoraQuilt(model_folder, SHIPPED, port=free_port(), max_batch_size=8, max_active_adapters=4,
                             max_cpu_adapters=8, max_seq_len=512, log=lambda line: None,
                             extra_args=("--dtype", "float32", "--http-port", str(http_port)))
    try:
        for name, folder in shipped.items():
            served.register(name, folder.name)
        yield http_port
    finally:
        served.stop()


def evaluate(harness, lm, model_args: dict | None = None) -> dict:
    lm_eval, tasks = harness
    return lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=list(TASKS), task_manager=tasks,
                                   log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def served_results(harness, port: int, adapter: str, model_folder: Path) -> dict:
    return evaluate(harness, "local-completions", dict(
        model=adapter, base_url=f"http://127.0.0.1:{port}/v1/completions", tokenizer_backend="huggingface",
        tokenizer=str(model_folder), tokenized_requests=True, num_concurrent=1, max_retries=1))


def reference_results(harness, adapter_folder: Path, model_folder: Path) -> dict:
    from fixtures_models import load_nf4_reference
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(load_nf4_reference(model_folder), adapter_folder).eval()
    return evaluate(harness, HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_folder),
                                  batch_size=1))


def per_doc(results: dict, task: str) -> dict[int, list]:
    """doc id -> the task's filtered responses (choices' (loglikelihood, greedy), or texts)."""
    return {sample["doc_id"]: sample["filtered_resps"] for sample in results["samples"][task]}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_lm_eval_scores_equal_the_hf_model_with_peft(harness, server, shipped, model_folder, adapter):
    served = served_results(harness, server, adapter, model_folder)
    expected = reference_results(harness, shipped[adapter], model_folder)
    assert served["results"]["loraquilt_choice"]["acc,none"] == expected["results"]["loraquilt_choice"]["acc,none"]
    choices, reference_choices = per_doc(served, "loraquilt_choice"), per_doc(expected, "loraquilt_choice")
    assert choices.keys() == reference_choices.keys() and len(choices) == 10
    for doc, responses in choices.items():
        values = [float(resp[0]) if isinstance(resp, (tuple, list)) else float(resp) for resp in responses]
        reference = [float(resp[0]) if isinstance(resp, (tuple, list)) else float(resp)
                     for resp in reference_choices[doc]]
        assert values == pytest.approx(reference, abs=1e-3), (adapter, doc)
    answers = served["results"]["loraquilt_answer"]["exact_match,none"]
    assert answers == expected["results"]["loraquilt_answer"]["exact_match,none"]
    assert per_doc(served, "loraquilt_answer") == per_doc(expected, "loraquilt_answer")
