"""Liger Attention in plain PyTorch: the reference and the CPU path.

For raw projections q [B, T, Hq, D] and k, v [B, T, Hkv, D] (GQA heads repeated):
- gated linear attention on softmax feature maps, with the forget gate read off the key:
  phi(x) = softmax(x) over D, log alpha_t = logsigmoid(k_t) / gate_normalizer, scale 1;
- softmax attention with RoPE and scale 1/sqrt(D) over the last `window` positions
  (t - window + 1 ... t);
- o = mix * window_branch + (1 - mix) * linear_branch; window = 0 gives pure GLA.

A boolean `attention_mask` [B, T] (False = padding) makes padded steps invisible: they add
nothing to the state, do not decay it, and are never attended to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..gla.chunk import chunk_gla_torch
from ..gla.naive import compute_dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B or 1, T, D] in the Hugging Face rotate-half convention."""
    cos, sin = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def repeat_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, n_heads, D], each kv head serving a contiguous group."""
    groups = n_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


TARGETS = ("gla", "mamba2", "hgrn2")


def feature_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_normalizer: float,
    valid: torch.Tensor | None,
    log_gate: torch.Tensor | None = None,
    target: str = "gla",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi(q), phi(k), v, log-gate in the compute dtype, padded steps neutralised.

    Every target reads its forget gate log a = logsigmoid(k) / gate_normalizer off the key:
    - gla (Liger): phi(k) = softmax(k), one gate per key channel;
    - mamba2: phi(k) = softmax(k), one scalar gate per head (the channel gates' mean in log space);
    - hgrn2 (Liger-HGRN2): the key becomes the input gate 1 - a, tied to the forget gate.
    phi(q) = softmax(q) for all. `log_gate` [B, T, Hkv, D] replaces the gate (the ablations)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    dt = compute_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    forget = F.logsigmoid(k) / gate_normalizer
    if target == "mamba2":
        forget = forget.mean(-1, keepdim=True).expand_as(forget)
    phi_q = q.softmax(-1)
    phi_k = -torch.expm1(forget) if target == "hgrn2" else k.softmax(-1)
    log_gate = forget if log_gate is None else log_gate.to(dt)
    if valid is not None:
        keep = valid[:, :, None, None]
        phi_k = torch.where(keep, phi_k, 0.0)
        v = torch.where(keep, v, 0.0)
        log_gate = torch.where(keep, log_gate, 0.0)
    return phi_q, phi_k, v, log_gate


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last `window` keys, O(T * window) memory.

    q [B, T, Hq, D]; k, v [B, P + T, Hkv, D] whose first P = k.shape[1] - T entries are a
    cached prefix (oldest first): query i sits at key index P + i and sees key indices
    P + i - window + 1 ... P + i. key_valid [B, P + T] marks real keys; a query always sees
    itself, so a padded query never meets an empty row. return_lse: also each query's log-sum-exp
    of its scores [B, T, Hq] (hedgehog's linear part shares the window's normaliser through it).
    """
    B, T, Hq, D = q.shape
    P, W = k.shape[1] - T, window
    k, v = repeat_heads(k, Hq), repeat_heads(v, Hq)
    if key_valid is None:
        key_valid = torch.ones(B, P + T, dtype=torch.bool, device=q.device)
    # Left-pad keys so every query has exactly W slots before it, right-pad queries to
    # whole blocks of W; query block n then needs key blocks n and n + 1.
    nb = (T + W - 1) // W
    left, right = W - min(P, W), nb * W - T
    k, v, key_valid = k[:, P - min(P, W) :], v[:, P - min(P, W) :], key_valid[:, P - min(P, W) :]
    k = F.pad(k, (0, 0, 0, 0, left, right))
    v = F.pad(v, (0, 0, 0, 0, left, right))
    key_valid = F.pad(key_valid, (left, right), value=False)
    q = F.pad(q, (0, 0, 0, 0, 0, right))

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, (nb+1)W, H, D] -> [B, H, nb, 2W, D]
        x = x.transpose(1, 2).unflatten(2, (nb + 1, W))
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)

    kb, vb = blocks(k), blocks(v)
    qb = q.transpose(1, 2).unflatten(2, (nb, W))  # [B, H, nb, W, D]
    vis = key_valid.unflatten(1, (nb + 1, W))
    vis = torch.cat([vis[:, :-1], vis[:, 1:]], dim=2)[:, None, :, None, :]  # [B, 1, nb, 1, 2W]
    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    band = (c > r) & (c <= r + W)  # key c is within the window of query r (query at c = r + W)
    allowed = (band & vis) | (c == r + W)
    scores = (qb @ kb.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    if not return_lse:
        return (scores.softmax(-1) @ vb).flatten(2, 3)[:, :, :T].transpose(1, 2)  # [B, T, H, D]
    lse = scores.logsumexp(-1, keepdim=True)  # finite: every row sees its own key
    out = ((scores - lse).exp() @ vb).flatten(2, 3)[:, :, :T].transpose(1, 2)  # the weights from it, not a 2nd pass
    return out, lse[..., 0].flatten(2, 3)[:, :, :T].transpose(1, 2)


def liger_attention_torch(
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
    attention_mask: torch.Tensor | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    log_gate: torch.Tensor | None = None,
    target: str = "gla",
    gla: Callable = chunk_gla_torch,
    window_on_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger Attention on [B, T, H, D] inputs; returns (o in q's dtype, final state or None).

    window_prefix = (rotated keys, values, valid) [B, P, Hkv, D] x2 and [B, P] continues a
    cached sliding window (used when a forward pass extends an existing cache). `gla` runs the
    recurrence (chunk_gla's contract, output in the maps' dtype): the dispatcher passes Triton's.
    window_on_triton: see mix_window_branch.
    """
    Hq = q.shape[2]
    phi_q, phi_k, v_lin, log_gate = feature_maps(q, k, v, gate_normalizer, attention_mask, log_gate, target)
    o, state = gla(
        phi_q,
        repeat_heads(phi_k, Hq),
        repeat_heads(v_lin, Hq),
        repeat_heads(log_gate, Hq),
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    if window > 0:
        o = mix_window_branch(o, q, k, v, window=window, mix=mix, cos=cos, sin=sin, attention_mask=attention_mask,
                              window_prefix=window_prefix, on_triton=window_on_triton)
    return o.to(q.dtype), state


def window_kernels(q: torch.Tensor, v: torch.Tensor, window: int, window_prefix=None, attention_mask=None):
    """liger/window_triton.py where its kernels take these heads and window and there is no cached
    prefix and no padding (the kernels take neither), else None (imported here: it needs Triton,
    which is optional on CPU)."""
    if window_prefix is not None or attention_mask is not None:
        return None
    from . import window_triton  # noqa: PLC0415

    return window_triton if window_triton.supported(q, v, window) else None


def mix_window_branch(
    o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    mix: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    on_triton: bool = False,
) -> torch.Tensor:
    """mix * (softmax attention with RoPE over the last `window` keys, a cached prefix first) + (1 - mix) * o,
    in o's dtype: the sliding-window half every recurrent target shares.

    on_triton (the Triton paths on CUDA, never float64): the window on the Liger window kernels
    (liger/window_triton.py, products in q's dtype) where they apply: no cached prefix, no padding,
    heads of 32 to 128, windows up to 64. Elsewhere the blocked PyTorch form below, in o's dtype."""
    if cos is None or sin is None:
        raise ValueError("the sliding-window branch needs the rotary tables cos and sin")
    dt = o.dtype
    kernels = window_kernels(q, v, window, window_prefix, attention_mask) if on_triton else None
    if kernels is not None:
        return mix * kernels.window_attention(q, k, v, cos, sin, window=window).to(dt) + (1.0 - mix) * o
    q_rot, k_rot = apply_rope(q.to(dt), cos, sin), apply_rope(k.to(dt), cos, sin)
    v_win, valid = v.to(dt), attention_mask
    if window_prefix is not None:
        pk, pv, pvalid = window_prefix
        if valid is None:
            valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        k_rot, v_win = torch.cat([pk.to(dt), k_rot], 1), torch.cat([pv.to(dt), v_win], 1)
        valid = torch.cat([pvalid, valid], 1)
    o_win = sliding_window_attention(q_rot, k_rot, v_win, window=window, scale=q.shape[-1] ** -0.5, key_valid=valid)
    return mix * o_win + (1.0 - mix) * o


def liger_decode_step_torch(
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
) -> torch.Tensor:
    """One token of Liger Attention, updating the cache in place.

    q [B, 1, Hq, D], k, v [B, 1, Hkv, D]; state [B, Hq or Hkv, D, D] float32 (the state depends
    only on keys, values and gates, so a kv group's query heads may share one); k_ring, v_ring
    [B, Hkv, window, D] hold rotated keys and values at slot (position % window), ring_valid
    [B, window] which slots hold real tokens. `position` counts the tokens already cached: an int,
    or a 0-dim int64 tensor on q's device (indexes the ring like an int, without a host sync).
    """
    Hq = q.shape[2]
    Hkv = k.shape[2]
    phi_q, phi_k, v_lin, log_gate = feature_maps(q, k, v, gate_normalizer, None, log_gate, target)
    # grouped views [B, Hkv, G or 1, ...]: each kv head's key, value and gate broadcast over its query heads
    grouped = state.unflatten(1, (Hkv, state.shape[1] // Hkv))  # a view whatever the strides: updates land in state
    phi_k, v_lin, log_gate = (x[:, 0, :, None].to(state.dtype) for x in (phi_k, v_lin, log_gate))
    grouped.mul_(log_gate.exp()[..., None])
    grouped.add_(phi_k[..., :, None] * v_lin[..., None, :])
    o = (phi_q[:, 0].unflatten(1, (Hkv, Hq // Hkv))[..., None, :].to(state.dtype) @ grouped).flatten(1, 3)
    if window > 0:
        o_win = window_decode_step(q, k, v, k_ring, v_ring, ring_valid, position, cos, sin, state.dtype)
        o = mix * o_win + (1.0 - mix) * o
    return o[:, None].to(q.dtype)


def ring_write(ring: torch.Tensor, slot: int | torch.Tensor, value: torch.Tensor | bool) -> None:
    """ring[:, :, slot] = value for a ring [B, H, W, D] (value [B, H, D]), ring[:, slot] = value for
    validity [B, W] (value [B], or one bool for every row). A tensor slot goes through index_copy_ /
    index_fill_: a CUDA graph can record those, not indexing by a tensor (which synchronises)."""
    dim = 2 if ring.dim() == 4 else 1
    if not isinstance(slot, torch.Tensor):
        ring.select(dim, slot)[...] = value
    elif isinstance(value, torch.Tensor):
        ring.index_copy_(dim, slot.reshape(1), value.unsqueeze(dim).to(ring.dtype))
    else:
        ring.index_fill_(dim, slot.reshape(1), value)


def ring_read(ring: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
    """ring[:, :, slot] (or ring[:, slot] for validity [B, W]); a tensor slot through index_select (see ring_write)."""
    dim = 2 if ring.dim() == 4 else 1
    if isinstance(slot, torch.Tensor):
        return ring.index_select(dim, slot.reshape(1)).squeeze(dim)
    return ring.select(dim, slot)


def window_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    ring_valid: torch.Tensor,
    position: int | torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The sliding-window branch of one decode step: write the token into ring slot position % W
    (in place), then softmax attention over the valid slots. Returns [B, Hq, D] in `dtype`."""
    Hq, D = q.shape[2], q.shape[3]
    Hkv = k.shape[2]
    slot = position % k_ring.shape[2]
    ring_write(k_ring, slot, apply_rope(k, cos, sin)[:, 0])
    ring_write(v_ring, slot, v[:, 0])
    ring_write(ring_valid, slot, True)
    q_rot = apply_rope(q, cos, sin)[:, 0].to(dtype).unflatten(1, (Hkv, Hq // Hkv))  # query heads grouped by kv head
    scores = torch.einsum("bhgd,bhwd->bhgw", q_rot, k_ring.to(dtype)) * D**-0.5
    scores = scores.masked_fill(~ring_valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhgw,bhwd->bhgd", scores.softmax(-1), v_ring.to(dtype)).flatten(1, 2)


def liger_mixing_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int = 64,
    mix: float = 0.5,
    gate_normalizer: float = 16.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    target: str = "gla",
) -> torch.Tensor:
    """The [B, Hq, T, T] matrix M with Liger Attention's output o = M v, materialised (short T only).

    Used by the orient stage (MOHAWK's matrix orientation) and to check the fast forms.
    """
    B, T, Hq, D = q.shape
    phi_q, phi_k, _, log_gate = feature_maps(q, k, k, gate_normalizer, None, log_gate, target)
    phi_k, log_gate = repeat_heads(phi_k, Hq), repeat_heads(log_gate, Hq)
    b = log_gate.cumsum(1)  # [B, T, H, D]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = b[:, :, None] - b[:, None, :]  # [B, T(t), T(s), H, D]; <= 0 where s <= t
    decay = torch.where(causal[None, :, :, None, None], diff, float("-inf")).exp()
    linear = torch.einsum("bthd,bshd,btshd->bhts", phi_q, phi_k, decay)
    if window == 0:
        return linear
    dt = linear.dtype
    q_rot = apply_rope(q.to(dt), cos, sin)
    k_rot = repeat_heads(apply_rope(k.to(dt), cos, sin), Hq)
    scores = torch.einsum("bthd,bshd->bhts", q_rot, k_rot) * D**-0.5
    t = torch.arange(T, device=q.device)
    band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    window_attn = scores.masked_fill(~band, float("-inf")).softmax(-1)
    return mix * window_attn + (1.0 - mix) * linear


def softmax_attention_matrix(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The source layer's causal softmax attention matrix [B, Hq, T, T] (RoPE, scale 1/sqrt(D))."""
    Hq, D, T = q.shape[2], q.shape[3], q.shape[1]
    dt = compute_dtype(q)
    q_rot = apply_rope(q.to(dt), cos, sin)
    k_rot = repeat_heads(apply_rope(k.to(dt), cos, sin), Hq)
    scores = torch.einsum("bthd,bshd->bhts", q_rot, k_rot) * D**-0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)
