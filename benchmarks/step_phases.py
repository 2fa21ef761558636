"""Where a LoRA training step's time goes: host against GPU at each phase, softmax against converted.

The models and training step of recover_throughput.py (same LoRA, optimizer, bf16 autocast, random
tokens), with a mark at each phase. Each timed step starts on an idle GPU. For each phase (the batch's copy, the forward with the
loss, the backward, the optimizer) it records when the host's call returned and, through CUDA
events, when the GPU got there, both from the step's start. Where the GPU reaches a point only
just after the host, the GPU waited on the host there; where it lags well behind, the host
waited on it. Hooks add the host time spent inside the attention modules: their forward calls,
and in the backward the span from the gradient of a module's output to that of its input. Means
over `--steps` steps; a table per shape, and JSON with the device name.

    python benchmarks/step_phases.py --source random:smollm2-135m --shapes 64x1,1024x16,4096x4 --json phases.json

On a CPU there are no events: the GPU columns are empty.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

PHASES = ("copy", "forward", "backward", "optimizer")


def recover_throughput():
    """benchmarks/recover_throughput.py, loaded by path (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location("recover_throughput", HERE / "recover_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_attention(model) -> dict[str, float]:
    """Host seconds inside the attention modules, summed over layers: forward calls, and in the
    backward from each module's output gradient to its input gradient (hooks run on the autograd thread)."""
    spent = {"forward": 0.0, "backward": 0.0}
    started = {}

    def before(module, args, kwargs):
        started[module] = time.perf_counter()

    def after(module, args, kwargs, output):
        spent["forward"] += time.perf_counter() - started[module]
        x, o = kwargs.get("hidden_states", args[0] if args else None), output[0]
        if torch.is_grad_enabled() and o.requires_grad and x is not None and x.requires_grad:
            mark = {}

            def output_grad(grad):  # tensor hooks return None: the gradient passes on unchanged
                mark["t"] = time.perf_counter()

            def input_grad(grad):
                spent["backward"] += time.perf_counter() - mark["t"]

            o.register_hook(output_grad)
            x.register_hook(input_grad)

    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.register_forward_pre_hook(before, with_kwargs=True)
            module.register_forward_hook(after, with_kwargs=True)
    return spent


def measure(rt, model, seq_len: int, batch: int, steps: int, device: torch.device, spent: dict) -> dict:
    """Mean host and GPU ms at which each phase ended, and the attention modules' host ms (`spent`:
    time_attention's sums for this model), through recover_throughput's step (`rt`)."""
    cuda = device.type == "cuda"
    marks: list | None = None  # (host time, CUDA event) at the step's start and after each phase

    def mark():
        if marks is not None:
            event = torch.cuda.Event(enable_timing=True) if cuda else None
            if event is not None:
                event.record()
            marks.append((time.perf_counter(), event))

    step, _ = rt.training_step(model, seq_len, seq_len * batch, device, mark=mark)
    for _ in range(3):  # warm-up: compilation, allocator
        step()
    host, gpu = [0.0] * len(PHASES), [0.0] * len(PHASES)
    spent.update(forward=0.0, backward=0.0)
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        marks = []
        step()
        if cuda:
            torch.cuda.synchronize()
        (t0, e0), rest = marks[0], marks[1:]
        for i, (t, e) in enumerate(rest):
            host[i] += (t - t0) * 1e3 / steps
            gpu[i] += e0.elapsed_time(e) / steps if cuda else 0.0
    return {"host_ms": dict(zip(PHASES, host, strict=True)), "gpu_ms": dict(zip(PHASES, gpu, strict=True)) if cuda else None,
            "attention_host_ms": {k: v * 1e3 / steps for k, v in spent.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="random:smollm2-135m", help="as in recover_throughput.py")
    p.add_argument("--shapes", default="64x1,1024x16,4096x4", help="SEQ_LENxBATCH, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per shape (means)")
    p.add_argument("--target", default="gla", help="the converted row's target")
    p.add_argument("--json", default="step_phases.json")
    args = p.parse_args()
    rt = recover_throughput()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for label, target in (("softmax", None), (args.target, args.target)):
        model = rt.build(args.source, target, device)
        spent = time_attention(model)
        for seq_len, batch in shapes:
            rows.append({"model": label, "seq_len": seq_len, "batch": batch,
                         **measure(rt, model, seq_len, batch, args.steps, device, spent)})
            print(json.dumps(rows[-1]), flush=True)  # a cut run keeps these
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    console = Console(width=200)
    for seq_len, batch in shapes:
        table = Table(title=f"{args.source} on {name}, {batch} x {seq_len} tokens a step: ms from the step's start, "
                            "host / GPU")
        for col in ("model", *PHASES, "attention fwd / bwd (host)"):
            table.add_column(col, justify="right")
        for r in (r for r in rows if (r["seq_len"], r["batch"]) == (seq_len, batch)):
            cells = [f"{r['host_ms'][ph]:.1f} / " + (f"{r['gpu_ms'][ph]:.1f}" if r["gpu_ms"] else "-") for ph in PHASES]
            attention = r["attention_host_ms"]
            table.add_row(r["model"], *cells, f"{attention['forward']:.1f} / {attention['backward']:.1f}")
        console.print(table)
    with open(args.json, "w") as f:
        json.dump({"device": name, "source": args.source, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
