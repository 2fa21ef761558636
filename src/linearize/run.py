"""`linearize run`: a recipe's stages in one run folder, skipped when finished, resumed when cut.

RUN/
  recipe.yaml        the resolved recipe (defaults filled, overrides applied, absolute paths)
  state.json         per stage: done or not, its fingerprint, wall time, attempts
  run.log            one line per event; logs/STAGE.log holds each stage's console output
  convert/           converted checkpoint
  recover/           adapter, metrics.jsonl, stages.json and merged/ (.recover.partial while training)
  eval/              converted.json (converted vs teacher) and recovered.json
  bench/             bench.json (only with a bench section)
  report.md          teacher vs converted vs recovered, with tokens and wall time

A stage's fingerprint covers its own section and the stages it reads from, so changing a
setting reruns that stage and the ones after it; everything else is kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from .errors import LinearizeError
from .recipe import Recipe, dump, resolved

UPSTREAM = {"convert": None, "recover": "convert", "eval": "recover", "bench": "recover"}
# Settings that change where or how fast a stage runs, not what it produces: changing them keeps the stage.
NEUTRAL = {"device", "save_every", "nproc"}


class RunInterrupted(LinearizeError):
    exit_code = 130


class Layout:
    """Where everything lives inside the run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipe, self.state, self.log, self.report = (self.root / n for n in
                                                          ("recipe.yaml", "state.json", "run.log", "report.md"))
        self.logs = self.root / "logs"
        self.convert, self.recover, self.eval, self.bench = (self.root / n for n in ("convert", "recover", "eval", "bench"))
        self.merged = self.recover / "merged"

    def outputs(self, stage: str) -> list[Path]:
        from .recover.trainer import workdir_for

        extra = [workdir_for(self.recover)] if stage == "recover" else []
        return [getattr(self, stage), *extra]


def fingerprints(recipe: Recipe) -> dict[str, str]:
    out: dict[str, str] = {}
    for stage in recipe.stages():
        section = getattr(recipe, stage).model_dump(mode="json", exclude=NEUTRAL)
        text = json.dumps([section, out.get(UPSTREAM[stage] or "", "")], sort_keys=True)
        out[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


class Run:
    def __init__(self, recipe: Recipe, console: Console | None = None, command: str = "linearize run"):
        self.recipe = resolved(recipe)
        self.layout = Layout(self.recipe.folder)
        self.console = console or Console(stderr=True, record=True)
        self.command = command
        self.state: dict[str, dict[str, Any]] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def event(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.layout.log, "a") as f:
            f.write(f"{stamp} {text}\n")

    def save_state(self) -> None:
        tmp = self.layout.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.layout.state)  # atomic: a crash never leaves half a state file

    def open_folder(self) -> None:
        root = self.layout.root
        if root.exists() and any(root.iterdir()) and not self.layout.state.exists():
            raise LinearizeError(f"{root} exists and is not a run folder: set run_dir to a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.layout.state.read_text()) if self.layout.state.exists() else {}
        for stage, fp in fingerprints(self.recipe).items():
            old = self.state.get(stage)
            if old is not None and old["fingerprint"] != fp:  # the recipe changed what this stage makes
                self.console.print(f"[yellow]recipe changed for {stage}[/]: it runs again")
                self.event(f"{stage}: recipe changed, outputs removed")
                for path in self.layout.outputs(stage):
                    shutil.rmtree(path, ignore_errors=True)
                del self.state[stage]
            self.state.setdefault(stage, {"fingerprint": fp, "done": False, "seconds": 0.0, "attempts": 0})
        self.layout.recipe.write_text(dump(self.recipe))
        self.save_state()

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Path:
        self.open_folder()
        self.event(f"run started: {self.command}")
        stages = self.recipe.stages()
        for i, stage in enumerate(stages, 1):
            entry = self.state[stage]
            if entry["done"]:
                self.console.print(f"[dim]stage {i}/{len(stages)} {stage}: finished earlier, skipped[/]")
                self.event(f"{stage}: skipped (finished earlier)")
                continue
            self.console.rule(f"[bold]stage {i}/{len(stages)}: {stage}")
            self.run_stage(stage, getattr(self, f"stage_{stage}"), entry)
        write_report(self.recipe, self.layout, self.state)
        self.event("run finished: report.md written")
        self.console.print(f"[green]run finished[/]: {self.layout.report}")
        return self.layout.root

    def run_stage(self, stage: str, body: Callable[[], dict], entry: dict) -> None:
        self.event(f"{stage}: started (attempt {entry['attempts'] + 1})")
        entry["attempts"] += 1
        started = time.perf_counter()
        try:
            entry.update(body())
            entry["done"] = True
            self.event(f"{stage}: done in {time.perf_counter() - started:.1f} s")
        except Exception as e:
            from .recover.trainer import Interrupted

            if isinstance(e, Interrupted):  # recover saved a checkpoint on Ctrl-C
                self.cut(stage)
            self.event(f"{stage}: failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            raise
        except KeyboardInterrupt:
            self.cut(stage)
        finally:  # wall time counts every attempt, the cut ones included
            entry["seconds"] += time.perf_counter() - started
            self.save_state()
            self.layout.logs.mkdir(exist_ok=True)
            if self.console.record:
                with open(self.layout.logs / f"{stage}.log", "a") as f:
                    f.write(self.console.export_text(clear=True))

    def cut(self, stage: str) -> NoReturn:
        self.event(f"{stage}: interrupted")
        raise RunInterrupted(f"interrupted in stage {stage}: rerun `{self.command}` to resume it "
                             "(finished stages are kept)") from None

    # -- stages: each returns what the report needs -----------------------------------------------
    def stage_convert(self) -> dict:
        from .convert import convert_with
        from .options import ConvertOptions

        convert_with(ConvertOptions(**self.recipe.convert.model_dump(), out=self.layout.convert, overwrite=True),
                     command=self.command, console=self.console)
        return {}

    def stage_recover(self) -> dict:
        from .recover.options import RecoverOptions
        from .recover.trainer import CHECKPOINTS, recover, workdir_for

        # A cut run left checkpoints in the hidden work folder: continue from the last one.
        resume = any((workdir_for(self.layout.recover) / CHECKPOINTS).glob("step-*"))
        if resume:
            self.console.print("[cyan]resuming recover[/] from its last checkpoint")
        opts = RecoverOptions(**self.recipe.recover.model_dump(), ckpt=str(self.layout.convert),
                              out=self.layout.recover, merge=True, resume=resume, overwrite=not resume)
        recover(opts, self.console)  # with recover.nproc > 1 it runs under torchrun
        stages = json.loads((self.layout.recover / "stages.json").read_text())
        return {"tokens": sum(s["tokens"] for s in stages)}

    def stage_eval(self) -> dict:
        from .evaluate import EvalOptions, run_eval
        from .evaluate.report import render, write_json

        self.layout.eval.mkdir(exist_ok=True)
        # converted.json carries the teacher as its reference row; recovered.json the recovered model.
        for name, ckpt, teacher in (("converted", self.layout.convert, True), ("recovered", self.layout.merged, False)):
            target = self.layout.eval / f"{name}.json"
            if target.exists():
                self.console.print(f"[dim]eval of {name}: finished earlier, kept[/]")
                continue
            result = run_eval(EvalOptions(**self.recipe.eval.model_dump(), checkpoint=str(ckpt), teacher=teacher))
            render(result, self.console)
            write_json(result, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
        return {"tokens": sum(eval_tokens(self.layout.eval / f"{n}.json") for n in ("converted", "recovered"))}

    def stage_bench(self) -> dict:
        from . import bench
        from .evaluate.report import write_json

        section = self.recipe.bench.model_dump()
        plot = section.pop("plot")
        self.layout.bench.mkdir(exist_ok=True)
        opts = bench.BenchOptions(**section, checkpoint=str(self.layout.merged), teacher=True)
        report = bench.run_bench(opts)
        bench.render(report, self.console)
        write_json(report, self.layout.bench / "bench.json")
        if plot:
            bench.plot(report, self.layout.bench / "bench.png")
        return {}


def eval_tokens(path: Path) -> int:
    """Tokens scored for perplexity, both rows together (task items are counted in the report)."""
    meta = json.loads(path.read_text())["meta"]
    return sum(n or 0 for sides in meta.get("tokens", {}).values() for n in sides.values())


# ---- report.md ---------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _secs(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def quality_rows(converted: dict, recovered: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(row, metric, teacher, converted, recovered) for every number the evals produced."""
    out = []
    for name, pair in converted["perplexity"].items():
        rec = recovered["perplexity"].get(name, {}).get("model")
        out.append((f"ppl {name}", "ppl", pair["reference"], pair["model"], rec))
    for name, pair in converted["tasks"].items():
        ref, rec = pair["reference"] or {}, (recovered["tasks"].get(name) or {}).get("model") or {}
        for metric, value in pair["model"].items():
            out.append((f"{name} {metric}", metric, ref.get(metric), value, rec.get(metric)))
    return out


def write_report(recipe: Recipe, layout: Layout, state: dict[str, dict]) -> Path:
    from .evaluate.report import recovered as recovered_pct

    converted = json.loads((layout.eval / "converted.json").read_text())
    recovered = json.loads((layout.eval / "recovered.json").read_text())
    meta = converted["meta"]
    lines = [f"# {recipe.name}", "", recipe.description, "",
             f"Source `{recipe.convert.source}`, run folder `{layout.root}`, resolved recipe in `recipe.yaml`.",
             f"Evaluated on {meta['device']} ({meta['dtype']}), context {meta['context']}, "
             f"stride {meta['stride']}, task limit {meta['limit'] or 'none'}.", "",
             "## Teacher vs converted vs recovered", "",
             "| metric | teacher | converted | recovered | recovered % of teacher |", "|---|---:|---:|---:|---:|"]
    for row, metric, teacher, conv, rec in quality_rows(converted, recovered):
        pct = recovered_pct(metric, rec, teacher)
        lines.append(f"| {row} | {_num(teacher)} | {_num(conv)} | {_num(rec)} | {'' if pct is None else f'{pct:.1f}'} |")
    tokens = state["recover"].get("tokens", 0)
    lines += [f"| training tokens | pretrained | 0 | {tokens:,} | |",
              f"| wall time to make | | {_secs(state['convert']['seconds'])} | "
              f"{_secs(state['convert']['seconds'] + state['recover']['seconds'])} | |", "",
              "## Stages", "", "| stage | tokens | wall time | attempts | output |", "|---|---:|---:|---:|---|"]
    what = {"convert": "", "recover": "trained", "eval": "scored", "bench": ""}
    for stage in recipe.stages():
        entry = state[stage]
        n = entry.get("tokens")
        lines.append(f"| {stage} | {f'{n:,} {what[stage]}' if n else ''} | {_secs(entry['seconds'])} | "
                     f"{entry['attempts']} | `{stage}/` |")
    if recipe.bench is not None and (layout.bench / "bench.json").exists():
        lines += ["", *bench_lines(json.loads((layout.bench / "bench.json").read_text()))]
    text = "\n".join(lines) + "\n"
    layout.report.write_text(text)
    return layout.report


def bench_lines(report: dict) -> list[str]:
    lines = ["## Speed (recovered model vs teacher mode)", "",
             "| side | batch | context | status | prefill tok/s | decode tok/s | peak memory |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in report["rows"]:
        side = "recovered" if r["model"] == "model" else "teacher"
        peak = max(r["prefill_peak_bytes"] or 0, r["decode_peak_bytes"] or 0) / 2**30
        lines.append(f"| {side} | {r['batch']} | {r['context']} | {r['status']} | {r['prefill_tok_s'] or 0:,.0f} | "
                     f"{r['decode_tok_s'] or 0:,.0f} | {peak:.2f} GiB |")
    return lines


# ---- the plan (--dry-run): stages, token budgets, expected peak memory, output layout --------------

GIB = 2**30
BYTES_PER_TOKEN = 4  # rough bytes of English text per token, to size local data without tokenizing it
# Activations a transformer layer keeps for backward, in bytes per token per hidden unit at 16 bits
# (Korthikanti et al. 2022: 34·s·b·h, leaving out the 5·a·s²·b of softmax scores that converted layers lack).
ACTIVATION_BYTES = 34
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# Shapes of the shipped recipes' Hub models, for a plan made offline (the Hub's config.json wins when reachable).
KNOWN = {  # id: (model_type, hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied, positions)
    "meta-llama/Meta-Llama-3-8B": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 8192),
    "meta-llama/Llama-3.2-1B": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072),
    "mistralai/Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 128, 14336, 32000, False, 32768),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 131072),
    "Qwen/Qwen3-8B": ("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False, 40960),
}


def read_config(source: str) -> tuple[Any, str] | None:
    """(config, where it came from) without loading weights; None when it cannot be read."""
    from transformers import AutoConfig

    from .loading import split_source

    try:
        path, extra = split_source(source)
    except LinearizeError:
        return None
    for kwargs in ({"local_files_only": True}, {}):  # the cache first: no network wait when it is there
        try:
            return AutoConfig.from_pretrained(path, **extra, **kwargs), "config"
        except Exception:  # noqa: BLE001 - a plan without memory figures beats no plan
            if kwargs and source in KNOWN:
                return known_config(source), "built-in shapes (the Hub was not asked)"
    return None


def known_config(source: str):
    from transformers import AutoConfig

    kind, h, n, heads, kv, hd, inter, vocab, tied, pos = KNOWN[source]
    return AutoConfig.for_model(kind, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                num_key_value_heads=kv, head_dim=hd, intermediate_size=inter, vocab_size=vocab,
                                tie_word_embeddings=tied, max_position_embeddings=pos, dtype="bfloat16")


def parameter_count(cfg) -> int:
    """Parameters of a Llama / Mistral / Qwen2 / Qwen3 model from its config (conversion adds none)."""
    h, n, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    attn = h * (heads + 2 * kv) * hd + heads * hd * h
    if cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False):
        attn += (heads + 2 * kv) * hd
    layer = attn + 3 * h * cfg.intermediate_size + 2 * h + (2 * hd if cfg.model_type == "qwen3" else 0)
    return vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + n * layer + h


def lora_count(cfg, targets: list[str], r: int) -> int:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def _dtype_bytes(name: str, cfg) -> int:
    if name == "auto":
        name = str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch.")
    return DTYPE_BYTES.get(name, 4)


def size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"


def memory_plan(recipe: Recipe, cfg) -> list[tuple[str, int, str]]:
    """(stage, expected peak bytes, how it adds up) from the config alone."""
    import torch

    from .footprint import footprint

    params, h, n, vocab = parameter_count(cfg), cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    out = []
    conv_b = _dtype_bytes(recipe.convert.dtype, cfg)
    out.append(("convert", params * conv_b, f"{params / 1e6:,.1f}M params x {conv_b} B"))

    rc = recipe.recover
    cuda = rc.device.startswith("cuda") or (rc.device == "auto" and torch.cuda.is_available())
    train_b = 2 if cuda else 4  # recover trains in bfloat16 on a GPU, float32 on CPU (trainer.load)
    lora = lora_count(cfg, rc.lora_targets, rc.lora_r)
    tokens = rc.micro_batch * rc.seq_len
    act_per_layer = tokens * h * ACTIVATION_BYTES * train_b // 2
    acts = (n * tokens * h * train_b + act_per_layer) if rc.gradient_checkpointing else n * act_per_layer
    logits = tokens * vocab * 4 * 3 * (2 if rc.loss != "lm" else 1)  # fp32 logits, softmax, grad; x2 with a teacher
    weights = params * train_b
    out.append(("recover", weights + lora * 16 + acts + logits,  # LoRA: fp32 weight + grad + two Adam moments
                f"weights {size(weights)} + LoRA {lora / 1e6:.2f}M x 16 B {size(lora * 16)} + activations "
                f"{size(acts)} + logits {size(logits)} ({'cuda, bfloat16' if cuda else 'cpu, float32'})"))

    ev = recipe.eval
    context = ev.context or min(1024, getattr(cfg, "max_position_embeddings", 1024) or 1024)
    weights = params * (_dtype_bytes(ev.dtype, cfg) if ev.dtype != "auto" else max(conv_b, train_b))
    ev_logits = ev.batch_size * context * vocab * 4 * 2
    out.append(("eval", weights + ev_logits,
                f"weights {size(weights)} + logits of {ev.batch_size} x {context} tokens {size(ev_logits)}"))

    if recipe.bench is not None:
        b = recipe.bench
        kv = footprint(cfg).source_kv_bytes_per_token * max(b.batches) * (max(b.contexts) + b.new_tokens)
        weights = params * (_dtype_bytes(b.dtype, cfg) if b.dtype != "auto" else max(conv_b, train_b))
        out.append(("bench", weights + kv, f"weights {size(weights)} + teacher KV cache {size(kv)} "
                    f"at batch {max(b.batches)}, context {max(b.contexts)}"))
    return out


def _local_tokens(path: str) -> int | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size // BYTES_PER_TOKEN
    return None


def token_plan(recipe: Recipe) -> list[tuple[str, str]]:
    """(stage, what it reads or trains on, in tokens or items)."""
    rc, ev = recipe.recover, recipe.eval
    data = _local_tokens(rc.data)
    lines = []
    for stage in rc.stages:
        budget = rc.budget(stage)
        seq = rc.orient_seq_len if stage == "orient" else rc.seq_len
        if budget is not None:
            text = f"{budget:,} tokens"
        elif data is not None:
            text = f"{rc.epochs:g} epochs of {rc.data} ≈ {rc.epochs * data:,.0f} tokens (file size / {BYTES_PER_TOKEN})"
        else:
            text = f"{rc.epochs:g} epochs of {rc.data} (counted once tokenized)"
        lines.append((f"recover {stage}", f"{text}, blocks of {seq}"))
    for f in ev.ppl_files:
        size = _local_tokens(str(f)) or 0
        n = min(size, ev.max_tokens) if ev.max_tokens else size
        lines.append(("eval ppl", f"{f.name}: ≈ {n:,} tokens x 3 models"))
    for task in ev.tasks:
        lines.append(("eval task", f"{task}: {ev.limit or 'all'} items x 3 models"))
    for task in ev.harness:
        lines.append(("eval harness", f"{task}: {ev.limit or 'all'} items x 3 models (lm-evaluation-harness)"))
    if recipe.bench is not None:
        b = recipe.bench
        lines.append(("bench", f"batches {b.batches} x contexts {b.contexts} + {b.new_tokens} decode steps, 2 models"))
    return lines


def layout_lines(recipe: Recipe) -> list[str]:
    root = resolved(recipe).folder
    lines = [f"{root}/", "  recipe.yaml  state.json  run.log  logs/  report.md",
             "  convert/            converted checkpoint",
             "  recover/            adapter, metrics.jsonl, stages.json, merged/ (.recover.partial while training)",
             "  eval/               converted.json (with teacher), recovered.json"]
    if recipe.bench is not None:
        lines.append("  bench/              bench.json" + (", bench.png" if recipe.bench.plot else ""))
    return lines


def print_plan(recipe: Recipe, console: Console) -> None:
    from rich.table import Table

    stages = Table(title=f"plan: {recipe.name}", show_header=True)
    for col in ("stage", "reads / trains on"):
        stages.add_column(col)
    for stage, text in token_plan(recipe):
        stages.add_row(stage, text)
    console.print(f"stages: {' -> '.join(recipe.stages())}  (source {recipe.convert.source})")
    console.print(stages)
    found = read_config(recipe.convert.source)
    if found is None:
        console.print("[yellow]expected peak memory: unknown[/] (the source's config could not be read)")
    else:
        cfg, origin = found
        mem = Table(title=f"expected peak memory (estimate from the {origin})")
        for col in ("stage", "peak", "how it adds up"):
            mem.add_column(col, justify="right" if col == "peak" else "left")
        for stage, peak, how in memory_plan(recipe, cfg):
            mem.add_row(stage, size(peak), how)
        console.print(mem)
        console.print(f"[dim]activations: micro_batch x seq_len x hidden x layers x {ACTIVATION_BYTES} B at 16 bit "
                      "(x2 at 32 bit); LoRA: 16 B a parameter (weight, grad, two Adam moments)[/]")
    console.print("output layout:")
    for line in layout_lines(recipe):
        console.print(f"  {line}", highlight=False)
