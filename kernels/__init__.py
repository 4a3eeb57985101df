"""The compute kernels, a folder per family; nothing here imports from the rest of the
package (`tests/test_layering.py`).

    lora/         batched multi-adapter LoRA (SGMV): segments, reference, CPU, Triton, dispatch
    attention/    paged attention over a block-table KV cache: reference, torch, compiled CPU
                  decode, Triton, dispatch
    nf4/          NF4 projections: the weight, reference, dequantize + GEMM, compiled
                  dequantize, the fused NF4 + LoRA kernel, dispatch (the CPU path plan)
    layer_ops/    residual add + RMSNorm and rotary: torch reference, compiled CPU, dispatch
    native_build.py  builds and loads every family's C source (`*.c` beside its binding)
    host.py       what this machine is (CPU flags, model name) and the cache folder

Each family's `__init__` names its public API; the package itself imports nothing, so
`loraquilt.kernels.host` stays torch-free.
"""
