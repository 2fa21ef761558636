"""Several processes for recovery: one per GPU under torchrun (gloo on CPU).

Replicated (the default, for models that fit one GPU): only LoRA weights train, so each rank
holds the whole model and the gradients to share are tiny: ranks split each optimizer step's
blocks and sum their gradients with one all-reduce per parameter, which is what DDP would do,
without wrapping the model (the loss functions reach into it for teacher passes and hooks).

Sharded (`fsdp`, for models too large for one GPU): FSDP2's `fully_shard` on every decoder
layer and the root spreads the frozen weights over the ranks and reduce-scatters gradients;
checkpoints gather the trainable tensors to rank 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.console import Console

from ..errors import LinearizeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (if any); returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_reduce_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(world: World, value: int, device: torch.device) -> int:
    if world.size == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def shard(model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
    """FSDP2: shard each decoder layer, then what is left (embeddings, head), across the ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Every tensor is gathered in its own dtype (bf16 frozen weights, fp32 trained ones: FSDP2 then
    # gathers bytes) and autocast computes, as in a single process. Casting everything to bf16
    # (param_dtype=bfloat16) computed the LoRA weights from bf16 copies and drifted 3% above one GPU's
    # validation loss after 92 steps (docs/multi_gpu.md).
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: whole tensor on CPU} of what trains; under FSDP every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put whole tensors from `trainable_state` back, sharding them again where the model is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launch(opts, console: Console | None = None) -> None:
    """Run `recover(opts)` in `opts.nproc` processes under torchrun; the options travel as JSON."""
    import tempfile
    from pathlib import Path

    out = Path(opts.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f".{out.name}.options-", dir=out.parent,
                                     delete=False) as f:
        f.write(opts.model_dump_json())
    existed = out.exists()
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", f"--nproc-per-node={opts.nproc}", "-m", "linearize.recover.worker", f.name]
    try:
        code = subprocess.call(cmd)
    finally:
        os.unlink(f.name)
    from .trainer import STOPPED, Stopped, workdir_for  # noqa: PLC0415 - trainer imports this module

    stopped = workdir_for(out) / STOPPED
    if stopped.exists():  # torchrun reports a child's exit 75 as a plain failure: the note says what happened
        raise Stopped(stopped.read_text())
    if code != 0 and out.exists() and not existed:
        # Rank 0 renames OUT into place as the run's very last step, so the run is complete. Seen under
        # the CPU test load with gloo: a rank aborting in process-group teardown ("terminate called
        # without an active exception"), pytorch/pytorch#190489; that is no reason to fail a finished run.
        message = f"[yellow]warning:[/] a process exited with code {code} after the run had finished; {out} is complete"
        (console or Console(stderr=True)).print(message, soft_wrap=True)
        return
    if code != 0:
        raise LinearizeError(f"recover under torchrun ({opts.nproc} processes) exited with code {code}: "
                             "see its output above; fix the cause and rerun with --resume")
