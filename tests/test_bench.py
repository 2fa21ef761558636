"""`linearize bench` on CPU: schema, cache sizes against what the cache really holds, OOM rows, errors.

Nothing here asserts a speed: timings on a shared CPU say nothing; the GPU figures come from
benchmarks/decode.py.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from rich.console import Console

from linearize.bench import BenchOptions, Run, Side, bench_sides, parse_sizes, render, speedups
from linearize.cache import CACHE_KWARG
from linearize.errors import LinearizeError
from linearize.loading import load_causal_lm

from .helpers import run_cli

STORIES = Path(__file__).parent / "fixtures" / "stories260k"
CPU = torch.device("cpu")


def small(**kw) -> BenchOptions:
    return BenchOptions(checkpoint=str(STORIES), **{"batches": [1, 2], "contexts": [8, 40], "new_tokens": 3,
                                                     "prefill_chunk": 16, **kw})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from linearize.convert import convert

    return convert(str(STORIES), tmp_path_factory.mktemp("bench") / "conv", console=Console(quiet=True))


def test_parse_sizes():
    assert parse_sizes("1k, 4k,16,32K", "--context") == [1024, 4096, 16, 32768]
    for bad in ("", "x", "0", "1k,-2"):
        with pytest.raises(LinearizeError):
            parse_sizes(bad, "--context")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_model_kv_bytes_match_its_cache(dtype):
    model = load_causal_lm(str(STORIES), dtype, CPU)
    opts = small()
    report = bench_sides([Side("model", "stories", model, nullcontext, softmax=True)], opts, CPU)
    rows = report["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 8), (1, 40), (2, 8), (2, 40)]
    cfg, item = model.config, torch.finfo(dtype).bits // 8
    for r in rows:
        assert r["status"] == "ok"
        tokens = r["context"] + opts.new_tokens  # prefill + every decoded step stays in the cache
        # 5 layers x (K and V) x 4 kv heads x head_dim 8 per token, computed by hand from config.json
        assert r["kv_bytes"] == r["batch"] * tokens * cfg.num_hidden_layers * 2 * 4 * 8 * item
        assert r["cache_bytes_measured"] == r["kv_bytes"] and r["state_bytes"] == 0
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_step_ms"] > 0
        assert r["prefill_peak_bytes"] > 0 and r["decode_peak_bytes"] > 0
    meta = report["meta"]
    assert meta["device"].startswith("cpu") and meta["dtype"] == str(dtype).removeprefix("torch.")
    assert meta["bandwidth_bytes_s"] > 0 and report["models"]["model"]["floor_ms"] > 0


def test_converted_state_is_flat_and_teacher_keeps_kv(converted):
    from linearize import teacher

    model = load_causal_lm(str(converted), torch.float32, CPU)
    sides = [Side("model", "conv", model, nullcontext, softmax=False),
             Side("reference", "teacher", model, lambda: teacher(model), softmax=True)]
    report = bench_sides(sides, small(), CPU)
    by = {(r["model"], r["batch"], r["context"]): r for r in report["rows"]}
    assert len(by) == 8
    for batch in (1, 2):
        short, long = by[("model", batch, 8)], by[("model", batch, 40)]
        # per sequence and layer: fp32 state 4 kv heads x 8 x 8 x 4 B (shared by each group's two
        # query heads), plus a 64-slot ring of K and V (4 kv heads x 8 x 4 B each) and its validity byte per slot
        per_layer = 4 * 8 * 8 * 4 + 64 * (2 * 4 * 8 * 4 + 1)
        assert short["state_bytes"] == long["state_bytes"] == batch * 5 * per_layer
        assert short["kv_bytes"] == long["kv_bytes"] == 0
        assert short["cache_bytes_measured"] == long["cache_bytes_measured"] == short["state_bytes"]
        ref = by[("reference", batch, 40)]
        assert ref["state_bytes"] == 0 and ref["kv_bytes"] == ref["cache_bytes_measured"] > 0
    assert set(speedups(report)) == {(1, 8), (1, 40), (2, 8), (2, 40)}


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch):
    model = load_causal_lm(str(STORIES), torch.float32, CPU)
    forward = model.forward

    def limited(*args, **kwargs):  # pretend the device runs out beyond 20 cached tokens
        cache = kwargs.get(CACHE_KWARG)
        if cache is not None and cache.get_seq_length() > 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", limited)
    report = bench_sides([Side("model", "stories", model, nullcontext, softmax=True)], small(batches=[1]), CPU)
    ok, oom = report["rows"]
    assert ok["status"] == "ok" and ok["context"] == 8
    assert oom["status"] == "OOM" and oom["decode_tok_s"] is None
    console = Console(record=True, width=200)
    render(report, console)
    assert "OOM" in console.export_text()


def test_options_errors():
    with pytest.raises(LinearizeError, match="pass one of them"):
        small(teacher=True, compare="x")
    with pytest.raises(LinearizeError, match=r"ending in \.png"):
        small(plot_out=Path("out.jpg"))


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli(["bench", STORIES, "--compare", STORIES, "--batch", "1", "--context", "8,24",
                                    "--new-tokens", "2", "--json", out], capsys)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert set(report) == {"rows", "models", "meta"}
    assert {r["model"] for r in report["rows"]} == {"model", "reference"} and len(report["rows"]) == 4
    assert report["models"]["reference"]["source"] == str(STORIES)
    assert "device" in report["meta"] and "weight-read floor" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "one"], "--batch 'one' is not a number"),
    (["--teacher"], "teacher mode needs a model converted by linearize"),
    (["--plot", "x.png"], "--plot needs matplotlib"),
])
def test_cli_bad_input_is_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
    code, _, stderr = run_cli(["bench", STORIES, "--context", "8", "--batch", "1", "--new-tokens", "1", *args], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and message in lines[0], stderr


def test_decode_holds_no_prefill_logits(converted):
    """Prefill asks for the last position's logits only, and decode keeps just [B, vocab] of them:
    full-chunk logits held through decode once made a converted model's memory grow with context."""
    model = load_causal_lm(str(converted), torch.float32, CPU)
    run = Run(model)
    assert run.extra == {"logits_to_keep": 1}  # reaches the source forward through the converted class's **kwargs
    with torch.inference_mode():
        run.prefill(torch.zeros(2, 24, dtype=torch.long), chunk=16)
        assert run.logits.shape == (2, 512)
        assert run.logits.untyped_storage().nbytes() == 2 * 512 * 4
        assert not run.start_decode(cuda_graph=True)  # no CUDA here: eager steps
        run.decode(2)
    assert run.cache.get_seq_length() == 26


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (that folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_branch_scale_reports_every_layer():
    """benchmarks/branch_scale.py (the quality finding's diagnostic) on the fixture: one row per layer,
    gates in (0, 1], and the GLA/window ratio for each position bucket the text reaches."""
    module = load_benchmark("branch_scale")
    text = (Path(__file__).parent / "fixtures" / "text" / "story.txt").read_text()
    rows = module.measure(str(STORIES), text, 100)
    assert len(rows) == 5 and [r["layer"] for r in rows] == list(range(5))
    for r in rows:
        assert 0 < r["mean_alpha"] <= 1 and 0 <= r["above_0_999"] <= r["above_0_99"] <= 1
        assert set(r["gla_over_window"]) == {"0-64", "64-256"} and all(x > 0 for x in r["gla_over_window"].values())


def test_recover_throughput_interleaves_trials_and_reports_medians(tmp_path, monkeypatch):
    """benchmarks/recover_throughput.py on the fixture (CPU): every row timed once per trial, in turn,
    each row's figure the median of its trials, the ratio of the medians and each trial's own ratio;
    the Triton-launch row switches kernels/launch.py off only while it runs."""
    from linearize.kernels import launch

    module = load_benchmark("recover_throughput")
    seen = []
    timed = module.tokens_per_second
    monkeypatch.setattr(module, "tokens_per_second", lambda *a: seen.append(launch.ENABLED) or timed(*a))
    out = tmp_path / "rt.json"
    monkeypatch.setattr(sys, "argv", ["recover_throughput.py", "--source", str(STORIES), "--seq-lens", "16",
                                      "--tokens-per-step", "32", "--steps", "1", "--trials", "3", "--triton-launch",
                                      "--json", str(out)])
    module.main()
    row = json.loads(out.read_text())["rows"][0]
    assert seen == [True, True, False] * 3 and launch.ENABLED
    for label in ("softmax", "gla", "gla triton launch"):
        assert len(row["trials"][label]) == 3 and row[label] == sorted(row["trials"][label])[1] > 0
    assert row["ratio"] == row["gla"] / row["softmax"]
    assert row["trial_ratios"] == [g / s for g, s in zip(row["trials"]["gla"], row["trials"]["softmax"], strict=True)]


def test_step_phases_orders_the_phases_and_bounds_the_attention_time(tmp_path, monkeypatch):
    """benchmarks/step_phases.py on the fixture (CPU, no GPU columns): per model and shape, the phases
    end in order, and the attention modules' host time fits inside the forward and backward phases
    (their hooks are registered once per model, not once per shape)."""
    module = load_benchmark("step_phases")
    out = tmp_path / "phases.json"
    monkeypatch.setattr(sys, "argv", ["step_phases.py", "--source", str(STORIES), "--shapes", "16x2,32x1",
                                      "--steps", "2", "--json", str(out)])
    module.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["seq_len"], r["batch"]) for r in rows] == [
        ("softmax", 16, 2), ("softmax", 32, 1), ("gla", 16, 2), ("gla", 32, 1)]
    for r in rows:
        host, attention = r["host_ms"], r["attention_host_ms"]
        assert r["gpu_ms"] is None
        assert 0 <= host["copy"] <= host["forward"] <= host["backward"] <= host["optimizer"]
        assert 0 < attention["forward"] < host["forward"] - host["copy"]
        assert 0 < attention["backward"] < host["backward"] - host["forward"]


def test_compile_and_fuse_options_change_each_model_once(converted, monkeypatch):
    """`--compile` and `--fuse`: the teacher side shares the model's modules, so one compile_dense_parts
    and one fuse_projections call, fusing first (the tokens are checked in test_decoding.py); the
    report says they were on."""
    import linearize.bench as bench
    from linearize import teacher

    calls = []
    monkeypatch.setattr(bench, "compile_dense_parts", lambda m, mode: calls.append(("compile", m)))
    monkeypatch.setattr(bench, "fuse_projections", lambda m: calls.append(("fuse", m)))
    model = load_causal_lm(str(converted), torch.float32, CPU)
    sides = [Side("model", "conv", model, nullcontext, softmax=False),
             Side("reference", "teacher", model, lambda: teacher(model), softmax=True)]
    report = bench_sides(sides, small(compile=True, fuse=True, batches=[1], contexts=[8]), CPU)
    assert calls == [("fuse", model), ("compile", model)]
    assert report["meta"]["compiled_norms_and_mlp"] is True and report["meta"]["fused_projections"] is True
    meta = bench_sides(sides[:1], small(batches=[1], contexts=[8]), CPU)["meta"]
    assert not meta["compiled_norms_and_mlp"] and not meta["fused_projections"]


@pytest.mark.parametrize(("T", "q_heads", "kv_heads"), [(200, 4, 2), (64, 2, 2), (130, 2, 1), (5, 1, 1)])
def test_blocked_window_baseline_equals_the_band_mask(T, q_heads, kv_heads):
    """kernels.py --swa block (baseline (a)'s window at 16K, where a [T, T] band mask does not fit)
    computes the same attention as SDPA under the band mask, in float64."""
    import torch.nn.functional as F

    block_window_attention = load_benchmark("kernels").block_window_attention
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, q_heads, T, 16, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, kv_heads, T, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=q_heads != kv_heads)
    torch.testing.assert_close(block_window_attention(q, k, v, window=64), expected, rtol=1e-12, atol=1e-12)


def test_quality_merge_joins_rows_run_apart_and_refuses_other_data(tmp_path):
    """benchmarks/quality.py --merge: rows measured side by side (one GPU each) become one table with one
    teacher row and recovered % against it; a file recovered on other data is refused."""
    import argparse
    import json

    quality = load_benchmark("quality")
    args = argparse.Namespace(tokens="10M", seq_len=1024, eval_context=1024, limit=250, ppl_max_tokens=32768, seed=0,
                              data="/a/alpaca_5000.json,/a/tinystories_valid.txt")

    def row(name: str, average: float) -> dict:
        return {"row": name, "average": average}

    meta = {**quality.shared_settings(args), "data": "/b/tinystories_valid.txt, /b/alpaca_5000.json", "command": "c"}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"meta": meta, "rows": [row(quality.TEACHER, 0.5), row(quality.ROWS[1][0], 0.45)]}))
    second.write_text(json.dumps({"meta": meta, "rows": [row(quality.TEACHER, 0.5), row(quality.ROWS[4][0], 0.4)]}))
    results, commands = quality.merged([second, first], args)
    assert [r["row"] for r in results] == [quality.TEACHER, quality.ROWS[1][0], quality.ROWS[4][0]]
    assert [round(r["recovered_pct"], 6) for r in results] == [100.0, 90.0, 80.0] and commands == ["c", "c"]
    second.write_text(json.dumps({"meta": {**meta, "data": "/b/alpaca_5000.json"}, "rows": []}))
    with pytest.raises(SystemExit, match="other settings \\(data\\)"):
        quality.merged([first, second], args)


def test_quality_script_runs_end_to_end_on_the_fixture(tmp_path, monkeypatch):
    """benchmarks/quality.py on the fixture model (CPU, tiny budget): the teacher, Liger-GLA before and
    after recovery on mixed data, then --extend adds an ablation; every row has every column, the
    recovered rows their exact token budget, decode agrees with the parallel pass, and hand-written
    notes below the marker survive the rewrite."""
    import json
    import shutil
    import sys

    quality = load_benchmark("quality")
    fixtures = Path(__file__).parent / "fixtures"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for source, names in {"lambada_stories": ["lambada_openai"], "mc_stories": ["arc_easy", "arc_challenge", "piqa"],
                          "schema_stories": ["winogrande"]}.items():
        for name in names:
            shutil.copy(fixtures / "tasks" / f"{source}.jsonl", tasks / f"{name}.jsonl")
    out, js = tmp_path / "results.md", tmp_path / "results.json"
    common = ["quality.py", "--source", str(fixtures / "stories260k"), "--tokens", "2K", "--seq-len", "64",
              "--micro-batch", "2", "--limit", "3", "--task-dir", str(tasks), "--ppl-file",
              str(fixtures / "text" / "story.txt"), "--ppl-max-tokens", "256", "--eval-context", "64",
              "--data", f"{fixtures / 'data' / 'alpaca_60.json'},{fixtures / 'data' / 'tinystories.txt'}",
              "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--json", str(js)]
    monkeypatch.setattr(sys, "argv", [*common, "--rows", "1,2"])
    quality.main()
    out.write_text(out.read_text() + f"\n{quality.NOTES}\nhand-written finding\n")
    monkeypatch.setattr(sys, "argv", [*common, "--rows", "3", "--extend"])
    quality.main()
    rows = json.loads(js.read_text())["rows"]
    assert [r["row"] for r in rows] == [quality.TEACHER, *(quality.ROWS[i][0] for i in range(3))]
    assert [r["tokens"] for r in rows] == [0, 0, 2000, 2000]
    assert rows[0]["recovered_pct"] == 100.0
    for r in rows:
        assert all(0.0 <= r[t] <= 1.0 for t in quality.TASKS) and r["wikitext2_ppl"] > 1
    assert all(r["decode_rel_err"] < 1e-4 for r in rows[1:])
    text = out.read_text()
    assert text.count("\n| ") == 1 + len(rows) and "hand-written finding" in text  # the header, then a line per row
    assert "alpaca_60.json + tinystories.txt" in text


def test_targets_benchmark_shortens_autotune_lists_only_inside():
    """targets.py --fla-configs: autotuners built inside the context keep the N configurations nearest
    4 warps / 2 stages, and the patch is undone on leaving it (fla's kernels autotune for minutes)."""
    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    module = load_benchmark("targets")
    configs = [triton.Config({"B": b}, num_warps=w, num_stages=n) for b in (16, 32) for w in (2, 4, 8) for n in (1, 2, 3)]

    def build():
        return Autotuner(_noop_kernel, ["x"], configs, key=[], reset_to_zero=None, restore_value=None)

    with module.shortened_autotune(3):
        kept = build().configs
    assert [(c.num_warps, c.num_stages) for c in kept] == [(4, 2), (4, 2), (4, 1)]
    assert {c.kwargs["B"] for c in kept[:2]} == {16, 32}
    assert len(build().configs) == len(configs)
    with module.shortened_autotune(None):
        assert len(build().configs) == len(configs)


def _noop_kernel(x):  # what the autotuner wraps; never launched here
    return x

