"""loraquilt: one NF4 base LLM, many LoRA adapters in the same batch, served over gRPC.

Package map (each mandated top-level folder is one sub-package of ``loraquilt``):
``kernels/`` -> ``loraquilt.kernels``, ``server/`` -> ``loraquilt.server``,
``client/`` -> ``loraquilt.client``; this folder (``cli/``) is the ``loraquilt`` package
itself and holds the command-line entry point and ``host`` (CPU flags and the cache
folder, read without torch).
"""

__version__ = "0.1.0"
