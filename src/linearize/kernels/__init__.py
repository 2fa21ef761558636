"""Compute kernels, one dispatch point for every caller.

Each op has a plain-PyTorch form (the reference, and the CPU path) and, where written, a
Triton form for CUDA. `backend="auto"` picks Triton on CUDA when a kernel exists for the
shape, else PyTorch; "torch" and "triton" force one.
"""

from __future__ import annotations

import functools
import os

import torch

from .gla.chunk import chunk_gla_torch
from .gla.naive import naive_recurrent_gla
from .liger.naive import liger_attention_torch, liger_decode_step_torch

__all__ = ["chunk_gla", "liger_attention", "liger_decode_step", "naive_recurrent_gla"]

BACKENDS = ("auto", "torch", "triton")


@functools.cache  # asked on every call, decode steps included: import once
def _triton_ops():
    """The Triton module, or None where Triton kernels are not available in this build."""
    try:
        from . import triton_ops  # noqa: PLC0415 - imported lazily: Triton is optional on CPU
    except ImportError:
        return None
    return triton_ops


def _pick(backend: str, x: torch.Tensor, head_dim: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":  # LINEARIZE_KERNELS=torch|triton overrides the choice (debugging, comparisons)
        backend = os.environ.get("LINEARIZE_KERNELS", "auto")
    if backend == "auto":
        use_triton = x.is_cuda and head_dim >= 16 and _triton_ops() is not None
        return "triton" if use_triton else "torch"
    if backend == "triton" and _triton_ops() is None:
        raise RuntimeError("the Triton kernels are not available: install triton, or use backend='torch'")
    return backend


def _triton_ops_for(x: torch.Tensor):
    """The Triton module where "auto" picks Triton for x, else None: the gsa and gdn recurrences ask it.
    float64 stays in PyTorch (the kernels compute in fp32; float64 runs are references)."""
    return _triton_ops() if _pick("auto", x, x.shape[-1]) == "triton" and x.dtype != torch.float64 else None


def _split_packed(cu_seqlens: torch.Tensor, *tensors: torch.Tensor):
    """Yield per-sequence slices [1, T_i, ...] of packed [1, sum T_i, ...] tensors."""
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        yield i, tuple(None if t is None else t[:, bounds[i] : bounds[i + 1]] for t in tensors)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention. q, k, log_gate [B, T, H, K]; v [B, T, H, V]; log_gate <= 0.

    Returns o [B, T, H, V] in q's dtype and, if asked, the final state [B, H, K, V] float32
    (one per sequence for packed input, where B = 1 and cu_seqlens holds the boundaries).
    """
    if _pick(backend, q, q.shape[-1]) == "triton":
        return _triton_ops().chunk_gla(
            q, k, v, log_gate, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if cu_seqlens is None:
        o, state = chunk_gla_torch(
            q, k, v, log_gate, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
        return o.to(q.dtype), state
    outs, states = [], []
    for i, (qi, ki, vi, gi) in _split_packed(cu_seqlens, q, k, v, log_gate):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = chunk_gla_torch(qi, ki, vi, gi, scale=scale, initial_state=h0, output_final_state=output_final_state)
        outs.append(o.to(q.dtype))
        states.append(s)
    return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)


def liger_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int = 64,
    mix: float = 0.5,
    gate_normalizer: float = 16.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    log_gate: torch.Tensor | None = None,
    target: str = "gla",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger Attention (see kernels/liger/naive.py for the exact definition).

    q [B, T, Hq, D]; k, v [B, T, Hkv, D] raw projections; cos, sin [B or 1, T, D] (RoPE on
    the window branch only); window = 0 is pure GLA; attention_mask [B, T] bool marks real
    tokens (False = padding); window_prefix continues a cached window (see liger_attention_torch).
    `log_gate` [B, T, Hkv, D] replaces the key-derived gate (ablations), `target` picks the
    feature maps (mamba2, hgrn2: see liger/naive.py). Returns o in q's dtype and the final state
    [B, Hq, D, D] fp32 (the model's cache keeps the first of each kv group's: they are equal).

    With Triton, Liger's own layer runs as the fused kernel; what it does not take (other maps
    and gates, a cached window prefix, padding, wide windows or odd head sizes) runs as PyTorch
    maps and window around the Triton chunk_gla.
    """
    kwargs = dict(window=window, mix=mix, gate_normalizer=gate_normalizer, cos=cos, sin=sin,
                  initial_state=initial_state, output_final_state=output_final_state)
    triton = _pick(backend, q, q.shape[-1]) == "triton"
    if (triton and log_gate is None and target == "gla" and window_prefix is None
            and _triton_ops().fused_supports(q, k, window, attention_mask)):
        return _triton_ops().liger_attention(q, k, v, cu_seqlens=cu_seqlens, **kwargs)
    kwargs.update(target=target, gla=functools.partial(_triton_gla, io_dtype=q.dtype) if triton else chunk_gla_torch,
                  window_on_triton=triton and q.dtype != torch.float64)
    if cu_seqlens is None:
        return liger_attention_torch(q, k, v, attention_mask=attention_mask, window_prefix=window_prefix,
                                     log_gate=log_gate, **kwargs)
    if log_gate is not None or window_prefix is not None:
        raise ValueError("log_gate and window_prefix with packed sequences are not supported")
    if attention_mask is not None:
        raise ValueError("pass either cu_seqlens (packed sequences) or attention_mask (padding), not both")
    outs, states = [], []
    for i, (qi, ki, vi, ci, si) in _split_packed(cu_seqlens, q, k, v, cos, sin):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = liger_attention_torch(qi, ki, vi, **dict(kwargs, cos=ci, sin=si, initial_state=h0))
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)


def _triton_gla(q, k, v, g, *, io_dtype, **kwargs):
    """The Triton chunk_gla as liger_attention_torch's recurrence: maps and values in the I/O dtype
    (the kernel's products run in it), gates as given; the output back in the maps' dtype."""
    o, state = _triton_ops().chunk_gla(q.to(io_dtype), k.to(io_dtype), v.to(io_dtype), g, **kwargs)
    return o.to(q.dtype), state


def liger_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    k_ring: torch.Tensor | None,
    v_ring: torch.Tensor | None,
    ring_valid: torch.Tensor | None,
    position: int | torch.Tensor,
    *,
    window: int = 64,
    mix: float = 0.5,
    gate_normalizer: float = 16.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    target: str = "gla",
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step; updates `state` and the window ring buffer in place (see naive.py)."""
    kwargs = dict(window=window, mix=mix, gate_normalizer=gate_normalizer, cos=cos, sin=sin)
    if log_gate is not None or target != "gla":
        return liger_decode_step_torch(
            q, k, v, state, k_ring, v_ring, ring_valid, position, log_gate=log_gate, target=target, **kwargs
        )
    if _pick(backend, q, q.shape[-1]) == "triton":
        return _triton_ops().liger_decode_step(q, k, v, state, k_ring, v_ring, ring_valid, position, **kwargs)
    return liger_decode_step_torch(q, k, v, state, k_ring, v_ring, ring_valid, position, **kwargs)
