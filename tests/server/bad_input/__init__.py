"""A catalogue of bad input against a live server (127.0.0.1, ephemeral port).

Every refusal has its exact status code and a message naming the problem, and the server
keeps serving: a canary request (fixed prompt, a registered adapter, greedy, ignore_eos)
answered at the start must come back token for token after each case. One server (a tiny
random Llama, conftest.py) serves the whole folder.
"""
