"""NF4 projections (bitsandbytes' layout: blocksize 64, the NF4 code book), and the fused
NF4 + LoRA kernel.

Modules:
    weight.py       the quantized weight (`NF4Weight`), row-wise fusion, scratch buffers
    reference.py    ground truth: bitsandbytes' `matmul_4bit`
    cpu.py          dequantize into a scratch buffer, then one GEMM (bit-identical)
    native.py       the compiled dequantize kernel (`nf4_dequant.c`)
    fused_lora.py   the compiled NF4 GEMM with every row's LoRA delta in the same call
                    (`nf4_lora_gemm.c`), its pair tables and its float32 reference
    dispatch.py     the one place that picks a path: `nf4_linear` per device, `plan_nf4`
                    per row count on the CPU
"""

from loraquilt.kernels.nf4 import fused_lora
from loraquilt.kernels.nf4.dispatch import FUSED_MAX_ROWS, PATHS, NF4Plan, nf4_linear, plan_nf4
from loraquilt.kernels.nf4.fused_lora import FusedLora, LoraPairs, LoraPart, PairsArgs, RowScale
from loraquilt.kernels.nf4.weight import NF4_BLOCKSIZE, DequantScratch, NF4Weight, can_concat

__all__ = [
    "FUSED_MAX_ROWS",
    "NF4_BLOCKSIZE",
    "PATHS",
    "DequantScratch",
    "FusedLora",
    "LoraPairs",
    "LoraPart",
    "NF4Plan",
    "NF4Weight",
    "PairsArgs",
    "RowScale",
    "can_concat",
    "fused_lora",
    "nf4_linear",
    "plan_nf4",
]
