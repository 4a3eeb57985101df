"""The OpenAI-compatible HTTP API of a real server on 127.0.0.1, driven by the real
`openai` client (sync and async), against the gRPC answers of the same server; one server
(conftest.py) for the whole folder."""
