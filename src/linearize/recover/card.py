"""The model card of a recovered adapter (and of its merged checkpoint)."""

from __future__ import annotations

from .data import DataReport
from .options import RecoverOptions


def adapter_card(opts: RecoverOptions, results: list[dict], report: DataReport) -> str:
    def val(r: dict) -> str:
        return "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"

    rows = "\n".join(
        f"| {r['stage']} | {r['steps']} | {r['tokens']:,} | {r['loss']:.4f} | {val(r)} | {r['seconds']:.0f} |"
        for r in results
    )
    return f"""---
library_name: peft
base_model: {opts.ckpt}
tags: [linearize, liger, lora, gated-linear-attention]
---
# LoRA recovery of {opts.ckpt}

Made by `linearize recover` on the converted checkpoint `{opts.ckpt}`.

- Data: {report.summary()}
- LoRA: r={opts.lora_r}, alpha={opts.lora_alpha:g} on {', '.join(opts.lora_targets)}; lr {opts.lr:g} ({opts.schedule},
  warmup {opts.warmup_ratio:g}), gradient clipping {opts.max_grad_norm:g}, sequences of {opts.seq_len} tokens,
  micro-batch {opts.micro_batch} x {opts.grad_accum} accumulation, seed {opts.seed}.
- Objective of the lm stage: {opts.loss}{f' (kd weight {opts.kd_weight:g})' if opts.loss == 'lm+kd' else ''}.

| stage | steps | tokens | final loss | validation loss | seconds |
|---|---|---|---|---|---|
{rows}

Load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{opts.ckpt}", trust_remote_code=True), THIS_FOLDER)`
{'; the `merged/` folder holds a standalone checkpoint with the adapter folded in.' if opts.merge else '.'}
"""
