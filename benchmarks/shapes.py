"""Published model shapes (from their config.json) with random weights, for speed benchmarks:
speed does not depend on the weights' values, so nothing is downloaded."""

from __future__ import annotations

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
}


def random_llama(shape: str, dtype: torch.dtype, device: str | torch.device = "cuda") -> torch.nn.Module:
    """A LlamaForCausalLM of a published shape, initialised at random directly in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(**SHAPES[shape])
    config.dtype = dtype  # as a checkpoint in this dtype records it: the cache-size arithmetic reads it
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of 8B weights on the way
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
