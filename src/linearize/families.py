"""Source families: where each architecture keeps what a conversion touches.

A family is found from `config.model_type`, never from a model's name. Families differ only
in the attention module: q/k/v/o projections (all), q/k biases (Qwen2), per-head q/k RMS
norms applied before RoPE (Qwen3), and the classes transformers builds them with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from .errors import LinearizeError


@dataclass(frozen=True)
class Family:
    name: str  # our model_type is f"linearize_{name}"
    source_model_type: str
    config_class: type
    causal_lm_class: type
    attention_class: type
    qk_norm: bool  # q_norm/k_norm over head_dim, applied to raw projections before RoPE

    def project_qkv(self, attn: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw per-head projections [B, T, H, D] as the source computes them before RoPE."""
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        fused = getattr(attn, "fused_qkv", None)  # decoding.fuse_projections: one GEMM for the three
        if fused is not None:
            weight, bias, sizes = fused
            q, k, v = (t.view(shape) for t in nn.functional.linear(hidden, weight, bias).split(sizes, dim=-1))
        else:
            q = attn.q_proj(hidden).view(shape)
            k = attn.k_proj(hidden).view(shape)
            v = attn.v_proj(hidden).view(shape)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v


FAMILIES: dict[str, Family] = {
    f.source_model_type: f
    for f in (
        Family("llama", "llama", modeling_llama.LlamaConfig, modeling_llama.LlamaForCausalLM,
               modeling_llama.LlamaAttention, qk_norm=False),
        Family("mistral", "mistral", modeling_mistral.MistralConfig, modeling_mistral.MistralForCausalLM,
               modeling_mistral.MistralAttention, qk_norm=False),
        Family("qwen2", "qwen2", modeling_qwen2.Qwen2Config, modeling_qwen2.Qwen2ForCausalLM,
               modeling_qwen2.Qwen2Attention, qk_norm=False),
        Family("qwen3", "qwen3", modeling_qwen3.Qwen3Config, modeling_qwen3.Qwen3ForCausalLM,
               modeling_qwen3.Qwen3Attention, qk_norm=True),
    )
}


def family_for(model_type: str) -> Family:
    """The family of a source `model_type` or of one of our converted `linearize_*` types."""
    name = model_type.removeprefix("linearize_")
    if name not in FAMILIES:
        supported = ", ".join(f.name for f in FAMILIES.values())
        raise LinearizeError(f"unsupported architecture {model_type!r}: linearize converts {supported} models")
    return FAMILIES[name]
