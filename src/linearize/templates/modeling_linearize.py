"""Loader shim for a checkpoint converted by linearize.

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports this file; the
model code itself lives in the `linearize` package (`pip install linearize`).
"""

from linearize.modeling import (  # noqa: F401
    LinearizedLlamaConfig,
    LinearizedLlamaForCausalLM,
    LinearizedMistralConfig,
    LinearizedMistralForCausalLM,
    LinearizedQwen2Config,
    LinearizedQwen2ForCausalLM,
    LinearizedQwen3Config,
    LinearizedQwen3ForCausalLM,
)
