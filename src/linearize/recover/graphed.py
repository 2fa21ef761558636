"""A training pass replayed from a CUDA graph (`linearize recover --cuda-graph`).

A small model's training step is bound by the host: each pass launches a few thousand kernels,
and the GPU waits on Python between them (SmolLM2-135M: about 150 ms of host time a step against
about 110 ms of GPU work, docs/kernels.md). A CUDA graph records one pass (forward, loss and
backward) once and then replays it as a single launch.

The pass is recorded for one micro-batch shape: its token ids and labels live in fixed buffers that
each replay copies the batch into. Its gradients are added in place into the parameters' `.grad`
tensors, which therefore must exist before the recording and stay the same tensors: the trainer
zeroes them instead of dropping them. Other shapes (a block cut short at the end of the budget)
run eagerly.

Softmax attention inside a recorded pass (kept layers, the kd teacher) stays on SDPA's causal kernels
because the recovery losses run the model inside `losses.unpacked_batches()`: while a graph records,
transformers would otherwise build a full [B, 1, T, T] mask (docs/kernels.md, eighteenth session).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_PASSES = 2  # eager passes on a side stream before the recording, as PyTorch's CUDA-graph notes advise


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    loss: torch.Tensor


Compute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, labels) -> loss


def eager_pass(compute: Compute, input_ids: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """One pass without a graph: the loss, `(loss * weight).backward()`, and the detached loss."""
    loss = compute(input_ids, labels)
    (loss * weight).backward()
    return loss.detach()


class GraphedPass:
    """`eager_pass` for one CUDA device, replaying a recorded CUDA graph for micro-batches of `shape`."""

    def __init__(self, compute: Compute, params: list[torch.Tensor], shape: tuple[int, int], device: torch.device):
        self.compute, self.params, self.shape, self.device = compute, params, tuple(shape), device
        self.recorded: _Recorded | None = None

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
        if tuple(input_ids.shape) != self.shape:  # e.g. the budget's last, cut-short block
            return eager_pass(self.compute, input_ids, labels, weight)
        if self.recorded is None:
            self.recorded = self._record(input_ids, labels)
        r = self.recorded
        r.input_ids.copy_(input_ids, non_blocking=True)
        r.labels.copy_(labels, non_blocking=True)
        r.weight.fill_(weight)
        r.graph.replay()
        return r.loss

    def _record(self, input_ids: torch.Tensor, labels: torch.Tensor) -> _Recorded:
        from ..kernels.liger import segmented  # noqa: PLC0415 - Triton's modules: imported on CUDA only

        for p in self.params:  # the recorded backward adds into these tensors: they must exist first
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = [p.grad.clone() for p in self.params]  # the warm-up passes add gradients that are not the step's
        static_ids, static_labels = input_ids.to(self.device).clone(), labels.to(self.device).clone()
        weight = torch.ones((), device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # The warm-up compiles kernels and fills caches (segment layouts) before the recording, with the
        # same segment choices: without the host's launch cost, short sequences split too.
        with segmented.recording():
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES):
                    (self.compute(static_ids, static_labels) * weight).backward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self.compute(static_ids, static_labels)
                (loss * weight).backward()
        for p, g in zip(self.params, kept, strict=True):
            p.grad.copy_(g)
        return _Recorded(graph, static_ids, static_labels, weight, loss.detach())
