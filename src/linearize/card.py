"""Model cards: a README.md in every checkpoint saying how it was made."""

from __future__ import annotations

from typing import Any

import torch
import transformers


def conversion_card(config: Any, command: str, seconds: float) -> str:
    s = config.linearize
    n = config.num_hidden_layers
    kept = sorted(s["keep_attention"])
    branch = (
        f"Liger Attention: {1 - s['mix']:.2g} x GLA + {s['mix']:.2g} x softmax attention over a {s['window']}-token "
        "sliding window (RoPE on that branch only)"
        if s["window"]
        else "pure gated linear attention (no sliding window)"
    )
    if s["target"] in ("gdn", "gsa"):
        branch = branch.replace("GLA", {"gdn": "gated delta rule", "gsa": "gated slot attention"}[s["target"]])
    if s["target"] == "hedgehog":
        branch = (f"softmax attention over a {s['window']}-token window (RoPE) and linear attention over older "
                  "tokens, one shared normaliser" if s["window"] else "normalised linear attention")
    feature = {
        "gla": "feature maps softmax(q) and softmax(k) over the head dimension",
        "mamba2": "feature maps softmax(q) and softmax(k), one scalar decay per head (Mamba-2-style)",
        "hgrn2": "feature map softmax(q); the key becomes the input gate 1 - a (Liger-HGRN2)",
        "gdn": "the gated delta rule S = diag(a)(I - b k k^T) S + b k v^T on L2-normalised q and k, b = sigmoid(mean "
        "of k) (Gated DeltaNet)",
        "gsa": f"gated slot attention: {s.get('slots', 64)} slots of keys and values per head written with a "
        "forget gate pooled from the key, read through a softmax over slots",
        "hedgehog": "learnable per-head feature maps [softmax(xW), softmax(-xW)] (LoLCATs' Hedgehog; new "
        "hedgehog_q/hedgehog_k weights set to the identity, trained by `recover --stages align,lm`), window and "
        "linear part sharing one normaliser, no forget gate",
    }[s["target"]]
    gate = "no forget gate" if s["target"] == "hedgehog" else {
        "key": f"forget gate log a = logsigmoid(k) / {s['gate_normalizer']:g} per key channel",
        "none": "no forget gate (ablation: plain linear attention with softmax feature maps)",
        "projection": "forget gate from a new, randomly initialised projection (ablation; adds gate_proj weights)",
    }[s.get("gate", "key")]
    layers = f"{n - len(kept)} of {n} layers converted" + (f"; kept as softmax attention: {kept}" if kept else "")
    return f"""---
library_name: transformers
base_model: {s['source']}
tags: [linearize, liger, gated-linear-attention, linear-attention]
---
# {s['source']} converted to gated linear attention (`{s['target']}`)

Made by [linearize](https://pypi.org/project/linearize/) {s['version']} with

```
{command}
```

- Method: Liger (arXiv 2503.01496). Each converted attention layer reuses the source's q/k/v/o
  projections: {feature}, {gate}.
- Mixer: {branch}.
- Layers: {layers}.
- Source family: {s['family']}; the source's tensors are unchanged.
- Conversion took {seconds:.1f} s with torch {torch.__version__}, transformers {transformers.__version__}.
- Not yet recovered: quality returns after `linearize recover` (LoRA on a small instruction set).

## Use

```python
import linearize  # registers the classes (or pass trust_remote_code=True)
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH")
with linearize.teacher(model):  # the source's softmax attention again, same weights
    ...
```

Decoding keeps, per converted layer, a fixed recurrent state and the last {s['window']} keys and values:
memory does not grow with context.
"""
