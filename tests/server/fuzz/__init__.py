"""Property-based fuzzing of both transports and of adapter folders, against one real
server (conftest.py; fixtures_live: a tiny random Llama on 127.0.0.1, gRPC + HTTP, an
admin token) shared by the whole folder.

Properties, for every example: the answer is a success of the right shape or a
documented client error (gRPC: fixtures_live.CLIENT_CODES; HTTP: 4xx with an OpenAI error
body; INTERNAL / 500 only for the documented non-finite-logits answer); the server stays
up and its greedy canaries (base and an adapter, both transports) are identical before,
during and after; the registry holds exactly the adapters legitimately registered; no
file outside the adapter root is opened.

Profiles (fixtures_fuzz): the default suite runs `ci` (fixed, derandomized examples;
about a minute), `-m slow` runs `slow` with 1000 examples per target.
"""
