"""The model on CUDA with the Triton kernels wired in: decode agrees with the parallel pass there too.

Runs only where CUDA is available (the device machine); CI has none and skips these.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearize.convert import convert

from .helpers import relative_error
from .test_generation import PROMPTS, VARIANT_IDS, VARIANTS, prefill_then_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


@pytest.fixture(scope="module")
def family_models(family_source, tmp_path_factory):
    """Random models with head_dim >= 16, so the Triton path is the one dispatched."""

    def get(family: str, window: int, keep: list[int], dtype: torch.dtype):
        out = convert(str(family_source(family)), tmp_path_factory.mktemp("gpu") / "out", window=window,
                      keep_attention=keep)
        return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).cuda().eval()

    return get


@pytest.mark.parametrize("window, keep", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@torch.no_grad()
def test_decode_matches_parallel_on_gpu_fp32(family_models, family, window, keep):
    keep = [k for k in keep if k < 3]
    model = family_models(family, min(window, 16) if window else 0, keep, torch.float32)
    ids = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(0)).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    parallel = model(ids, use_cache=False).logits
    assert relative_error(prefill_then_decode(model, ids, prompt_len=60), parallel) < 1e-4


@torch.no_grad()
def test_decode_matches_parallel_on_gpu_bf16(family_models):
    model = family_models("llama", 16, [], torch.bfloat16)
    ids = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(0)).cuda()
    parallel = model(ids, use_cache=False).logits.float()
    assert relative_error(prefill_then_decode(model, ids, prompt_len=60).float(), parallel) < 2e-2


@torch.no_grad()
def test_generate_left_padded_on_gpu(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token, tok.padding_side = tok.unk_token, "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    together = model.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch.input_ids.shape[1] :]
    for i, prompt in enumerate(PROMPTS):
        alone = tok(prompt, return_tensors="pt").to("cuda")
        row = model.generate(**alone, max_new_tokens=12, do_sample=False)[0, alone.input_ids.shape[1] :]
        assert together[i].tolist() == row.tolist()


@pytest.mark.parametrize("window", [16, 0], ids=["window", "no-window"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_gradients_match_the_pytorch_path_on_gpu(family_models, family, window, monkeypatch):
    """The Triton backward inside a model: weight gradients of the LM loss equal the PyTorch path's (fp32)."""
    model = family_models(family, window, [], torch.float32)
    model.train()
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()

    def grads(kernels: str) -> dict[str, torch.Tensor]:
        monkeypatch.setenv("LINEARIZE_KERNELS", kernels)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight",
                                                                                       "v_proj.weight"))}

    triton_grads, torch_grads = grads("triton"), grads("torch")
    assert triton_grads
    for name, g in triton_grads.items():
        assert relative_error(g, torch_grads[name]) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_window_backward_kernels_match_the_pytorch_form_on_gpu(D, dtype):
    """The window backward's two kernels, compiled for the GPU (the models above have heads of 16
    and 24, which take the PyTorch form): batched and packed, GQA 4, against fp32 autograd; written
    fresh, and as the Liger backward runs them (the sweeps' rows added, dk and dv's per query head
    summed over each group, the sums written in the input dtype)."""
    from linearize.kernels.liger.window_bwd_triton import window_bwd, window_bwd_torch

    from .test_kernels_triton import rope

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    packed = torch.tensor([0, 100, 101, 700], dtype=torch.int32, device="cuda")
    for B, T, cu in ((2, 600, None), (1, 700, packed)):
        q, do = (torch.randn(B, T, 8, D, device="cuda").to(dtype) for _ in range(2))
        k, v = (torch.randn(B, T, 2, D, device="cuda").to(dtype) for _ in range(2))
        cos, sin = (x.cuda() for x in rope(1, T, D))
        ref = window_bwd_torch(q.float(), k.float(), v.float(), do.float(), cos, sin, window=64, mix=0.5, cu_seqlens=cu)
        got = window_bwd(q, k, v, do, cos, sin, window=64, mix=0.5, cu_seqlens=cu)
        for name, a, b in zip(("dq", "dk", "dv"), got, ref, strict=True):
            assert relative_error(a, b) < (1e-4 if dtype == torch.float32 else 2e-2), (name, B, D)
        rows = [torch.randn(B, T, 8, D, device="cuda") for _ in range(3)]  # dq; dk, dv per query head
        want = [rows[0] + ref[0], *(r.view(B, T, 2, 4, D).sum(3) + g for r, g in zip(rows[1:], ref[1:], strict=True))]
        summed = window_bwd(q, k, v, do, cos, sin, window=64, mix=0.5, cu_seqlens=cu, add_to=tuple(rows), out_dtype=dtype)
        for name, a, b in zip(("dq", "dk", "dv"), summed, want, strict=True):
            assert a.dtype == dtype and relative_error(a.float(), b) < (1e-4 if dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize("window", [16, 0])
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3's heads of 24 take the PyTorch decode step
@torch.no_grad()
def test_cuda_graph_decode_gives_the_eager_tokens(family_models, family, window):
    from .test_decoding import greedy_tokens

    model = family_models(family, window, [], torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 512, (3, 70), generator=torch.Generator().manual_seed(2)).cuda()
    eager = greedy_tokens(model, ids, steps=40)
    graphed = greedy_tokens(model, ids, steps=40, cuda_graph=True)
    assert torch.equal(graphed, eager)
    logits = model(torch.cat([ids, graphed], 1), use_cache=False).logits
    assert torch.equal(logits[:, 69:-1].argmax(-1), graphed)


@pytest.mark.parametrize("window, resumed, padded", [(64, False, True), (0, False, True), (64, True, True),
                                                     (64, False, False), (16, False, False)])
def test_hedgehog_chunked_on_triton_matches_the_blocked_form_on_gpu(window, resumed, padded):
    """hedgehog's linear part on the Triton chunk_gla (fp32, heads of 64: features of 128) against the
    blocked PyTorch reference in float64: outputs, final (S, z) and the gradients of all five inputs.
    Unpadded and not resumed, the window runs on the Liger window kernels (liger/window_triton.py)."""
    from linearize.kernels.hedgehog.chunk import hedgehog_attention_chunked
    from linearize.kernels.hedgehog.naive import hedgehog_attention_torch

    from .helpers import hedgehog_inputs, hedgehog_outputs

    torch.backends.cuda.matmul.allow_tf32 = False
    xs, kw = hedgehog_inputs(2, 300, 8, 2, 64, window, resumed, seed=11, padded=padded)
    d_o = torch.randn(2, 300, 8, 64, dtype=torch.float64)
    got = hedgehog_outputs(lambda *a, **k: hedgehog_attention_chunked(*a, **k, backend="triton"), xs, kw, d_o,
                           torch.float32, "cuda")
    ref = hedgehog_outputs(hedgehog_attention_torch, xs, kw, d_o, torch.float64, "cuda")
    for name, a, b in zip(("o", "S", "z", "dq", "dk", "dv", "dphi_q", "dphi_k"), got, ref, strict=True):
        if b.abs().max() == 0:  # window 0 reads no raw q, k: both sides must say so
            assert a.abs().max() == 0, name
        else:
            assert relative_error(a, b) < 1e-4, name


@pytest.mark.parametrize("window", [16, 0])
@torch.no_grad()
def test_fused_projections_decode_the_same_tokens_on_gpu(family_models, window):
    """`bench --fuse` on the GPU: the Triton decode step reads q/k/v as column slices of one fused
    projection's rows (its row strides), eagerly and replayed from a CUDA graph; same tokens as unfused."""
    from linearize.decoding import fuse_projections

    from .test_decoding import greedy_tokens

    model = family_models("llama", window, [], torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 512, (3, 70), generator=torch.Generator().manual_seed(3)).cuda()
    logits, tokens = model(ids).logits, greedy_tokens(model, ids, steps=40)
    assert fuse_projections(model) > 0
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_tokens(model, ids, steps=40), tokens)
    assert torch.equal(greedy_tokens(model, ids, steps=40, cuda_graph=True), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_split_window_forward_matches_float64_on_gpu(D, dtype, monkeypatch):
    """The forward with the window as its own kernel (liger/window_fwd_triton.py; the models above
    have heads of 16 and 24, which keep it inside the sweep): batched with per-sequence rotary
    tables, and packed, GQA 2, against the float64 PyTorch form (fp32 < 1e-4, bf16 < 5e-3), and
    against the window kept inside the sweep."""
    from linearize.kernels import liger_attention
    from linearize.kernels.gla import chunk_triton

    from .test_kernels_triton import rope

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(5)
    packed = torch.tensor([0, 70, 71, 650], dtype=torch.int32, device="cuda")
    for B, T, cu in ((2, 650, None), (1, 650, packed)):
        q = torch.randn(B, T, 4, D, device="cuda", generator=g).to(dtype)
        k, v = (torch.randn(B, T, 2, D, device="cuda", generator=g).to(dtype) for _ in range(2))
        cos, sin = (x.cuda() for x in rope(B, T, D))
        kw = dict(window=64, mix=0.5, cos=cos, sin=sin, cu_seqlens=cu)
        split, _ = liger_attention(q, k, v, backend="triton", **kw)
        monkeypatch.setattr(chunk_triton, "FORWARD_LAUNCH", {"split_window": 0})
        inside, _ = liger_attention(q, k, v, backend="triton", **kw)
        monkeypatch.setattr(chunk_triton, "FORWARD_LAUNCH", {})
        ref, _ = liger_attention(q.double(), k.double(), v.double(), backend="torch",
                                 **dict(kw, cos=cos.double(), sin=sin.double()))
        tol = 1e-4 if dtype == torch.float32 else 5e-3
        assert split.dtype == dtype
        assert relative_error(split.double(), ref) < tol, (B, D)
        assert relative_error(split.double(), inside.double()) < tol, (B, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_segmented_sequences_match_whole_ones_on_gpu(D, dtype, monkeypatch):
    """liger/segmented.py (sequences cut into segments run side by side) against the one-program-per-
    sequence kernels: outputs, final state and gradients, at a length with several segments: 512 rows
    and the rows segment_length chooses."""
    from linearize.kernels import liger_attention
    from linearize.kernels.liger import segmented

    from .test_kernels_triton import rope

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(3)
    B, T, Hq, Hkv = 2, 2000, 4, 2
    q, do = (torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    h0, dht = (torch.randn(B, Hq, D, D, device="cuda", generator=g) * 0.3 for _ in range(2))
    cos, sin = (x.cuda() for x in rope(1, T, D))

    def run(rows: int):
        monkeypatch.setattr(segmented, "SEGMENT_LEN", rows)
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
        o, s = liger_attention(*xs[:3], initial_state=xs[3], output_final_state=True, cos=cos, sin=sin, backend="triton")
        loss = (o.float() * do.float()).sum() + (s * dht).sum()
        return [o, s, *torch.autograd.grad(loss, xs)]

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    whole = run(0)
    assert segmented._pick(B * Hq, T, D, torch.cuda.get_device_properties(0).multi_processor_count) is not None
    for rows in (512, None):  # ragged segments of 512 rows, then the rule's own (near-equal, shorter)
        for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dh0"), run(rows), whole, strict=True):
            assert relative_error(a.float(), b.float()) < tol, (rows, name)


@pytest.mark.parametrize("target", ["hedgehog", "gdn", "gsa", "mamba2"])
@torch.no_grad()
def test_cuda_graph_decode_of_other_targets(stories_path, tmp_path, target):
    """Their PyTorch decode steps write the rings through index_copy_ (tensor indexing would sync and
    could not be recorded): graphed tokens equal eager ones."""
    from .test_decoding import greedy_tokens

    out = convert(str(stories_path), tmp_path / "out", target=target, window=16, slots=4)
    model = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(4)).cuda()
    assert torch.equal(greedy_tokens(model, ids, steps=30, cuda_graph=True), greedy_tokens(model, ids, steps=30))


@torch.no_grad()
def test_greedy_generate_with_a_cuda_graph_equals_generate(family_models):
    from linearize.decoding import greedy_generate

    model = family_models("llama", 16, [], torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 512, (3, 50), generator=torch.Generator().manual_seed(5)).cuda()
    assert torch.equal(greedy_generate(model, ids, 40), model.generate(ids, max_new_tokens=40, do_sample=False))


@pytest.mark.parametrize("D, slots, dtype", [(64, 64, "float32"), (128, 64, "float32"), (128, 64, "bfloat16")])
def test_gsa_slot_scores_kernel_matches_the_chunked_form_on_gpu(D, slots, dtype):
    """gsa's chunked slot-scores kernels on the GPU against the chunked PyTorch pass (float64 of the
    same inputs): scores, final keys and the five gradients, at a model's sizes (two slot blocks at
    D 128). Relative error: fp32 < 1e-4. bf16 phi(q), phi(k): the products run in bf16 (the state
    rounded to 8 bits, as fla's chunk_gsa does) and the maps' gradients come back in bf16: < 1e-2;
    the gates' gradient, a reverse cumulative sum over T of s ds - u du (two nearly cancelling
    terms): < 3e-2 (measured 1.29e-2 on an H200)."""
    import torch.nn.functional as F  # noqa: PLC0415

    from linearize.kernels.gsa.chunk import slot_scores  # noqa: PLC0415
    from linearize.kernels.gsa.chunk_triton import slot_scores_chunked_triton  # noqa: PLC0415

    g = torch.Generator(device="cuda").manual_seed(D)
    B, T, H = 2, 300, 4
    maps_dtype = getattr(torch, dtype)
    fq, fk = (torch.randn(B, T, H, D, device="cuda", generator=g).softmax(-1).to(maps_dtype) for _ in range(2))
    log_gate = F.logsigmoid(torch.randn(B, T, H, slots, device="cuda", generator=g) * 3) / 4
    write, keys0 = -torch.expm1(log_gate), torch.randn(B, H, slots, D, device="cuda", generator=g)
    d_scores, d_keys = torch.randn(B, T, H, slots, device="cuda", generator=g), torch.randn_like(keys0)

    def run(fn, maps, rest):
        xs = [fq.to(maps), fk.to(maps), *(x.to(rest) for x in (write, log_gate, keys0))]
        xs = [x.requires_grad_() for x in xs]
        scores, keys = fn(*xs)
        loss = (scores * d_scores.to(scores.dtype)).sum() + (keys * d_keys.to(keys.dtype)).sum()
        return [scores, keys, *torch.autograd.grad(loss, xs)]

    for name, a, b in zip(("scores", "keys", "dq", "dk", "du", "dlog_gate", "dkeys0"),
                          run(slot_scores_chunked_triton, maps_dtype, torch.float32),
                          run(slot_scores, torch.float64, torch.float64), strict=True):
        tol = 1e-4 if dtype == "float32" else 3e-2 if name == "dlog_gate" else 1e-2
        assert relative_error(a.double(), b) < tol, name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("D", [64, 128])
def test_gdn_delta_rule_kernel_matches_the_chunked_form_on_gpu(D, autocast):
    """gdn's chunk kernels on the GPU (terms_triton.py, chunk_triton.py's sweep) against the chunked
    PyTorch form (float64): outputs, final state and the six gradients, at a model's sizes (several
    value blocks at D 128). Relative error < 1e-4; under bf16 autocast their fp32 products take one
    TF32 pass (chunk_triton.dot_precision): < 5e-3."""
    import torch.nn.functional as F  # noqa: PLC0415

    from linearize.kernels.gdn.chunk import gated_delta_chunked  # noqa: PLC0415
    from linearize.kernels.gdn.chunk_triton import gated_delta_chunked_triton  # noqa: PLC0415

    g = torch.Generator(device="cuda").manual_seed(D)
    B, T, H = 2, 300, 4
    q, k = (F.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1) for _ in range(2))
    v, state = torch.randn(B, T, H, D, device="cuda", generator=g), torch.randn(B, H, D, D, device="cuda", generator=g)
    log_gate = F.logsigmoid(torch.randn(B, T, H, D, device="cuda", generator=g) * 3) / 4
    beta = torch.sigmoid(torch.randn(B, T, H, device="cuda", generator=g))
    do, dh = torch.randn_like(v), torch.randn_like(state)

    def run(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, log_gate, beta, state)]
        o, s = fn(*xs)
        return [o, s, *torch.autograd.grad((o * do.to(dtype)).sum() + (s * dh.to(dtype)).sum(), xs)]

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        got = run(gated_delta_chunked_triton, torch.float32)
    tol = 5e-3 if autocast else 1e-4
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dlog_gate", "dbeta", "dstate"),
                          got, run(gated_delta_chunked, torch.float64), strict=True):
        assert relative_error(a.double(), b) < tol, name


def test_cached_launches_recompile_for_misaligned_and_other_dtypes_on_gpu():
    """kernels/launch.py reuses a compiled kernel only for arguments Triton would specialise alike: the
    Liger layer on 16-byte-aligned inputs, then on the same values at an odd element offset (Triton
    compiles a form without aligned vector loads), then in fp16, then aligned again, each against the
    float64 PyTorch form (outputs < 5e-3, gradients < 1e-2)."""
    from linearize.kernels import liger_attention
    from linearize.kernels.gla import chunk_triton
    from linearize.kernels.launch import fast

    from .test_kernels_triton import rope

    g = torch.Generator(device="cuda").manual_seed(11)
    B, T, Hq, Hkv, D = 1, 200, 4, 2, 64
    # bf16 values: every dtype below holds them exactly, so only the arithmetic differs
    values = [torch.randn(B, T, h, D, device="cuda", generator=g).bfloat16().float() for h in (Hq, Hkv, Hkv, Hq)]
    cos, sin = (x.cuda() for x in rope(1, T, D))

    def at_offset(x: torch.Tensor, dtype: torch.dtype, offset: int) -> torch.Tensor:
        flat = torch.empty(x.numel() + offset, device="cuda", dtype=dtype)
        out = flat[offset:].view(x.shape)  # contiguous: the wrappers pass it on as it is
        out.copy_(x)
        assert (out.data_ptr() % 16 == 0) == (offset == 0)
        return out

    def grads(dtype, offset, backend):
        q, k, v, do = (at_offset(x, dtype, offset).requires_grad_(i < 3) for i, x in enumerate(values))
        tables = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
        o, _ = liger_attention(q, k, v, window=64, cos=tables[0], sin=tables[1], backend=backend)
        return [o, *torch.autograd.grad(o, (q, k, v), do)]

    ref = grads(torch.float64, 0, "torch")
    for dtype, offset in ((torch.bfloat16, 0), (torch.bfloat16, 1), (torch.float16, 3), (torch.bfloat16, 0)):
        got = grads(dtype, offset, "triton")
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
            assert relative_error(a.double(), b) < (5e-3 if name == "o" else 1e-2), (dtype, offset, name)
    # q is the forward kernel's first argument: one compiled entry per (dtype, alignment) it met
    q_keys = {key[0][0] for key in fast(chunk_triton.gla_fwd_kernel).compiled}
    assert {(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)} <= q_keys


@pytest.mark.parametrize(("rows", "loss", "kept"), [(None, "lm", None), (16, "lm", None), (None, "lm+kd", [0])],
                         ids=["whole", "segments-of-16", "kept-layer-lm+kd"])
def test_cuda_graph_recovery_matches_eager_on_gpu(family_source, tmp_path, monkeypatch, rows, loss, kept):
    """`recover --cuda-graph`: every full micro-batch's pass replays one recorded CUDA graph and the budget's
    cut-short last block runs eagerly; tokens, losses step by step and the adapter match an eager run's.
    Also with the sequences cut into segments (liger/segmented.py), whose layouts are cached tensors, and
    with softmax inside the graph: a layer kept as attention, and the kd teacher (LoRA off, softmax)."""
    import json

    from linearize.kernels.liger import segmented
    from linearize.recover.options import RecoverOptions
    from linearize.recover.trainer import recover

    from .test_recover import STORIES_TEXT, assert_same_training

    monkeypatch.setattr(segmented, "SEGMENT_LEN", rows)

    replays = {"n": 0}
    real_replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays["n"] += 1
        return real_replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    ckpt = convert(str(family_source("llama")), tmp_path / "gla", window=16, keep_attention=kept)
    common = dict(ckpt=str(ckpt), data=str(STORIES_TEXT), seq_len=64, micro_batch=2, grad_accum=2, tokens=10 * 4 * 64 + 40, loss=loss,
                  eval_every=4, save_every=1000, lr=1e-3, warmup_ratio=0.0, val_blocks=2, device="cuda")
    eager = recover(RecoverOptions(out=tmp_path / "eager", **common))
    assert replays["n"] == 0
    graphed = recover(RecoverOptions(out=tmp_path / "graphed", cuda_graph=True, **common))
    assert replays["n"] == 10 * 2  # two full passes a step for ten steps; the 40-token block ran eagerly
    one, two = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (eager, graphed))
    assert len(one) == 11 and [r.get("val_loss") is None for r in one] == [r.get("val_loss") is None for r in two]
    assert_same_training(eager, graphed, weights_rtol=1e-3, weights_atol=1e-5)
