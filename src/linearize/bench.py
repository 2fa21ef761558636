"""`linearize bench`: prefill and decode speed, peak memory and cache size against context length.

For each model (the checkpoint, and a reference: itself in teacher mode or another model),
each batch size and each context: a chunked prefill of `context` random tokens, then
`new_tokens` greedy decode steps on the cache it built. Timed with the device synchronised,
after an untimed warm-up per batch size. A configuration that runs out of memory becomes an
OOM row. The decode step is also set against a floor: the time to read every weight once at
the copy bandwidth measured on this device (decode of a small batch is memory-bound). On CUDA
a converted model's decode step is recorded once as a CUDA graph and replayed (decoding.py),
as a server would; `cuda_graph=False` times eager steps instead.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from rich.console import Console
from rich.table import Table

from .cache import CACHE_KWARG
from .decoding import GreedyDecoder, compile_dense_parts, fuse_projections, graph_blocker, last_logits_only
from .errors import LinearizeError
from .evaluate import device_name, versions
from .evaluate.scoring import progress_bar
from .footprint import footprint
from .loading import load_causal_lm, resolve_device, resolve_dtype

GIB = 2**30


def parse_sizes(text: str, what: str) -> list[int]:
    """"1k,4k,16384" -> [1024, 4096, 16384] (k = 1024)."""
    sizes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part.removesuffix("k")) * scale
        except ValueError:
            raise LinearizeError(f"{what} {part!r} is not a number: use e.g. 1,16 or 1k,4k") from None
        if value < 1:
            raise LinearizeError(f"{what} must be positive, got {part!r}")
        sizes.append(value)
    if not sizes:
        raise LinearizeError(f"no {what} given: use e.g. 1,16 or 1k,4k")
    return sizes


class BenchOptions(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: str
    compare: str | None = None
    teacher: bool = False
    batches: list[int] = [1, 16]
    contexts: list[int] = [1024, 4096, 16384, 32768]
    new_tokens: int = 256
    prefill_chunk: int = 4096  # tokens per prefill forward: bounds activation memory the way servers do
    cuda_graph: bool = True  # replay a recorded decode step where the cache allows it (CUDA, converted layers only)
    compile: bool = False  # torch.compile each layer's norms and MLP first (decoding.compile_dense_parts)
    compile_mode: str = "default"  # torch.compile's mode for that
    fuse: bool = False  # one GEMM for q/k/v and one for gate/up first (decoding.fuse_projections)
    device: str = "auto"
    dtype: str = "auto"
    json_out: Path | None = None
    plot_out: Path | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> BenchOptions:
        if self.teacher and self.compare:
            raise LinearizeError("--teacher and --compare both pick the reference: pass one of them")
        if self.new_tokens < 1 or self.prefill_chunk < 1:
            raise LinearizeError("--new-tokens and --prefill-chunk must be positive")
        if self.plot_out is not None and self.plot_out.suffix.lower() != ".png":
            raise LinearizeError(f"--plot writes a PNG: give a path ending in .png, not {self.plot_out}")
        return self


@dataclass
class Row:
    model: str  # "model" or "reference"
    batch: int
    context: int
    status: str = "ok"  # "ok" or "OOM"
    cuda_graph: bool = False  # decode steps replayed from a recorded CUDA graph
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_step_ms: float | None = None
    floor_ratio: float | None = None  # decode step / weight-read floor
    prefill_peak_bytes: int | None = None
    decode_peak_bytes: int | None = None
    state_bytes: int = 0  # recurrent state + sliding-window ring of converted layers
    kv_bytes: int = 0  # keys and values of softmax layers after prefill + decode
    cache_bytes_measured: int | None = None  # every tensor the cache object holds


# ---- sizes -------------------------------------------------------------------------------------


def cache_bytes(config, batch: int, tokens: int, softmax: bool = False) -> tuple[int, int]:
    """(recurrent-state bytes, KV bytes) of a cache of `batch` sequences holding `tokens` tokens.

    From the config alone (footprint.py): a converted layer keeps an fp32 state and a ring of
    `window` rotated keys and values, a softmax layer keys and values for every token. With
    `softmax` (a plain model, or teacher mode) every layer is a softmax layer.
    """
    fp = footprint(config)
    if softmax:
        return 0, batch * tokens * fp.source_kv_bytes_per_token
    return batch * fp.state_bytes, batch * tokens * fp.kv_bytes_per_token


def tensor_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensors reachable from a cache object (its lists, dicts and attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if depth > 6 or obj is None or isinstance(obj, (str, int, float, bool)):
        return 0
    if isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(c, seen, depth + 1) for c in children)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight once, but of an untied input embedding only a few rows."""
    emb = model.get_input_embeddings().weight
    tied = any(p is emb for p in model.get_output_embeddings().parameters())
    return sum(p.nbytes for p in model.parameters() if tied or p is not emb)


def measure_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Copy bandwidth in bytes/s (a copy reads and writes each byte once)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(GIB, free // 8)
    else:
        n = 64 * 2**20  # beyond any CPU cache, so the copy streams from memory
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * n * repeats / seconds


# ---- memory and timing -------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes since reset(): GPU allocations on CUDA, resident set size (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the kernel's high-water mark of this process's RSS (Linux)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # then the peak is the process's lifetime peak, still an upper bound

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- one configuration -------------------------------------------------------------------------


@dataclass
class Run:
    """The cache and last logits of a generation in progress."""

    model: torch.nn.Module
    cache: Any = None
    logits: torch.Tensor | None = None
    extra: dict = field(init=False)
    decoder: GreedyDecoder | None = None

    def __post_init__(self) -> None:
        self.extra = last_logits_only(self.model)

    def step(self, ids: torch.Tensor) -> None:
        out = self.model(input_ids=ids, **{CACHE_KWARG: self.cache}, use_cache=True, **self.extra)
        # clone: a view would keep the whole [B, T, vocab] logits of a prefill chunk alive during decode
        self.cache, self.logits = getattr(out, CACHE_KWARG), out.logits[:, -1].clone()

    def prefill(self, ids: torch.Tensor, chunk: int) -> None:
        for start in range(0, ids.shape[1], chunk):
            self.step(ids[:, start : start + chunk])

    def start_decode(self, cuda_graph: bool) -> bool:
        """Untimed: set up greedy decoding on the prefilled cache (recording the step as a CUDA graph
        when asked and the cache allows it). Returns whether steps will be graph replays."""
        graphed = cuda_graph and graph_blocker(self.cache, self.logits.device) is None
        self.decoder = GreedyDecoder(self.model, self.cache, self.logits, cuda_graph=graphed)
        self.logits = None
        return graphed

    def decode(self, steps: int) -> None:
        self.decoder.run(steps)

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.release()
        self.cache = self.logits = self.decoder = None


@torch.inference_mode()
def measure(model: torch.nn.Module, row: Row, opts: BenchOptions, device: torch.device, softmax: bool,
            floor_s: float, generator: torch.Generator) -> Row:
    """Fill `row` for one (model, batch, context); an out-of-memory marks it OOM and keeps what was measured."""
    vocab = model.config.vocab_size
    row.state_bytes, row.kv_bytes = cache_bytes(model.config, row.batch, row.context + opts.new_tokens, softmax)
    meter, run = PeakMemory(device), Run(model)
    try:
        ids = torch.randint(vocab, (row.batch, row.context), generator=generator).to(device)
        meter.reset()
        sync(device)
        start = time.perf_counter()
        run.prefill(ids, opts.prefill_chunk)
        sync(device)
        row.prefill_tok_s = row.batch * row.context / (time.perf_counter() - start)
        row.prefill_peak_bytes = meter.peak()
        meter.reset()
        row.cuda_graph = run.start_decode(opts.cuda_graph)
        sync(device)
        start = time.perf_counter()
        run.decode(opts.new_tokens)
        sync(device)
        seconds = time.perf_counter() - start
        row.decode_peak_bytes = meter.peak()
        row.decode_tok_s = row.batch * opts.new_tokens / seconds
        row.decode_step_ms = 1000 * seconds / opts.new_tokens
        row.floor_ratio = seconds / opts.new_tokens / floor_s
        run.decoder.release()  # the decoder's position counter is not part of the cache
        row.cache_bytes_measured = tensor_bytes(run.cache)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        row.status = "OOM"
    finally:
        run.close()
        free_memory(device)
    return row


@torch.inference_mode()
def warm_up(model: torch.nn.Module, batch: int, opts: BenchOptions, device: torch.device) -> None:
    """Untimed: first calls compile kernels, tune them and grow the allocator's pools."""
    run = Run(model)
    tokens = min(min(opts.contexts), opts.prefill_chunk)
    try:
        run.prefill(torch.zeros(batch, tokens, dtype=torch.long, device=device), opts.prefill_chunk)
        run.start_decode(cuda_graph=False)
        run.decode(2)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise  # an OOM here shows up again, as an OOM row, in the timed runs
    finally:
        run.close()
        free_memory(device)


# ---- the whole benchmark -----------------------------------------------------------------------


@dataclass
class Side:
    name: str
    source: str
    model: torch.nn.Module
    mode: Callable[[], AbstractContextManager]
    softmax: bool  # caches keys and values in every layer


def bench_sides(sides: list[Side], opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """Measure every side at every batch and context; returns the report (rows, models, meta)."""
    for model in {id(side.model): side.model for side in sides}.values():  # a teacher side shares the model
        if opts.fuse:
            fuse_projections(model)
        if opts.compile:
            compile_dense_parts(model, opts.compile_mode)
    bandwidth = measure_bandwidth(device)
    generator = torch.Generator().manual_seed(opts.seed)
    rows, models = [], {}
    with progress_bar() as bar:
        task = bar.add_task("bench", total=len(sides) * len(opts.batches) * len(opts.contexts))
        for side in sides:
            weights = weight_bytes(side.model)
            floor_s = weights / bandwidth
            models[side.name] = {"source": side.source, "weight_bytes": weights, "floor_ms": 1000 * floor_s,
                                 "parameters": sum(p.numel() for p in side.model.parameters())}
            with side.mode():
                for batch in opts.batches:
                    warm_up(side.model, batch, opts, device)
                    for context in opts.contexts:
                        bar.update(task, description=f"{side.name} batch {batch} context {context}")
                        rows.append(measure(side.model, Row(side.name, batch, context), opts, device,
                                            side.softmax, floor_s, generator))
                        bar.advance(task)
    return {
        "rows": [asdict(r) for r in rows],
        "models": models,
        "meta": {
            "device": device_name(device),
            "dtype": str(next(sides[0].model.parameters()).dtype).removeprefix("torch."),
            "bandwidth_bytes_s": bandwidth,
            "new_tokens": opts.new_tokens,
            "prefill_chunk": opts.prefill_chunk,
            "cuda_graph": opts.cuda_graph,
            "compiled_norms_and_mlp": opts.compile,
            "compile_mode": opts.compile_mode if opts.compile else None,
            "fused_projections": opts.fuse,
            "memory": "GPU allocated (torch)" if device.type == "cuda" else "process RSS high-water mark",
            "versions": versions(),
        },
    }


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    from . import is_converted

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    model = load_causal_lm(opts.checkpoint, dtype, device)
    sides = [Side("model", opts.checkpoint, model, nullcontext, softmax=not is_converted(model))]
    if opts.teacher:
        from . import teacher

        sides.append(Side("reference", "teacher", model, lambda: teacher(model), softmax=True))
    elif opts.compare:
        ref = load_causal_lm(opts.compare, dtype, device)
        sides.append(Side("reference", opts.compare, ref, nullcontext, softmax=not is_converted(ref)))
    return bench_sides(sides, opts, device)


# ---- output ------------------------------------------------------------------------------------


def speedups(report: dict[str, Any]) -> dict[tuple[int, int], float]:
    """(batch, context) -> model decode tok/s / reference decode tok/s, where both ran."""
    by_key = {(r["model"], r["batch"], r["context"]): r for r in report["rows"]}
    out = {}
    for (name, batch, context), r in by_key.items():
        ref = by_key.get(("reference", batch, context))
        if name == "model" and ref and r["decode_tok_s"] and ref["decode_tok_s"]:
            out[(batch, context)] = r["decode_tok_s"] / ref["decode_tok_s"]
    return out


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "" if x is None else format(x, fmt)


def render(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    meta, models = report["meta"], report["models"]
    title = " vs ".join(f"{name}: {m['source']}" for name, m in models.items())
    table = Table(title=f"{title} on {meta['device']} ({meta['dtype']}, {meta['new_tokens']} new tokens)")
    # decode tok/s, "vs ref" (model / reference decode speed), ms per step and its ratio to the weight-read floor
    for col in ("model", "batch", "context", "prefill tok/s", "decode tok/s", "vs ref", "ms/step", "x floor",
                "prefill peak", "decode peak", "state", "KV"):
        table.add_column(col, justify="left" if col == "model" else "right")
    ratio = speedups(report)
    rows = sorted(report["rows"], key=lambda r: (r["batch"], r["context"], r["model"]))
    for r in rows:
        if r["status"] != "ok":
            cells = [_num(r["prefill_tok_s"]), "OOM", "", "", "", _bytes(r["prefill_peak_bytes"]), "OOM"]
        else:
            sp = ratio.get((r["batch"], r["context"])) if r["model"] == "model" else None
            cells = [_num(r["prefill_tok_s"]), _num(r["decode_tok_s"]), _num(sp, ".2f") + ("x" if sp else ""),
                     _num(r["decode_step_ms"], ".2f"), _num(r["floor_ratio"], ".2f"),
                     _bytes(r["prefill_peak_bytes"]), _bytes(r["decode_peak_bytes"])]
        table.add_row(r["model"] + (" *" if r.get("cuda_graph") else ""), str(r["batch"]), str(r["context"]), *cells, _bytes(r["state_bytes"]), _bytes(r["kv_bytes"]))
    console.print(table)
    if any(r.get("cuda_graph") for r in rows):
        console.print("* decode steps replayed from a recorded CUDA graph")
    floors = ", ".join(f"{name} {m['floor_ms']:.3f} ms ({_bytes(m['weight_bytes'])})" for name, m in models.items())
    console.print(f"weight-read floor per decode step at {meta['bandwidth_bytes_s'] / 1e9:.0f} GB/s measured copy bandwidth: {floors}")


def plot(report: dict[str, Any], path: Path) -> None:
    """Decode tok/s and decode peak memory against context, one line per model and batch."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a GPU server
        import matplotlib.pyplot as plt
    except ImportError:
        raise LinearizeError("--plot needs matplotlib: pip install matplotlib, or leave out --plot") from None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["model"], r["batch"]) for r in report["rows"]})
    for name, batch in keys:
        ok = sorted((r for r in report["rows"] if (r["model"], r["batch"]) == (name, batch) and r["status"] == "ok"),
                    key=lambda r: r["context"])
        label = f"{name} ({report['models'][name]['source']}), batch {batch}"
        speed.plot([r["context"] for r in ok], [r["decode_tok_s"] for r in ok], marker="o", label=label)
        memory.plot([r["context"] for r in ok], [r["decode_peak_bytes"] / GIB for r in ok], marker="o", label=label)
    for ax, ylabel in ((speed, "decode tokens/s"), (memory, "decode peak memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    speed.legend(fontsize=7)
    fig.suptitle(f"{report['meta']['device']}, {report['meta']['dtype']}")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise LinearizeError(f"could not write {path}: {e.strerror}; choose another --plot path") from e
    finally:
        plt.close(fig)
