"""Shared pieces of scoring: one tokenization convention, batched log-likelihoods, progress bars.

Perplexity and every task tokenize the same way (the tokenizer's own leading special tokens,
then the text without them), so a model and its reference see identical token streams.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import LinearizeError


def progress_bar(transient: bool = True) -> Progress:
    """The bar every long loop of evaluation and benchmarking shows (on stderr)."""
    from rich.console import Console

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
    )


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (BOS for Llama, nothing for GPT-2 style).

    Found by comparing an encoding with and without special tokens, because tokenizers
    disagree on where they record it (`add_bos_token` is False on some that do add BOS).
    A trailing special token (EOS) is deliberately left out: it would end every context.
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode(tokenizer, text: str, prefix: Sequence[int] = ()) -> list[int]:
    return [*prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the model's forward takes `argument`, also through a subclass's **kwargs (converted
    models wrap the source class's forward that way, and logits_to_keep must reach it)."""
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is not None and argument in inspect.signature(forward).parameters:
            return True
    return False


@torch.inference_mode()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   keep: int | None = None) -> torch.Tensor:
    """Logits [B, T or keep, V] without a cache; `keep` trims to the last positions when the model allows."""
    kwargs = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if keep is not None and accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits
    return logits if keep is None else logits[:, -keep:]


@dataclass(frozen=True)
class Request:
    """Score `continuation` (token ids) after `context` (token ids)."""

    context: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class Score:
    loglik: float  # sum of the continuation's token log-probabilities
    greedy: bool  # whether argmax decoding reproduces the whole continuation
    tokens: int  # continuation length in tokens


def encode_pair(tokenizer, context: str, continuation: str, prefix: Sequence[int]) -> Request:
    """lm-evaluation-harness's convention: tokenize the whole text and split off the context's tokens,
    so a token that straddles the boundary is scored as the model would really see it; trailing
    spaces of the context move to the continuation for the same reason."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation, prefix)
    ctx = encode(tokenizer, context, prefix)
    return Request(context=whole[: len(ctx)], continuation=whole[len(ctx) :])


@torch.inference_mode()
def score_requests(model: torch.nn.Module, requests: Sequence[Request], *, batch_size: int, max_length: int,
                   description: str = "scoring") -> list[Score]:
    """Log-likelihood and greedy match of each request, in batches of right-padded rows.

    Longest rows first, so a batch wastes little padding and an out-of-memory shows up at once.
    A row longer than `max_length` loses tokens from the left of its context.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    scores: list[Score | None] = [None] * len(requests)
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(requests))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows, n_cont = [], []
            for i in idx:
                r = requests[i]
                if not r.continuation:
                    raise ValueError("a request has an empty continuation")  # a bug in task parsing, not input
                if len(r.continuation) > max_length:
                    raise LinearizeError(f"a continuation of {len(r.continuation)} tokens does not fit --context {max_length}: raise --context")
                full = (r.context + r.continuation)[-(max_length + 1) :][:-1]  # the last token is only a target
                rows.append(full)
                n_cont.append(len(r.continuation))
            width = max(len(row) for row in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, row in enumerate(rows):
                ids[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = 1
            # Right padding never changes a causal model's earlier positions; the mask only tells
            # models that care. Skipping an all-ones mask keeps the fast unmasked attention path.
            logits = forward_logits(model, ids.to(device), mask.to(device) if not bool(mask.all()) else None)
            for j, i in enumerate(idx):
                n, end = n_cont[j], len(rows[j])
                target = torch.tensor(requests[i].continuation, device=device)
                logp = F.log_softmax(logits[j, end - n : end].float(), dim=-1)
                ll = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                scores[i] = Score(loglik=ll, greedy=greedy, tokens=n)
            bar.advance(task, len(idx))
    return scores  # type: ignore[return-value]
