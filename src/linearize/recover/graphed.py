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

While a graph records, transformers cannot read the position ids (a device sync) to see that a batch
holds no packed sequences, so it assumes it might and builds a full [B, 1, T, T] mask. SDPA then leaves
its causal kernels: softmax attention ran 2.6-2.8x slower inside the graph (docs/kernels.md,
eighteenth session). A recovery pass never passes position ids, so the model's own are 0..T-1 and
never packed: `causal_masks_while_recording` tells transformers so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def causal_masks_while_recording() -> Iterator[None]:
    """Inside, transformers' mask builder treats every batch as unpacked, as it does eagerly for a
    pass without position ids; SDPA's mask then stays `None` (`is_causal`) inside a CUDA graph too."""
    from transformers import masking_utils  # noqa: PLC0415 - only needed while recording

    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None:  # another transformers version: nothing to tell it
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


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
        with segmented.recording(), causal_masks_while_recording():
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
