"""Converted models: the source family's classes with Liger Attention in place of softmax attention.

No parameter is added or renamed: a converted layer is the source attention module with its
class swapped for a subclass whose forward runs Liger Attention (see kernels/liger/naive.py),
so checkpoints hold the source tensors unchanged and `teacher(model)` can run the original
softmax forward again from the very same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import CACHE_KWARG, LigerCache, LigerCacheLayer, given_cache
from .errors import LinearizeError
from .families import FAMILIES, Family
from .kernels import liger_attention, liger_decode_step
from .kernels.gdn.chunk import gdn_attention_chunked
from .kernels.gdn.naive import gdn_decode_step_torch
from .kernels.gsa.chunk import gsa_attention_chunked
from .kernels.gsa.naive import gsa_decode_step_torch
from .kernels.hedgehog.chunk import hedgehog_attention_chunked
from .kernels.hedgehog.naive import HedgehogFeatureMap, hedgehog_decode_step_torch
from .kernels.liger.naive import TARGETS as LIGER_TARGETS
from .kernels.liger.naive import apply_rope

# hedgehog: LoLCATs' learnable feature map (kernels/hedgehog); gdn: the gated delta rule (kernels/gdn);
# gsa: gated slot attention (kernels/gsa)
TARGETS = (*LIGER_TARGETS, "hedgehog", "gdn", "gsa")
TWO_STATES = ("hedgehog", "gsa")  # targets whose cache keeps a second state (normaliser, slot values)

GATES = ("key", "none", "projection")  # where the forget gate comes from; "key" is Liger, the others ablations


def default_settings(**overrides: Any) -> dict[str, Any]:
    """The `linearize` section of a converted config: what was done, from what."""
    settings = {
        "target": "gla",
        "window": 64,  # 0 = pure GLA, no sliding-window branch
        "mix": 0.5,  # weight of the sliding-window branch
        "gate_normalizer": 16.0,  # log alpha = logsigmoid(k) / gate_normalizer
        "gate": "key",  # "none": no forgetting; "projection": a new random gate_proj (the paper's ablations)
        "slots": 64,  # memory slots per head of the gsa target
        "keep_attention": [],  # layer indices left as softmax attention
        "source": None,
        "family": None,
        "version": None,
    }
    settings.update(overrides)
    return settings


class LigerAttentionMixin:
    """Put before a family's attention class; `family` is set on the built subclass."""

    family: Family
    linearize_kind: str  # "liger" or "softmax" (a kept layer)
    linearize_teacher: bool  # True inside `teacher(model)`

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ):
        padding_mask = kwargs.pop("linearize_padding_mask", None)
        past_key_values = given_cache(past_key_values, kwargs)  # transformers >= 5.24 names it `cache`
        layer_cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if self.linearize_kind == "softmax" or self.linearize_teacher:
            if isinstance(layer_cache, LigerCacheLayer):
                raise LinearizeError("this cache was made outside teacher mode: start a new one inside `teacher(model)`")
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        if layer_cache is not None and not isinstance(layer_cache, LigerCacheLayer):
            raise LinearizeError("a converted layer needs a LigerCache: let the model create it (use_cache=True)")

        s = self.config.linearize
        q, k, v = self.family.project_qkv(self, hidden_states)
        B, T = q.shape[:2]
        window = s["window"]
        if s["target"] in ("hedgehog", "gdn", "gsa"):
            forward = self.hedgehog_forward if s["target"] == "hedgehog" else self.stepwise_forward
            o = forward(q, k, v, position_embeddings, layer_cache, padding_mask)
            return self.o_proj(o.reshape(B, T, -1)), None
        opts = dict(mix=s["mix"], gate_normalizer=s["gate_normalizer"], log_gate=self.ablated_log_gate(hidden_states, k),
                    target=s["target"])
        cos, sin = position_embeddings
        valid = None if padding_mask is None else padding_mask[:, -T:]

        if layer_cache is not None and layer_cache.seen > 0 and T == 1:
            o = liger_decode_step(
                q, k, v, layer_cache.state, layer_cache.k_ring, layer_cache.v_ring, layer_cache.ring_valid,
                layer_cache.decode_position(), window=window, cos=cos, sin=sin, **opts,
            )
            layer_cache.advance(1)
        else:
            resumed = layer_cache is not None and layer_cache.seen > 0  # a multi-token step on top of a cache
            o, state = liger_attention(
                q, k, v, window=window, cos=cos, sin=sin,
                initial_state=self.per_query_head(layer_cache.state) if resumed else None,
                output_final_state=layer_cache is not None, attention_mask=valid,
                window_prefix=layer_cache.window_prefix() if resumed and window else None, **opts,
            )
            if layer_cache is not None:
                self.remember(layer_cache, state, k, v, position_embeddings, valid)
        return self.o_proj(o.reshape(B, T, -1)), None

    def remember(self, layer_cache, state, k, v, position_embeddings, valid, phi_k=None) -> None:
        """Store a multi-token step's final state(s) and the window's last keys (rotated), values,
        validity (and hedgehog's feature-mapped keys) in the cache.

        Every target's state depends only on keys, values and gates, so the query heads of a kv
        group hold equal states: the cache keeps the first of each group (a G-th of the memory, and
        of the bytes a decode step moves), and `per_query_head` repeats it for a multi-token step."""
        state = self._per_group(state, lambda s: s[:, :: self.num_key_value_groups].contiguous())
        window, T = self.config.linearize["window"], k.shape[1]
        tail = slice(max(T - window, 0), T)
        cos, sin = position_embeddings
        k_rot = apply_rope(k[:, tail], cos[:, tail], sin[:, tail]) if window else None
        layer_cache.store(state, T, k_rot, v[:, tail], None if valid is None else valid[:, tail],
                          None if phi_k is None else phi_k[:, tail])

    def per_query_head(self, state: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The cache's state(s), one per kv head, repeated over each group's query heads."""
        return self._per_group(state, lambda s: s.repeat_interleave(self.num_key_value_groups, dim=1))

    def _per_group(self, state, fn):
        if self.num_key_value_groups == 1:
            return state
        return tuple(map(fn, state)) if isinstance(state, tuple) else fn(state)

    def hedgehog_forward(self, q, k, v, position_embeddings, layer_cache, padding_mask) -> torch.Tensor:
        """The hedgehog target: learnable feature maps, window and linear part sharing one normaliser
        (the linear part on chunk_gla: Triton on CUDA); the cache keeps S, z and rings of rotated keys,
        values and feature-mapped keys."""
        window, T = self.config.linearize["window"], q.shape[1]
        cos, sin = position_embeddings
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        phi_q, phi_k = self.hedgehog_q(q.to(dt)), self.hedgehog_k(k.to(dt))
        valid = None if padding_mask is None else padding_mask[:, -T:]
        if layer_cache is not None and layer_cache.seen > 0 and T == 1:
            rings = (layer_cache.k_ring, layer_cache.v_ring, layer_cache.f_ring, layer_cache.ring_valid)
            o = hedgehog_decode_step_torch(q, k, v, phi_q, phi_k, layer_cache.state, layer_cache.norm,
                                           rings if window else None, layer_cache.decode_position(), window=window,
                                           cos=cos, sin=sin)
            layer_cache.advance(1)
            return o
        resumed = layer_cache is not None and layer_cache.seen > 0
        o, state = hedgehog_attention_chunked(
            q, k, v, phi_q, phi_k, window=window, cos=cos, sin=sin, attention_mask=valid,
            initial_state=self.per_query_head((layer_cache.state, layer_cache.norm)) if resumed else None,
            window_prefix=layer_cache.window_prefix() if resumed and window else None,
        )
        if layer_cache is not None:
            self.remember(layer_cache, state, k, v, position_embeddings, valid, phi_k)
        return o

    def stepwise_forward(self, q, k, v, position_embeddings, layer_cache, padding_mask) -> torch.Tensor:
        """The gdn and gsa targets (chunked PyTorch forms; step-by-step decode) plus the window branch."""
        s, T = self.config.linearize, q.shape[1]
        window, cos, sin = s["window"], *position_embeddings
        opts = dict(window=window, mix=s["mix"], gate_normalizer=s["gate_normalizer"], cos=cos, sin=sin)
        if s["target"] == "gsa":
            attention, decode, opts["slots"] = gsa_attention_chunked, gsa_decode_step_torch, s["slots"]
        else:
            attention, decode = gdn_attention_chunked, gdn_decode_step_torch
        valid = None if padding_mask is None else padding_mask[:, -T:]
        resumed = layer_cache is not None and layer_cache.seen > 0
        states = None  # gdn keeps one state, gsa two (slot keys, slot values)
        if resumed:
            states = layer_cache.state if s["target"] == "gdn" else (layer_cache.state, layer_cache.norm)
        if resumed and T == 1:
            o = decode(q, k, v, states, layer_cache.k_ring, layer_cache.v_ring, layer_cache.ring_valid,
                       layer_cache.decode_position(), **opts)
            layer_cache.advance(1)
            return o
        o, state = attention(q, k, v, attention_mask=valid, initial_state=self.per_query_head(states) if resumed else None,
                             window_prefix=layer_cache.window_prefix() if resumed and window else None, **opts)
        if layer_cache is not None:
            self.remember(layer_cache, state, k, v, position_embeddings, valid)
        return o

    def parallel_mix(self, q, k, v, position_embeddings) -> torch.Tensor:
        """The hedgehog / gdn / gsa token mixing on given q, k, v without a cache, [B, T, Hq, V]:
        the orient stage probes it with one-hot values to read off the mixing matrix."""
        if self.config.linearize["target"] == "hedgehog":
            return self.hedgehog_forward(q, k, v, position_embeddings, None, None)
        return self.stepwise_forward(q, k, v, position_embeddings, None, None)

    def ablated_log_gate(self, hidden_states: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """None for Liger's key-derived gate (computed inside the kernels); else the ablation's log-gate."""
        s = self.config.linearize
        kind = s.get("gate", "key")
        if kind == "key":
            return None
        if kind == "none":
            return torch.zeros_like(k)
        return torch.nn.functional.logsigmoid(self.gate_proj(hidden_states).view_as(k)) / s["gate_normalizer"]


class LinearizedCausalLM:
    """Put before a family's *ForCausalLM class; `liger_attention_class` is set on the built subclass."""

    liger_attention_class: type

    def __init__(self, config):
        super().__init__(config)
        install_liger_attention(self)

    def decoder_attention_layers(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

    def make_cache(self) -> LigerCache:
        converted = [a.linearize_kind == "liger" and not a.linearize_teacher for a in self.decoder_attention_layers()]
        states = 2 if self.config.linearize["target"] in TWO_STATES else 1
        return LigerCache(self.config, converted, self.config.linearize["window"], states)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        past_key_values = given_cache(past_key_values, kwargs)  # transformers >= 5.24 names it `cache`
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        padding_mask = None
        # A decode step (one new token on a filled cache) never reads the mask: skip the device sync.
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0 and _new_tokens(
            input_ids, kwargs) == 1
        if attention_mask is not None and attention_mask.dim() == 2 and not decoding and not bool(attention_mask.all()):
            padding_mask = attention_mask.bool()
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
            linearize_padding_mask=padding_mask, **{CACHE_KWARG: past_key_values}, **kwargs,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get(CACHE_KWARG) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KWARG] = self.make_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def _new_tokens(input_ids: torch.Tensor | None, kwargs: dict) -> int:
    embeds = kwargs.get("inputs_embeds")
    return (input_ids if input_ids is not None else embeds).shape[1]


def install_liger_attention(model: torch.nn.Module) -> None:
    """Swap every decoder layer's attention class per `model.config.linearize` (no new tensors)."""
    settings = model.config.linearize
    if settings.get("gate", "key") not in GATES:
        raise LinearizeError(f"unknown gate {settings['gate']!r}: choose one of {', '.join(GATES)}")
    keep = set(settings["keep_attention"])
    head_dim = model.decoder_attention_layers()[0].head_dim
    if settings["target"] == "gsa" and (settings["slots"] < 1 or head_dim % settings["slots"]):
        raise LinearizeError(f"--slots must divide the head dimension {head_dim}, got {settings['slots']}")
    for i, attn in enumerate(model.decoder_attention_layers()):
        attn.__class__ = model.liger_attention_class
        attn.linearize_kind = "softmax" if i in keep else "liger"
        attn.linearize_teacher = False
        if settings["target"] == "hedgehog" and i not in keep and not hasattr(attn, "hedgehog_q"):
            # LoLCATs' new parameters: per-head feature maps starting at the identity, trained by the align stage.
            ref = attn.q_proj.weight
            attn.hedgehog_q = HedgehogFeatureMap(model.config.num_attention_heads, attn.head_dim, ref.device, ref.dtype)
            attn.hedgehog_k = HedgehogFeatureMap(model.config.num_key_value_heads, attn.head_dim, ref.device, ref.dtype)
        if settings.get("gate") == "projection" and i not in keep and not hasattr(attn, "gate_proj"):
            # The ablation's new parameters: a random projection, as the paper's "gate from a new projection".
            ref = attn.k_proj.weight
            attn.gate_proj = torch.nn.Linear(ref.shape[1], ref.shape[0], bias=False, device=ref.device, dtype=ref.dtype)
            torch.nn.init.normal_(attn.gate_proj.weight, std=model.config.initializer_range)


@contextmanager
def teacher(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside this block every converted layer computes its original softmax attention again."""
    layers = [m for m in model.modules() if isinstance(m, LigerAttentionMixin)]
    if not layers:
        raise LinearizeError("teacher mode needs a model converted by linearize")
    before = [m.linearize_teacher for m in layers]
    for m in layers:
        m.linearize_teacher = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before, strict=True):
            m.linearize_teacher = was


def _camel(name: str) -> str:
    return {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[name]


def _build_classes(family: Family) -> tuple[type, type]:
    camel = _camel(family.name)
    config_class = type(
        f"Linearized{camel}Config", (family.config_class,),
        {"model_type": f"linearize_{family.name}", "__module__": __name__},
    )
    attention_class = type(
        f"Liger{family.attention_class.__name__}", (LigerAttentionMixin, family.attention_class),
        {"family": family, "__module__": __name__},
    )
    causal_lm_class = type(
        f"Linearized{camel}ForCausalLM", (LinearizedCausalLM, family.causal_lm_class),
        {"config_class": config_class, "liger_attention_class": attention_class, "__module__": __name__},
    )
    return config_class, causal_lm_class


# Module-level names, so checkpoints' auto_map shim can import them.
LinearizedLlamaConfig, LinearizedLlamaForCausalLM = _build_classes(FAMILIES["llama"])
LinearizedMistralConfig, LinearizedMistralForCausalLM = _build_classes(FAMILIES["mistral"])
LinearizedQwen2Config, LinearizedQwen2ForCausalLM = _build_classes(FAMILIES["qwen2"])
LinearizedQwen3Config, LinearizedQwen3ForCausalLM = _build_classes(FAMILIES["qwen3"])

CLASSES: dict[str, tuple[type, type]] = {
    "llama": (LinearizedLlamaConfig, LinearizedLlamaForCausalLM),
    "mistral": (LinearizedMistralConfig, LinearizedMistralForCausalLM),
    "qwen2": (LinearizedQwen2Config, LinearizedQwen2ForCausalLM),
    "qwen3": (LinearizedQwen3Config, LinearizedQwen3ForCausalLM),
}


def register_auto_classes() -> None:
    for config_class, causal_lm_class in CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)


def linearize_model(model: torch.nn.Module, family: Family, settings: dict[str, Any]) -> torch.nn.Module:
    """Turn a loaded source model into its converted class in place: same modules, same tensors."""
    config_class, causal_lm_class = CLASSES[family.name]
    config = model.config
    config.__class__ = config_class  # every submodule holding this config sees the change
    config.linearize = settings
    config.architectures = [causal_lm_class.__name__]
    model.__class__ = causal_lm_class
    install_liger_attention(model)
    return model


def is_converted(model: torch.nn.Module) -> bool:
    return isinstance(model, LinearizedCausalLM) or any(isinstance(m, LigerAttentionMixin) for m in model.modules())


__all__ = ["teacher", "linearize_model", "register_auto_classes", "default_settings", "is_converted"]
