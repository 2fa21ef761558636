"""Perplexity of a token stream with strided windows, weighted by tokens.

Each window holds up to `context` tokens and starts `stride` after the previous one; it scores
only the tokens no earlier window scored, so every token (but the very first, which nothing
predicts) counts once, with up to `context - stride` tokens of history before it. This is the
recipe of transformers' perplexity guide; the total is sum(NLL) / tokens, not a mean of windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scoring import forward_logits, progress_bar


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first_target: int  # first token this window scores (earlier ones were scored before)


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens scored

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context, n_tokens)
        # A window's first token has no prediction inside it; with stride == context that
        # token goes unscored, exactly as with transformers' labels=-100 recipe.
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        if end >= n_tokens:
            return out
        prev_end, begin = end, begin + stride


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int], *, context: int, stride: int, batch_size: int,
               description: str = "perplexity") -> Perplexity:
    """Token-weighted perplexity of `ids` (one stream) under `model`, windows batched by length."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    todo = windows(len(ids), context, stride)
    nll, count = 0.0, 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(todo))
        i = 0
        while i < len(todo):
            # Windows of equal length batch together: all but the last one are `context` long.
            length = todo[i].end - todo[i].begin
            batch = [todo[i]]
            while len(batch) < batch_size and i + len(batch) < len(todo) and \
                    todo[i + len(batch)].end - todo[i + len(batch)].begin == length:
                batch.append(todo[i + len(batch)])
            inputs = torch.stack([stream[w.begin : w.end] for w in batch]).to(device)
            # Only positions that predict a scored token need logits (target t is predicted at t - 1):
            # keep the longest such tail in the batch, which spares a [context, vocab] matrix per row.
            keep = max(w.end - w.first_target for w in batch) + 1
            logits = forward_logits(model, inputs, keep=keep)  # [b, keep, V]: positions end-keep .. end-1
            for row, w in enumerate(batch):
                n = w.end - w.first_target  # targets first_target .. end-1, predicted at one position before
                pred = logits[row, keep - n - 1 : keep - 1].float()
                target = stream[w.first_target : w.end].to(device)
                nll += F.cross_entropy(pred, target, reduction="sum").item()
                count += n
            i += len(batch)
            bar.advance(task, len(batch))
    return Perplexity(nll=nll, tokens=count)
