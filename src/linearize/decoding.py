"""Greedy decoding whose step can be recorded once as a CUDA graph and replayed.

At batch 16 on an H100 a decode step took ~22 ms for SmolLM2-135M and ~28 ms for a
Llama-3-8B-shaped model, while reading their weights takes 0.09 ms and ~5 ms: the step is
bound by launching a few hundred small kernels from Python, not by memory. A converted
model's cache has fixed shapes (per layer an fp32 state and a ring of `window` keys and values,
all updated in place), so one step can be recorded and replayed. What changes from step to
step lives in device tensors that the recorded step reads and advances itself: the token ids,
the position ids (RoPE) and the count of cached tokens (the ring slot).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .cache import CACHE_KWARG, LigerCacheLayer
from .errors import LinearizeError, first_line
from .evaluate.scoring import accepts


def last_logits_only(model: torch.nn.Module) -> dict:
    """Forward arguments asking for the last position's logits only, where the model takes them: a
    prefill or decode step needs no more, and full [B, T, vocab] logits would hold memory."""
    return {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}


def graph_blocker(cache: Any, device: torch.device) -> str | None:
    """Why a decode step on this cache cannot be recorded as a CUDA graph, or None if it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(layer, LigerCacheLayer) for layer in layers):
        # softmax layers (a plain model, teacher mode, kept layers) grow their key/value cache every step
        return "every layer must be a converted one (a softmax layer's cache grows every step)"
    return None


def compile_dense_parts(model: torch.nn.Module, mode: str = "default") -> int:
    """torch.compile each decoder layer's norms and MLP, and the final norm, in place; returns how many
    modules. Eager, a Llama layer's RMSNorms and SiLU-times-up run as ~20 small kernels per decode
    step; compiled, as a few fused ones: on an H100 a Llama-3-8B-shaped decode step at batch 16 went
    from 9.19 to 7.69 ms (docs/kernels.md). The attention stays eager: its cache advances a Python
    counter every step, which compiled code would recompile on. `mode` is torch.compile's: with
    "max-autotune-no-cudagraphs" inductor also times its own GEMM kernels against cuBLAS for the
    MLP's skinny products."""
    body = getattr(model, "model", model)
    modules = [getattr(layer, name) for layer in getattr(body, "layers", [])
               for name in ("input_layernorm", "post_attention_layernorm", "mlp") if hasattr(layer, name)]
    if isinstance(getattr(body, "norm", None), torch.nn.Module):
        modules.append(body.norm)
    for module in modules:
        module.compile(mode=mode)
    return len(modules)


def fuse_projections(model: torch.nn.Module) -> int:
    """One GEMM where a layer ran several on the same input: each converted attention layer's q, k
    and v projections, and each gated MLP's gate and up projections. The originals keep their
    weights as views of the fused tensor (no memory added; teacher mode, saving and the weight
    count see the same parameters). At batch 16 a decode step is a string of matrix-vector
    products that read the weights; the small k and v reads (an eighth of q's under GQA 32/8) are
    the least efficient, and each launch costs the same. Layers wrapped by PEFT are left alone.
    Call it on a model already on its device and dtype: a later `.to()` would copy the views apart.
    Returns how many modules were fused."""
    from .modeling import LigerAttentionMixin

    fused = 0
    for module in model.modules():
        if isinstance(module, LigerAttentionMixin) and module.linearize_kind == "liger":
            fused += _fuse(module, "fused_qkv", ("q_proj", "k_proj", "v_proj"))
        elif all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            if _fuse(module, "fused_gate_up", ("gate_proj", "up_proj")):
                module.forward = _fused_mlp_forward.__get__(module)
                fused += 1
    return fused


def _fuse(module: torch.nn.Module, attribute: str, names: tuple[str, ...]) -> bool:
    linears = [getattr(module, name) for name in names]
    if hasattr(module, attribute) or not all(type(m) is torch.nn.Linear for m in linears):
        return False
    sizes = [m.out_features for m in linears]
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = None
        if any(m.bias is not None for m in linears):  # Qwen2's q/k/v have biases; a missing one adds zeros
            bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
    start = 0
    for m, size in zip(linears, sizes, strict=True):
        m.weight = torch.nn.Parameter(weight[start : start + size], requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[start : start + size], requires_grad=m.bias.requires_grad)
        start += size
    # a plain attribute, not a parameter or buffer: the weights are counted (and saved) once, as q/k/v's
    setattr(module, attribute, (weight, bias, sizes))
    return True


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias, sizes = self.fused_gate_up
    gate, up = torch.nn.functional.linear(x, weight, bias).split(sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


@functools.cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every recording: cuBLAS keeps a workspace (32 MiB on Hopper)
    for each stream it has run on, so a new stream per decoder grew memory by that much each time."""
    return torch.cuda.Stream(device)


class GreedyDecoder:
    """Greedy tokens from a model, its filled cache and the logits of the last prefilled position.

    `step()` feeds the chosen token and picks the next; `tokens` lists every token chosen so far,
    [B, 1] each, starting with the argmax of `logits`. With `cuda_graph`, the constructor runs
    `warmup` eager steps (they compile kernels and count as generated tokens), then records one
    step; every later step is a replay. Without it every step runs eagerly, the same way.
    `next_positions` [B, 1]: each row's RoPE position for the first fed token, as generate()
    counts it for a left-padded batch (real tokens before it); default: the cache's length.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, logits: torch.Tensor, *, cuda_graph: bool = False,
                 warmup: int = 2, next_positions: torch.Tensor | None = None):
        if cuda_graph and (reason := graph_blocker(cache, logits.device)):
            raise LinearizeError(f"cannot record the decode step as a CUDA graph: {reason}; use --no-cuda-graph")
        self.model, self.cache = model, cache
        self.liger_layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, LigerCacheLayer)]
        seen = cache.get_seq_length()
        self.logits = logits.clone()
        self.ids = self.logits.argmax(-1, keepdim=True)
        self.positions = torch.full_like(self.ids, seen) if next_positions is None else (
            next_positions.to(self.ids).reshape(self.ids.shape).clone())
        self.position = torch.tensor(seen, device=logits.device)  # shared by every converted layer
        for layer in self.liger_layers:
            layer.device_position = self.position
        self.extra = last_logits_only(model)
        self.tokens = [self.ids.clone()]
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self._record(warmup)

    def _forward(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.positions, **{CACHE_KWARG: self.cache},
                         use_cache=True, **self.extra)
        self.logits.copy_(out.logits[:, -1])
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))
        self.positions.add_(1)
        self.position.add_(1)

    def _record(self, warmup: int) -> None:
        # Eager steps on a side stream first, as torch.cuda.graphs asks: kernels compile and the
        # allocator settles before recording.
        side = capture_stream(self.logits.device)
        side.wait_stream(torch.cuda.current_stream(self.logits.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream(self.logits.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                self._forward()
        except torch.OutOfMemoryError:
            raise  # callers such as linearize bench report an out-of-memory setting as such
        except RuntimeError as e:
            raise LinearizeError(f"recording the decode step as a CUDA graph failed ({first_line(e)}); "
                                 "use --no-cuda-graph") from e
        # Recording ran the step's Python (each layer counted one more token) but none of its kernels.
        for layer in self.liger_layers:
            layer.seen -= 1
        self.graph = graph

    def step(self) -> torch.Tensor:
        """Decode one token; returns the next token ids [B, 1] (a buffer the next step overwrites)."""
        if self.graph is None:
            self._forward()
        else:
            self.graph.replay()
            for layer in self.liger_layers:  # the Python side of the step, which a replay skips
                layer.advance(1)
        self.tokens.append(self.ids.clone())
        return self.ids

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def release(self) -> None:
        """Stop the cache's layers reading this decoder's counter; free the graph's memory pool."""
        for layer in self.liger_layers:
            layer.device_position = None
        self.graph = None



@torch.inference_mode()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                    attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """The prompt and its greedy continuation, as `model.generate(do_sample=False)` returns them, with
    the decode step replayed from a CUDA graph where the cache allows (cuda_graph None: on CUDA for a
    converted model whose layers are all converted). A left-padded batch needs its attention_mask.
    After a row's eos_token_id come pad tokens, and decoding stops once every row has ended."""
    if max_new_tokens < 1:
        raise LinearizeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                **last_logits_only(model))
    if cuda_graph is None:  # recording pays off over more than a few steps
        cuda_graph = graph_blocker(getattr(out, CACHE_KWARG), input_ids.device) is None and max_new_tokens > 8
    decoder = GreedyDecoder(model, getattr(out, CACHE_KWARG), out.logits[:, -1], cuda_graph=cuda_graph,
                            next_positions=None if positions is None else positions[:, -1:] + 1)
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    checked = 0
    while len(decoder.tokens) < max_new_tokens:
        decoder.run(min(16, max_new_tokens - len(decoder.tokens)))  # "has every row ended?" syncs: every 16 steps
        if eos_token_id is not None:
            ended |= (torch.cat(decoder.tokens[checked:], 1) == eos_token_id).any(1)
            checked = len(decoder.tokens)
            if bool(ended.all()):
                break
    tokens = torch.cat(decoder.tokens, 1)[:, :max_new_tokens]
    decoder.release()
    if eos_token_id is not None:
        is_eos = tokens == eos_token_id
        length = tokens.shape[1]
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), length)  # each row's first end token
        tokens = tokens.masked_fill(torch.arange(length, device=tokens.device) > first[:, None],
                                    eos_token_id if pad_token_id is None else pad_token_id)
        tokens = tokens[:, : int(first.max()) + 1]  # generate() stops once every row has ended
    return torch.cat([input_ids, tokens], 1)
