"""The other targets' recurrences against their flash-linear-attention counterparts (issue 7).

    python benchmarks/targets.py [--B 4] [--T 2048] [--H 16] [--D 128] [--targets gsa,gdn]
        [--fla-configs 4] [--fp32-matmul high] [--json out.json]

The recurrent (linear) part only, bf16 on CUDA (fp32 on CPU, ours only: a smoke run), forward
and forward+backward ms, ours against fla-core's op for the same structure where one exists:

| target  | ours                                                   | fla-core                 |
|---------|--------------------------------------------------------|--------------------------|
| mamba2  | Triton chunk_gla, the per-head gate spread on channels | chunk_simple_gla         |
| hgrn2   | Triton chunk_gla on (softmax q, 1 - a, v, log a)       | chunk_gla, same inputs   |
| gsa     | chunked slot scores (Triton) + Triton chunk_gla        | chunk_gsa                |
| gdn     | per-channel gated delta rule: Triton chunk terms + state sweep | chunk_kda (per-channel) |
| hedgehog| hedgehog/chunk.py at window 0: Triton chunk_gla, zero gates, running normaliser | chunk_linear_attn |
| hedgehog_window | the whole layer at window 64 (the window on the Triton window kernels) | -  |
| hedgehog_window_pt | the same, the window in blocked PyTorch (an all-true padding mask) | - |
| mamba2_window | the model's whole mamba2 layer at window 64 (liger_attention: maps, chunk_gla, the window on the Triton window kernels) | - |
| mamba2_window_pt | the same, the window in blocked PyTorch (an all-true padding mask) | - |

fla's kda decays after the delta update where ours decays the whole update (see
kernels/gdn/naive.py): the same work, not the same function. Writes JSON with the device name.

fla's kernels autotune on first call, compiling every configuration in their lists (36 for each
of chunk_gsa's kernels): on Triton 3.6 that took more than seven minutes for gsa alone.
`--fla-configs N` keeps, for each of fla's kernels, the N configurations nearest 4 warps and 2
stages (all tile sizes kept first); fla then picks the best of those, so its times are what a
shortened search finds (an upper bound on what its full search would).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: keep this folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from linearize.kernels import chunk_gla, liger_attention  # noqa: E402
from linearize.kernels.gdn.chunk import gated_delta_chunked  # noqa: E402
from linearize.kernels.gsa.chunk import slot_scores  # noqa: E402
from linearize.kernels.hedgehog.chunk import hedgehog_attention_chunked  # noqa: E402

if torch.cuda.is_available():  # the Triton kernels the model runs on CUDA (chunked PyTorch elsewhere)
    from linearize.kernels.gdn.chunk_triton import gated_delta_chunked_triton
    from linearize.kernels.gsa.chunk_triton import slot_scores_chunked_triton

GN, SLOTS = 16.0, 64


def timed(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() (device synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def fwd_and_fwdbwd(layer, inputs: list[torch.Tensor]) -> tuple[float, float]:
    with torch.no_grad():
        fwd = timed(lambda: layer(*inputs))
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]

    def step():
        out = layer(*leaves)
        torch.autograd.grad(out, [x for x in leaves if x.requires_grad], torch.ones_like(out), allow_unused=True)

    return fwd, timed(step)


def inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    return {"q": q, "k": k, "v": v}


def rows(x: dict[str, torch.Tensor], fla) -> dict[str, tuple]:
    """target -> (ours, our inputs, fla's op or None, its inputs)."""
    q, k, v = x["q"], x["k"], x["v"]
    phi_q, phi_k = q.float().softmax(-1).to(q.dtype), k.float().softmax(-1).to(q.dtype)
    log_a = F.logsigmoid(k.float()) / GN
    head_gate = log_a.mean(-1)  # mamba2: one decay per head
    slot_gate = log_a.unflatten(-1, (SLOTS, -1)).mean(-1)  # gsa: one decay per slot
    write = (-torch.expm1(slot_gate)).to(q.dtype)
    qn, kn = F.normalize(q.float(), dim=-1).to(q.dtype), F.normalize(k.float(), dim=-1).to(q.dtype)
    beta = torch.sigmoid(k.float().mean(-1))
    # hedgehog: [softmax(x), softmax(-x)] (its map at conversion, W = I), normalised linear attention
    hh_q, hh_k = (torch.cat([x.float().softmax(-1), (-x.float()).softmax(-1)], -1).to(q.dtype) for x in (q, k))

    def ours_mamba2(pq, pk, vv, g):
        return chunk_gla(pq, pk, vv, g[..., None].expand_as(pk), scale=1.0)[0]

    def ours_hgrn2(pq, vv, g):
        return chunk_gla(pq, (-torch.expm1(g)).to(pq.dtype), vv, g, scale=1.0)[0]

    def ours_gsa(pq, pk, vv, g):
        u = -torch.expm1(g)
        keys0 = pq.new_zeros(pq.shape[0], pq.shape[2], SLOTS, pq.shape[3], dtype=torch.float32)
        # bf16 maps on CUDA: the chunked kernel's products run in bf16, as in the model
        scores, _ = (slot_scores_chunked_triton if pq.is_cuda else slot_scores)(pq, pk, u, g, keys0)
        return chunk_gla(scores.softmax(-1).to(vv.dtype), u.to(vv.dtype), vv, g, scale=1.0)[0]

    def ours_gdn(qq, kk, vv, g, b):
        state = qq.new_zeros(qq.shape[0], qq.shape[2], qq.shape[3], vv.shape[3], dtype=torch.float32)
        recurrence = gated_delta_chunked_triton if qq.is_cuda else gated_delta_chunked  # as the model picks
        return recurrence(qq.float(), kk.float(), vv.float(), g, b, state)[0]

    def ours_hedgehog(pq, pk, vv):  # the model's layer with no window: its linear part alone
        return hedgehog_attention_chunked(q, k, vv, pq, pk, window=0)[0]

    # the whole layer with its window of 64 (the Triton window kernels on CUDA): ours only, fla has none
    ang = torch.arange(q.shape[1], device=q.device, dtype=torch.float32)[:, None] * torch.logspace(
        0, -4, q.shape[-1] // 2, device=q.device)[None, :]
    cos, sin = (torch.cat([f(ang)] * 2, -1)[None] for f in (torch.cos, torch.sin))

    def ours_hedgehog_window(qq, kk, vv, pq, pk, torch_window=False):
        # an all-true padding mask sends the window to the blocked PyTorch form (the A/B row)
        mask = torch.ones(qq.shape[:2], dtype=torch.bool, device=qq.device) if torch_window else None
        return hedgehog_attention_chunked(qq, kk, vv, pq, pk, window=64, cos=cos, sin=sin, attention_mask=mask)[0]

    def ours_mamba2_window(qq, kk, vv, torch_window=False):  # the layer as the model runs it, window included
        mask = torch.ones(qq.shape[:2], dtype=torch.bool, device=qq.device) if torch_window else None
        return liger_attention(qq, kk, vv, window=64, cos=cos, sin=sin, target="mamba2", attention_mask=mask)[0]

    table = {
        "mamba2": (ours_mamba2, [phi_q, phi_k, v, head_gate]),
        "hgrn2": (ours_hgrn2, [phi_q, v, log_a]),
        "gsa": (ours_gsa, [phi_q, phi_k, v, slot_gate]),
        "gdn": (ours_gdn, [qn, kn, v, log_a, beta]),
        "hedgehog": (ours_hedgehog, [hh_q, hh_k, v]),
        "hedgehog_window": (ours_hedgehog_window, [q, k, v, hh_q, hh_k]),
        "hedgehog_window_pt": (lambda *xs: ours_hedgehog_window(*xs, torch_window=True), [q, k, v, hh_q, hh_k]),
        "mamba2_window": (ours_mamba2_window, [q, k, v]),
        "mamba2_window_pt": (lambda *xs: ours_mamba2_window(*xs, torch_window=True), [q, k, v]),
    }
    out = {name: (fn, args, None, None) for name, (fn, args) in table.items()}
    if fla is not None:
        out["mamba2"] = (*table["mamba2"], lambda a, b, c, g: fla["simple_gla"](a, b, c, g=g, scale=1.0)[0],
                         [phi_q, phi_k, v, head_gate])
        out["hgrn2"] = (*table["hgrn2"], lambda a, c, g: fla["gla"](a, (-torch.expm1(g)).to(a.dtype), c, g, scale=1.0)[0],
                        [phi_q, v, log_a])
        out["gsa"] = (*table["gsa"], lambda a, b, c, s, g: fla["gsa"](a, b, c, s, g, scale=1.0)[0],
                      [phi_q, phi_k, v, write, slot_gate])
        out["hedgehog"] = (*table["hedgehog"], lambda a, b, c: fla["linear_attn"](a, b, c, scale=1.0, normalize=True)[0],
                           [hh_q, hh_k, v])
        out["gdn"] = (*table["gdn"], lambda a, b, c, g, bb: fla["kda"](a, b, c, g, bb, scale=1.0)[0],
                      [qn, kn, v, log_a, beta])
    return out


@contextmanager
def shortened_autotune(keep: int | None):
    """Inside, every Triton autotuner built (fla's at import: its cached autotuner is a subclass)
    keeps at most `keep` configurations, those nearest 4 warps and 2 stages. None: all of them."""
    from triton.runtime.autotuner import Autotuner  # noqa: PLC0415

    original = Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        nearest = sorted(configs, key=lambda c: (abs(c.num_warps - 4), abs(c.num_stages - 2)))
        original(self, fn, arg_names, nearest[:keep], *args, **kwargs)

    if keep:
        Autotuner.__init__ = init
    try:
        yield
    finally:
        Autotuner.__init__ = original


def load_fla(configs: int | None = None):
    try:
        with shortened_autotune(configs):
            from fla.ops.gla import chunk_gla as fla_gla  # noqa: PLC0415
            from fla.ops.gsa import chunk_gsa  # noqa: PLC0415
            from fla.ops.kda import chunk_kda  # noqa: PLC0415
            from fla.ops.linear_attn import chunk_linear_attn  # noqa: PLC0415
            from fla.ops.simple_gla import chunk_simple_gla  # noqa: PLC0415
    except ImportError as e:
        print(f"fla-core not available ({e}): ours only")
        return None
    return {"gla": fla_gla, "gsa": chunk_gsa, "kda": chunk_kda, "simple_gla": chunk_simple_gla,
            "linear_attn": chunk_linear_attn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--targets", default="mamba2,hgrn2,gsa,gdn,hedgehog", help="comma-separated subset")
    p.add_argument("--fla-configs", type=int, default=None,
                   help="try at most N autotune configurations per fla kernel (default: all)")
    p.add_argument("--fp32-matmul", default="highest", choices=["highest", "high"],
                   help="torch.set_float32_matmul_precision for the run: the gdn/gsa chunk kernels' fp32 products "
                        "follow it (highest: three-pass TF32, high: one TF32 pass)")
    p.add_argument("--json", default="targets_bench.json")
    args = p.parse_args()
    torch.set_float32_matmul_precision(args.fp32_matmul)
    if args.D % SLOTS:
        raise SystemExit(f"--D must be a multiple of {SLOTS} (gsa pools the key's channels into {SLOTS} slots)")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    fla = load_fla(args.fla_configs) if cuda else None
    print(f"{name}: B{args.B} T{args.T} H{args.H} D{args.D} {str(dtype).removeprefix('torch.')}, recurrent part only")
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    table = rows(inputs(args.B, args.T, args.H, args.D, dtype, device), fla)
    if unknown := set(wanted) - set(table):
        raise SystemExit(f"--targets: unknown {sorted(unknown)}; choose from {', '.join(table)}")
    table = {name: table[name] for name in wanted}
    result = {"device": name, "shape": vars(args), "rows": [{"target": target} for target in table]}
    # ours for every target first, then fla's: fla's first calls autotune for minutes (gsa's for
    # more than seven on Triton 3.6), and a run cut short keeps what it has
    for side in ("ours", "fla"):
        for row, (ours, ours_in, theirs, theirs_in) in zip(result["rows"], table.values(), strict=True):
            fn, xs = (ours, ours_in) if side == "ours" else (theirs, theirs_in)
            if fn is None:
                continue
            target = row["target"]
            try:
                row[f"{side}_fwd"], row[f"{side}_fwdbwd"] = fwd_and_fwdbwd(fn, xs)
                print(f"  {target:7s} {side:4s} fwd {row[side + '_fwd']:.2f} ms, fwd+bwd {row[side + '_fwdbwd']:.2f} ms",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - report (OOM, API mismatch) and go on
                print(f"  {target} {side}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
                if cuda:
                    torch.cuda.empty_cache()
            Path(args.json).write_text(json.dumps(result, indent=1))  # saved as soon as measured
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
