"""Triton forms of the kernels, called by linearize.kernels when backend is "triton"/"auto".

Importing this module needs triton; linearize.kernels falls back to PyTorch when it cannot.
Functions take the same arguments as their dispatchers in linearize/kernels/__init__.py.
"""

from __future__ import annotations

import triton  # noqa: F401  - fail the import here (not at first call) when Triton is missing

from .gdn.chunk_triton import gated_delta_chunked_triton as gated_delta
from .gsa.chunk_triton import slot_scores_chunked_triton as slot_scores
from .liger.decode_triton import liger_decode_step
from .liger.fused_triton import chunk_gla, fused_supports, liger_attention

__all__ = ["chunk_gla", "fused_supports", "gated_delta", "liger_attention", "liger_decode_step", "slot_scores"]
