"""LoLCATs-style Hedgehog attention in plain PyTorch (target `hedgehog`).

Feature map per head: phi(x) = [softmax(x W), softmax(-x W)] (2D features; W learnable, set to
the identity at conversion). One normaliser is shared by the sliding window and the linear part:

    o_t = (sum_{s in window} e^(q_t k_s / sqrt(D) - m_t) v_s + e^(-m_t) phi(q_t) S_{t-W})
          / (sum_{s in window} e^(q_t k_s / sqrt(D) - m_t)     + e^(-m_t) phi(q_t) z_{t-W})

with RoPE on the window branch only, m_t the largest window score (it cancels), and
S_{t-W} = sum_{s <= t-W} phi(k_s) v_s^T, z_{t-W} = sum_{s <= t-W} phi(k_s): tokens leave the
window into the linear state. window = 0 is normalised linear attention over every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gla.naive import compute_dtype
from ..liger.naive import apply_rope, repeat_heads, ring_read, ring_write


class HedgehogFeatureMap(torch.nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h; W starts as the identity."""

    def __init__(self, heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        eye = torch.eye(head_dim, device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(eye.repeat(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


def masked_inputs(q, v, phi_q, phi_k, attention_mask):
    """(valid [B, T], v, phi_q, phi_k) in the compute dtype, padded steps' values and keys zeroed."""
    dt = compute_dtype(q)
    B, T = q.shape[:2]
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask
    keep = valid[:, :, None, None]
    return valid, torch.where(keep, v.to(dt), 0.0), phi_q.to(dt), torch.where(keep, phi_k.to(dt), 0.0)


def prefix_or_empty(window_prefix, B: int, W: int, heads: int, D: int, V: int, features: int, dt, device):
    """The window's W earlier tokens (rotated keys, values, feature-mapped keys, valid), kv heads, in
    `dt`, with the values and feature-mapped keys of empty slots zeroed; W empty slots at prefill."""
    if window_prefix is None:
        zeros = [torch.zeros(B, W, heads, n, dtype=dt, device=device) for n in (D, V, features)]
        return (*zeros, torch.zeros(B, W, dtype=torch.bool, device=device))
    pk, pv, pphi, pvalid = window_prefix
    gone = ~pvalid[:, :, None, None]
    return pk.to(dt), torch.where(gone, 0.0, pv.to(dt)), torch.where(gone, 0.0, pphi.to(dt)), pvalid


def hedgehog_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    window_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """q [B, T, Hq, D], k, v [B, T, Hkv, D], phi_q [B, T, Hq, F], phi_k [B, T, Hkv, F].

    initial_state (S [B, Hq, F, D], z [B, Hq, F]) holds the tokens before the window prefix;
    window_prefix (rotated k, v, phi_k, valid) [B, W, ...] are the `window` tokens before these.
    Returns o (q's dtype) and the state of every token older than the window after them."""
    dt = compute_dtype(q)
    B, T, Hq, D = q.shape
    W = window
    valid, v, phi_q, phi_k = masked_inputs(q, v, phi_q, phi_k, attention_mask)
    phi_k, v_rep = repeat_heads(phi_k, Hq), repeat_heads(v, Hq)
    Fdim = phi_q.shape[-1]
    S0 = q.new_zeros(B, Hq, Fdim, v.shape[-1], dtype=dt) if initial_state is None else initial_state[0].to(dt)
    z0 = q.new_zeros(B, Hq, Fdim, dtype=dt) if initial_state is None else initial_state[1].to(dt)
    if W == 0:  # normalised linear attention over every token
        S = S0[:, None] + torch.einsum("bthf,bthd->bthfd", phi_k, v_rep).cumsum(1)
        z = z0[:, None] + phi_k.cumsum(1)
        num = torch.einsum("bthf,bthfd->bthd", phi_q, S)
        den = torch.einsum("bthf,bthf->bth", phi_q, z)[..., None]
        return (num / den.clamp_min(1e-30)).to(q.dtype), (S[:, -1], z[:, -1])

    q_rot = apply_rope(q.to(dt), cos, sin)
    k_rot = repeat_heads(apply_rope(k.to(dt), cos, sin), Hq)
    # Keys: the W prefix slots (all invalid at prefill), then the T new tokens; query i sits at key W + i.
    pk, pv, pphi, pvalid = prefix_or_empty(window_prefix, B, W, k.shape[2], D, v.shape[-1], Fdim, dt, q.device)
    pk, pv, pphi = (repeat_heads(x, Hq) for x in (pk, pv, pphi))
    nb = (T + W - 1) // W
    right = nb * W - T
    keys = F.pad(torch.cat([pk, k_rot], 1), (0, 0, 0, 0, 0, right))
    vals = F.pad(torch.cat([pv, v_rep], 1), (0, 0, 0, 0, 0, right))
    phis = F.pad(torch.cat([pphi, phi_k], 1), (0, 0, 0, 0, 0, right))
    kvalid = F.pad(torch.cat([pvalid, valid], 1), (0, right), value=False)
    qb = F.pad(q_rot, (0, 0, 0, 0, 0, right)).transpose(1, 2).unflatten(2, (nb, W))  # [B, H, nb, W, D]
    fqb = F.pad(phi_q, (0, 0, 0, 0, 0, right)).transpose(1, 2).unflatten(2, (nb, W))

    def pairs(x: torch.Tensor) -> torch.Tensor:  # [B, (nb+1)W, H, X] -> [B, H, nb, 2W, X]: key blocks n, n+1
        x = x.transpose(1, 2).unflatten(2, (nb + 1, W))
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)

    kb, vb, fb = pairs(keys), pairs(vals), pairs(phis)
    vis = kvalid.unflatten(1, (nb + 1, W))
    vis = torch.cat([vis[:, :-1], vis[:, 1:]], dim=2)[:, None, :, None, :]  # [B, 1, nb, 1, 2W]
    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    in_window = ((c > r) & (c <= r + W) & vis) | (c == r + W)  # a query always sees itself
    lagged = (c <= r) & vis  # left the window, still in the previous block: linear part
    scores = (qb @ kb.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~in_window, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    e = (scores - m).exp()
    lin_scores = torch.where(lagged, fqb @ fb.transpose(-1, -2), 0.0)
    # Linear state before key block n (exclusive prefix over whole blocks), starting from S0, z0.
    phis_b, vals_b = (x.transpose(1, 2).unflatten(2, (nb + 1, W)) for x in (phis, vals))  # [B, H, nb+1, W, X]
    blocks_kv = torch.einsum("bhnwf,bhnwd->bhnfd", phis_b, vals_b)
    blocks_z = phis_b.sum(3)
    S_before = S0[:, :, None] + blocks_kv.cumsum(2) - blocks_kv  # [B, H, nb+1, F, D]
    z_before = z0[:, :, None] + blocks_z.cumsum(2) - blocks_z
    lin_num = fqb @ S_before[:, :, :nb] + lin_scores @ vb
    lin_den = (fqb * z_before[:, :, :nb, None, :]).sum(-1, keepdim=True) + lin_scores.sum(-1, keepdim=True)
    decay = (-m).exp()
    o = (e @ vb + decay * lin_num) / (e.sum(-1, keepdim=True) + decay * lin_den)
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)
    # Tokens older than the window after these T: the first T of the W + T keys (prefix included).
    S = S0 + torch.einsum("bthf,bthd->bhfd", phis[:, :T], vals[:, :T])
    z = z0 + phis[:, :T].sum(1)
    return o.to(q.dtype), (S, z)


def hedgehog_decode_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    rings: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    position: int | torch.Tensor,
    *,
    window: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token; updates the state S, normaliser z and the rings (k_rot, v, phi_k, valid) in place.
    The token leaving the window (slot position % window) is folded into S and z first. S [B, Hq or
    Hkv, F, D] and z depend only on the feature-mapped keys and the values, so a kv group's query
    heads may share them."""
    D, Hkv = q.shape[3], k.shape[2]
    dt = state.dtype
    # grouped views [B, Hkv, G or 1, ...]: each kv head's key, value and ring serve its query heads unrepeated
    S, z = state.unflatten(1, (Hkv, -1)), norm.unflatten(1, (Hkv, -1))
    fq = phi_q[:, 0].to(dt).unflatten(1, (Hkv, -1))

    def read(values: torch.Tensor, normaliser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (fq[..., None, :] @ values).squeeze(-2), (fq * normaliser).sum(-1)

    if window == 0:
        fk, v1 = phi_k[:, 0, :, None].to(dt), v[:, 0, :, None].to(dt)
        S.add_(fk[..., :, None] * v1[..., None, :])
        z.add_(fk)
        num, den = read(S, z)
        return (num / den[..., None]).flatten(1, 2).to(q.dtype)[:, None]
    k_ring, v_ring, f_ring, ring_valid = rings
    slot = position % window
    leaving = ring_read(ring_valid, slot)[:, None, None, None]
    old_f, old_v = ring_read(f_ring, slot)[:, :, None].to(dt), ring_read(v_ring, slot)[:, :, None].to(dt)
    S.add_(torch.where(leaving[..., None], old_f[..., :, None] * old_v[..., None, :], 0.0))
    z.add_(torch.where(leaving, old_f, 0.0))
    ring_write(k_ring, slot, apply_rope(k, cos, sin)[:, 0])
    ring_write(v_ring, slot, v[:, 0])
    ring_write(f_ring, slot, phi_k[:, 0])
    ring_write(ring_valid, slot, True)
    q_rot = apply_rope(q, cos, sin)[:, 0].to(dt).unflatten(1, (Hkv, -1))
    scores = torch.einsum("bhgd,bhwd->bhgw", q_rot, k_ring.to(dt)) * D**-0.5
    scores = scores.masked_fill(~ring_valid[:, None, None, :], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    e = (scores - m).exp()
    decay = (-m).exp()
    lin_num, lin_den = read(S, z)
    num = torch.einsum("bhgw,bhwd->bhgd", e, v_ring.to(dt)) + decay * lin_num
    den = e.sum(-1, keepdim=True) + decay * lin_den[..., None]
    return (num / den).flatten(1, 2).to(q.dtype)[:, None]
