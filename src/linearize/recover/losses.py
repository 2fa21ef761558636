"""Recovery objectives. The teacher is always the same model: `teacher(model)` with LoRA disabled.

- lm: next-token cross-entropy on labelled tokens (Liger's recipe).
- kd: KL(teacher || student) over the next-token distributions at labelled positions.
- align: per-layer MSE between each converted layer's mixer output and its softmax output on
  the teacher's own inputs to that layer (LoLCATs attention transfer / MOHAWK stage 2).
- orient: MSE between each layer's materialised mixing matrix (closed form for gla/mamba2/hgrn2,
  one-hot value probes for hedgehog/gdn/gsa) and its softmax attention
  matrix (MOHAWK stage 1), on short sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..kernels.liger.naive import liger_mixing_matrix, softmax_attention_matrix
from ..modeling import LigerAttentionMixin, teacher

IGNORE = -100


@contextmanager
def teacher_view(model) -> Iterator[None]:
    """The source model: softmax attention, adapters off, no gradients."""
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else _null()
    with torch.no_grad(), teacher(model), adapters_off:
        yield


@contextmanager
def _null() -> Iterator[None]:
    yield


@contextmanager
def unpacked_batches() -> Iterator[None]:
    """Tell transformers' mask builder that no batch holds packed sequences, as none here does: the
    losses pass no position ids, so the model's own run 0..T-1. Without this, each forward checks its
    position ids for packing: a device sync that stalls the host every pass, and while a CUDA graph
    records (when it cannot read them) a full [B, 1, T, T] mask that moves SDPA off its causal kernels,
    2.6-2.8x slower (docs/kernels.md, eighteenth session)."""
    from transformers import masking_utils  # noqa: PLC0415

    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None:  # a transformers without the check: nothing to skip
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


def converted_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, LigerAttentionMixin) and m.linearize_kind == "liger"]


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens; 0 for a block with none (an all-prompt
    block of packed instruction data), where transformers' own loss would be 0/0 = nan."""
    return lm_kd_loss(model, input_ids, labels, kd_weight=0.0)


def kd_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the next-token distributions at labelled positions."""
    return lm_kd_loss(model, input_ids, labels, kd_weight=1.0)


def lm_kd_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """(1 - kd_weight) * lm + kd_weight * kd. The student runs once and both terms read its
    log-probabilities (one backward a pass); the teacher runs only when kd has weight."""
    target = None
    with unpacked_batches():
        if kd_weight > 0:
            with teacher_view(model):
                target = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    count = mask.sum().clamp(min=1)
    if target is None:  # plain lm: cross_entropy's fused kernel, no log-probabilities kept
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum") / count
    student = logits.float().log_softmax(-1)
    kd = (F.kl_div(student, target, log_target=True, reduction="none").sum(-1) * mask).sum() / count
    if kd_weight == 1:
        return kd
    lm = F.nll_loss(student.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum") / count
    return (1 - kd_weight) * lm + kd_weight * kd


def _capture_layer_inputs(model, input_ids: torch.Tensor) -> dict:
    """Run the teacher once and keep each converted layer's call (args, kwargs) and its output."""
    layers = converted_layers(model)
    calls: dict[torch.nn.Module, list] = {}

    def keep_input(module, args, kwargs):
        calls[module] = [args, dict(kwargs)]

    def keep_output(module, args, kwargs, output):
        calls[module].append(output[0])

    handles = [m.register_forward_pre_hook(keep_input, with_kwargs=True) for m in layers]
    handles += [m.register_forward_hook(keep_output, with_kwargs=True) for m in layers]
    try:
        with teacher_view(model), unpacked_batches():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def align_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over converted layers of MSE(Liger output, softmax output), each on the teacher's input."""
    calls = _capture_layer_inputs(model, input_ids)
    losses = [
        F.mse_loss(layer(*args, **kwargs)[0].float(), target.float()) for layer, (args, kwargs, target) in calls.items()
    ]
    return torch.stack(losses).mean()


# Targets whose mixing matrix has no closed form here (normalised, delta-rule or slot memories):
# read it off the layer itself. Each is linear in v, so feeding one-hot values, v_s = e_s over
# time, returns column s of M in o = M v.
PROBED_TARGETS = ("hedgehog", "gdn", "gsa")


def probed_mixing_matrix(layer, q: torch.Tensor, k: torch.Tensor, position_embeddings) -> torch.Tensor:
    """[B, Hq, T, T] mixing matrix of a converted layer's parallel form, by one-hot value probes."""
    B, T, Hkv = k.shape[:3]
    probes = torch.eye(T, dtype=q.dtype, device=q.device)[None, :, None, :].expand(B, T, Hkv, T)
    o = layer.parallel_mix(q, k, probes, position_embeddings)  # [B, T, Hq, T]: o[b, t, h, s] = M[b, h, t, s]
    return o.permute(0, 2, 1, 3).float()


def orient_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over converted layers of MSE(Liger mixing matrix, softmax attention matrix)."""
    calls = _capture_layer_inputs(model, input_ids)
    losses = []
    for layer, (args, kwargs, _) in calls.items():
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        s = layer.config.linearize
        with teacher_view(model):
            qt, kt, _ = layer.family.project_qkv(layer, hidden)
            target = softmax_attention_matrix(qt, kt, cos, sin)
        q, k, _ = layer.family.project_qkv(layer, hidden)
        if s["target"] in PROBED_TARGETS:
            mixing = probed_mixing_matrix(layer, q, k, (cos, sin))
        else:
            mixing = liger_mixing_matrix(
                q, k, window=s["window"], mix=s["mix"], gate_normalizer=s["gate_normalizer"], cos=cos, sin=sin,
                log_gate=layer.ablated_log_gate(hidden, k), target=s["target"],
            )
        # Scale by T so the loss reads as a per-row error, not shrinking with sequence length.
        losses.append(F.mse_loss(mixing, target) * q.shape[1])
    return torch.stack(losses).mean()


OBJECTIVES = {"lm": lm_loss, "kd": kd_loss, "align": align_loss, "orient": orient_loss}


def loss_tokens(stage: str, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """How many tokens a stage's loss on this batch is the mean over: the labelled next-token targets
    for the lm stage (lm and kd alike), every position for align and orient. A step weights each
    micro-batch by it, so its loss is the token mean over the global batch however blocks are grouped."""
    if stage in ("align", "orient"):
        return input_ids.numel()
    return int((labels[:, 1:] != IGNORE).sum())


def training_loss(stage: str, loss: str, kd_weight: float, model, input_ids, labels) -> torch.Tensor:
    """The objective of a stage: align/orient, or the --loss mix for the lm stage."""
    if stage in ("align", "orient"):
        return OBJECTIVES[stage](model, input_ids, labels)
    return lm_kd_loss(model, input_ids, labels, kd_weight={"lm": 0.0, "kd": 1.0, "lm+kd": kd_weight}[loss])
