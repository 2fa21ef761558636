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

from .errors import LinearizeError, first_line
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
            from .recover.trainer import Interrupted, Stopped

            if isinstance(e, (Interrupted, Stopped)):  # recover saved a checkpoint (Ctrl-C, --stop-after-steps)
                self.cut(stage)
            self.event(f"{stage}: failed: {first_line(e)}")
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
