"""Detokenization: render() and IncrementalDetokenizer, one set of tokenizers (conftest.py)
for the whole folder."""
