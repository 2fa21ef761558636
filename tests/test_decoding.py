"""GreedyDecoder: the decode loop a CUDA graph records. On CPU its steps run eagerly, with the ring
slot read from the device counter as a replay reads it; the graph itself is tested in test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearize.cache import CACHE_KWARG
from linearize.convert import convert
from linearize.decoding import GreedyDecoder, compile_dense_parts, graph_blocker
from linearize.errors import LinearizeError


def greedy_tokens(model, ids: torch.Tensor, steps: int, cuda_graph: bool = False) -> torch.Tensor:
    out = model(ids, use_cache=True, logits_to_keep=1)
    decoder = GreedyDecoder(model, getattr(out, CACHE_KWARG), out.logits[:, -1], cuda_graph=cuda_graph)
    decoder.run(steps - len(decoder.tokens))
    tokens = torch.cat(decoder.tokens, 1)
    decoder.release()
    return tokens


@pytest.mark.parametrize(("target", "window"), [("gla", 16), ("gla", 0), ("mamba2", 16), ("hedgehog", 16),
                                                ("gdn", 16), ("gsa", 16)])
@torch.no_grad()
def test_decoder_tokens_equal_generate_and_the_parallel_argmax(stories_path, tmp_path, target, window):
    out = convert(str(stories_path), tmp_path / "out", target=target, window=window, slots=4)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    tokens = greedy_tokens(model, ids, steps=30)  # 30 > window: the ring wraps around
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=30, do_sample=False)[:, 40:])
    logits = model(torch.cat([ids, tokens], 1), use_cache=False).logits
    assert torch.equal(logits[:, 39:-1].argmax(-1), tokens)


@torch.no_grad()
def test_graph_blockers_are_named(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out", window=16, keep_attention=[1])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    cache = getattr(model(torch.ones(1, 4, dtype=torch.long), use_cache=True), CACHE_KWARG)
    assert graph_blocker(cache, torch.device("cpu")) == "CUDA graphs need a CUDA device"
    assert "every layer must be a converted one" in graph_blocker(cache, torch.device("cuda"))
    with pytest.raises(LinearizeError, match="use --no-cuda-graph"):
        GreedyDecoder(model, cache, torch.zeros(1, 512), cuda_graph=True)


@torch.no_grad()
def test_greedy_generate_equals_generate_with_padding_and_eos(stories_path, tmp_path):
    """A left-padded batch (GreedyDecoder's next_positions), end and pad tokens, the early stop."""
    from transformers import AutoTokenizer

    from linearize.decoding import greedy_generate

    out = convert(str(stories_path), tmp_path / "out", window=16)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token, tok.padding_side = tok.unk_token, "left"
    batch = tok(["Once upon a time there was a little girl named Lily who", "The dog ran"], return_tensors="pt",
                padding=True)
    plain = greedy_generate(model, batch.input_ids, 20, attention_mask=batch.attention_mask)
    assert torch.equal(plain, model.generate(**batch, max_new_tokens=20, do_sample=False))
    # an end token that row 0 reaches early (row 1 may never reach it): pads after it, as generate() does
    n = batch.input_ids.shape[1]
    eos = int(plain[0, n + 4])
    kw = dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    ours = greedy_generate(model, batch.input_ids, attention_mask=batch.attention_mask, **kw)
    theirs = model.generate(**batch, do_sample=False, **kw)
    assert torch.equal(ours, theirs)
    one = batch.input_ids[:1, batch.attention_mask[0].bool()]  # row 0 alone: every row ends, decoding stops early
    ended = greedy_generate(model, one, **kw)
    assert ended.shape[1] == one.shape[1] + 5 and torch.equal(ended, model.generate(one, do_sample=False, **kw))
    with pytest.raises(LinearizeError, match="at least 1"):
        greedy_generate(model, batch.input_ids, 0)


@torch.no_grad()
def test_compiled_norms_and_mlp_decode_the_same_tokens(stories_path, tmp_path):
    """`bench --compile` (compile_dense_parts): the compiled norms and MLPs are the same functions, so
    greedy decoding picks the same tokens, with logits within float32 rounding."""
    out = convert(str(stories_path), tmp_path / "out", target="gla", window=16)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    eager_logits, eager = model(ids).logits, greedy_tokens(model, ids, 8)
    layers = len(model.model.layers)
    assert compile_dense_parts(model) == 3 * layers + 1
    torch.testing.assert_close(model(ids).logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_tokens(model, ids, 8), eager)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # qwen2: q/k/v biases; qwen3: q/k norms
@torch.no_grad()
def test_fused_projections_decode_the_same_tokens(family_source, tmp_path, family):
    """`bench --fuse` (fuse_projections): one GEMM for q/k/v of each converted layer (not the kept
    softmax one) and for gate/up of every MLP; the parameters stay the same tensors' views, so the
    weight count, the state dict and teacher mode are unchanged, and greedy decoding picks the same tokens."""
    from linearize.decoding import fuse_projections
    from linearize.modeling import teacher

    out = convert(str(family_source(family)), tmp_path / "out", window=16, keep_attention=[1])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, tokens = model(ids).logits, greedy_tokens(model, ids, 8)
    with teacher(model):
        teacher_logits = model(ids).logits
    sizes = {name: p.shape for name, p in model.named_parameters()}
    assert fuse_projections(model) == 2 + 3  # two converted attention layers, three MLPs
    assert fuse_projections(model) == 0  # once only
    assert {name: p.shape for name, p in model.named_parameters()} == sizes
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == model.model.layers[0].self_attn.fused_qkv[0].data_ptr()
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_tokens(model, ids, 8), tokens)
    with teacher(model):
        torch.testing.assert_close(model(ids).logits, teacher_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fusing_leaves_peft_wrapped_projections_alone(stories_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from linearize.decoding import fuse_projections

    out = convert(str(stories_path), tmp_path / "out", window=16)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(out), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fuse_projections(model) == len(model.base_model.model.model.layers)  # the MLPs only
