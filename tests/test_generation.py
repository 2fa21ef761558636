"""Generation agrees with the parallel forward pass, for every variant, through generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.cache import CACHE_KWARG
from linearize.convert import convert

from .helpers import relative_error

# (window, kept layers): Liger hybrid, pure GLA (no softmax layer at all), hybrid with kept layers
VARIANTS = [(64, []), (0, []), (16, [1, 3])]
VARIANT_IDS = ["hybrid", "pure", "kept-layers"]


@pytest.fixture(scope="module")
def converted(stories_path, tmp_path_factory):
    cache = {}

    def get(window: int, keep: list[int]):
        key = (window, tuple(keep))
        if key not in cache:
            out = convert(str(stories_path), tmp_path_factory.mktemp("conv") / "out", window=window, keep_attention=keep)
            cache[key] = AutoModelForCausalLM.from_pretrained(out).eval()
        return cache[key]

    return get


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    tok = AutoTokenizer.from_pretrained(stories_path)
    tok.pad_token = tok.unk_token
    tok.padding_side = "left"
    return tok


def prefill_then_decode(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    out = model(ids[:, :prompt_len], use_cache=True)
    cache, logits = getattr(out, CACHE_KWARG), [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], **{CACHE_KWARG: cache}, use_cache=True).logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("window, keep", VARIANTS, ids=VARIANT_IDS)
@torch.no_grad()
def test_decode_matches_parallel_forward(converted, window, keep):
    model = converted(window, keep)
    ids = torch.randint(3, 512, (2, 150), generator=torch.Generator().manual_seed(0))
    parallel = model(ids, use_cache=False).logits
    stepwise = prefill_then_decode(model, ids, prompt_len=100)  # prompt longer than the window
    assert relative_error(stepwise, parallel) < 1e-4
    # a multi-token forward on top of a cache (chunked prefill) agrees too
    first = model(ids[:, :70], use_cache=True)
    rest = model(ids[:, 70:], **{CACHE_KWARG: getattr(first, CACHE_KWARG)}, use_cache=True)
    assert relative_error(torch.cat([first.logits, rest.logits], 1), parallel) < 1e-4


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3"])
@torch.no_grad()
def test_decode_matches_parallel_for_every_family(family, family_source, tmp_path):
    out = convert(str(family_source(family)), tmp_path / "out", window=16, keep_attention=[1])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(0))
    parallel = model(ids, use_cache=False).logits
    assert relative_error(prefill_then_decode(model, ids, prompt_len=40), parallel) < 1e-4


PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "big red ball. One day, she met a small dog who wanted to play too, so they ran and ran all day long.",
    "The cat sat",
]


@pytest.mark.parametrize("window, keep", VARIANTS, ids=VARIANT_IDS)
@torch.no_grad()
def test_generate_greedy_equals_parallel_argmax(converted, tokenizer, window, keep):
    model = converted(window, keep)
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    n = inputs.input_ids.shape[1]
    assert n > 64, "the prompt must be longer than the window"
    seq = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    logits = model(seq, use_cache=False).logits
    assert torch.equal(logits[0, n - 1 : -1].argmax(-1), seq[0, n:])


@pytest.mark.parametrize("window, keep", VARIANTS, ids=VARIANT_IDS)
@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(converted, tokenizer, window, keep):
    model = converted(window, keep)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    together = model.generate(**batch, max_new_tokens=16, do_sample=False)[:, batch.input_ids.shape[1] :]
    for i, prompt in enumerate(PROMPTS):
        alone_inputs = tokenizer(prompt, return_tensors="pt")
        alone = model.generate(**alone_inputs, max_new_tokens=16, do_sample=False)[0, alone_inputs.input_ids.shape[1] :]
        assert together[i].tolist() == alone.tolist(), f"row {i}"


@torch.no_grad()
def test_sampling_and_teacher_generation(converted, tokenizer):
    model = converted(64, [])
    inputs = tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt")
    n = inputs.input_ids.shape[1]
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=3)
    assert sampled.shape == (3, n + 12)
    with linearize.teacher(model):
        taught = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    # teacher mode is the source model: llama2.c's documented continuation
    text = tokenizer.decode(taught[0, n:], skip_special_tokens=True)
    assert text.startswith("She loved to play outside in the park.")


def test_teacher_mode_requires_a_converted_model(stories_path):
    plain = AutoModelForCausalLM.from_pretrained(stories_path)
    with pytest.raises(linearize.errors.LinearizeError, match="converted"):
        with linearize.teacher(plain):
            pass


@pytest.mark.parametrize("gate", ["none", "projection"])
@torch.no_grad()
def test_gate_ablations_decode_like_they_train(stories_path, tmp_path, gate):
    out = convert(str(stories_path), tmp_path / "out", window=16, gate=gate)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    has_proj = [hasattr(layer.self_attn, "gate_proj") for layer in model.model.layers]
    assert all(has_proj) if gate == "projection" else not any(has_proj)
    ids = torch.randint(3, 512, (2, 80), generator=torch.Generator().manual_seed(0))
    parallel = model(ids, use_cache=False).logits
    assert relative_error(prefill_then_decode(model, ids, prompt_len=50), parallel) < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # gate_proj weights are saved, not redrawn
    assert torch.equal(reloaded(ids, use_cache=False).logits, parallel)


@pytest.mark.parametrize("target", ["mamba2", "hgrn2", "hedgehog", "gdn", "gsa"])
@pytest.mark.parametrize("window", [16, 0])
@torch.no_grad()
def test_other_targets_decode_like_they_train(stories_path, tmp_path, tokenizer, target, window):
    out = convert(str(stories_path), tmp_path / "out", target=target, window=window, keep_attention=[2], slots=4)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.linearize["target"] == target
    ids = torch.randint(3, 512, (2, 90), generator=torch.Generator().manual_seed(0))
    parallel = model(ids, use_cache=False).logits
    assert relative_error(prefill_then_decode(model, ids, prompt_len=60), parallel) < 1e-4
    source = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    with linearize.teacher(model):
        assert (model(ids).logits - source(ids).logits).abs().max() < 1e-5
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch.input_ids.shape[1] :]
    alone_inputs = tokenizer(PROMPTS[1], return_tensors="pt")
    alone = model.generate(**alone_inputs, max_new_tokens=8, do_sample=False)[0, alone_inputs.input_ids.shape[1] :]
    assert together[1].tolist() == alone.tolist()


@pytest.mark.parametrize("target", ["gla", "mamba2", "hedgehog", "gsa", "gdn"])
@pytest.mark.parametrize("window", [16, 0])
@torch.no_grad()
def test_footprint_is_what_the_cache_holds(stories_path, tmp_path, target, window):
    from linearize.bench import tensor_bytes
    from linearize.footprint import footprint

    out = convert(str(stories_path), tmp_path / "out", target=target, window=window, keep_attention=[1], slots=4)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = getattr(model(ids, use_cache=True), CACHE_KWARG)
    fp = footprint(model.config)
    state_layers = [layer for i, layer in enumerate(cache.layers) if i != 1]
    assert tensor_bytes(state_layers) == fp.state_bytes
    assert tensor_bytes(cache.layers[1]) == 40 * fp.kv_bytes_per_token
