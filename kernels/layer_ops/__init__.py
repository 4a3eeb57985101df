"""The per-layer operations around the projections: residual add + RMSNorm, and rotary
embedding of q and k.

Modules:
    reference.py   the torch versions: the semantics, and the path where no native call applies
    native.py      the compiled CPU calls (`layer_ops.c`)
    dispatch.py    the one place that picks between them (`add_rms_norm`, `rotary`)
"""

from loraquilt.kernels.layer_ops.dispatch import add_rms_norm, rotary
from loraquilt.kernels.layer_ops.native import available
from loraquilt.kernels.layer_ops.reference import add_rms_norm_reference, rotary_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference", "available", "rotary", "rotary_reference"]
