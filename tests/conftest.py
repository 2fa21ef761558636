"""Shared fixtures: the real tiny Llama, and tiny random models of every supported family."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
STORIES = FIXTURES / "stories260k"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return STORIES


def tiny_config(family: str):
    """A small random model of `family` sharing the fixture tokenizer's 512-token vocabulary."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama3":  # llama3 rope scaling, as in Llama 3.1 / 3.2
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=24)  # explicit head_dim != hidden / heads
    raise ValueError(family)


FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def family_source(tmp_path_factory):
    """Save a random model of a family (with the fixture tokenizer) and return its folder."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family))
            with torch.no_grad():  # spread q/k so softmax feature maps and gates are not all alike
                for name, p in model.named_parameters():
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        p.mul_(4.0)
            folder = tmp_path_factory.mktemp(f"src-{family}")
            model.save_pretrained(folder)
            for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
                shutil.copy(STORIES / f, folder / f)
            cache[family] = folder
        return cache[family]

    return make
