"""Tokenizers for the detokenizer tests, built once for the whole folder: the byte-level
BPE of fixtures_tokenizer, the embedded SmolLM2 tokenizer and two SentencePiece-style BPEs
with byte fallback."""

import pytest
from fixtures_detokenizer import (
    SENTENCEPIECE_KINDS, TOKENIZER_KINDS, build_sentencepiece_tokenizer, load_smollm2_tokenizer,
)
from fixtures_tokenizer import build_tokenizer


@pytest.fixture(scope="package")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="package")
def tokenizer_of(tokenizer):
    built = {"bpe": tokenizer}

    def get(kind):
        if kind not in built:
            built[kind] = load_smollm2_tokenizer() if kind == "smollm2" else build_sentencepiece_tokenizer(
                kind.removeprefix("sp-"))
        return built[kind]

    return get


@pytest.fixture(params=TOKENIZER_KINDS)
def any_tokenizer(request, tokenizer_of):
    return tokenizer_of(request.param)


@pytest.fixture(params=SENTENCEPIECE_KINDS)
def sp_tokenizer(request, tokenizer_of):
    return tokenizer_of(request.param)
