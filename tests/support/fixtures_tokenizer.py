"""The offline tokenizer of the tiny models (fixtures_models): a byte-level BPE trained
in-process on a built-in English corpus, saved as tokenizer.json + tokenizer_config.json +
chat_template.jinja like a published checkpoint's; nothing is fetched from a hub."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
TOKENIZER_VOCAB_SIZE = 400

#: ChatML, as used by SmolLM2 and Qwen2 instruct models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The little town sat at the bend of a slow river. Every morning the baker opened his shop
before sunrise, and the smell of warm bread drifted over the bridge, past the old mill and
into the market square. Children ran to school with their bags swinging, and the teacher
waited at the door with a cup of tea in her hand.

In the spring the fields turned green and the farmers worked from dawn until dusk. They
planted wheat, corn and potatoes, and they talked about the weather as if it were an old
friend who could not be trusted. When the rain came, it came all at once; when it stayed
away, the river ran low and the boats rested on the mud.

A computer program is a list of instructions. The machine reads each instruction, does
what it says, and moves on to the next one. Programs can add numbers, sort names, draw
pictures and answer questions. A good program is clear, small and tested; a bad one is
long, clever and surprising. def add(a, b): return a + b. for i in range(10): print(i).

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9 are
written the same way in many languages; 42 is the answer, 3.14 is close to pi, and 100%
is everything.

"Where are you going?" asked the fisherman. "To the city," said the traveller, "to see
the lights, the trains and the tall buildings." The fisherman laughed. "The city will still
be there tomorrow. Sit down, have some soup, and tell me about the road."

Questions and answers: What is the capital of France? Paris. What color is the sky on a
clear day? Blue. How many days are in a week? Seven. Who wrote this story? Nobody knows.
The user asks, the assistant answers, and the system sets the rules of the conversation.
"""


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab ~400) on a built-in English corpus and save it.

    Special tokens: ``<|endoftext|>`` (bos, eos and pad), ``<|im_start|>`` and ``<|im_end|>``;
    the chat template is ChatML. No special token is added by ``encode``, so
    ``decode(encode(text)) == text`` for any text (byte-level, no prefix space, no clean-up).
    Deterministic: the same folder contents on every call.

    folder: created if missing; receives tokenizer.json, tokenizer_config.json and
            chat_template.jinja (reload with ``AutoTokenizer.from_pretrained(folder)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer
