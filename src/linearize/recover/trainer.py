"""`linearize recover`: LoRA recovery of a converted checkpoint, stage by stage, resumable.

The run works in a hidden folder beside OUT (`.OUT.partial`): checkpoints, metrics and data
report live there while training, and the folder becomes OUT only when every stage is done.
A checkpoint is the adapter, optimizer, scheduler, RNG states and the data position, so a
resumed run reaches the same adapter as one that was never stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoint import atomic_folder, check_output, require_free_space, tensor_bytes
from ..errors import LinearizeError, first_line
from ..loading import load_causal_lm, load_tokenizer, resolve_device
from .data import Blocks, DataReport, prepare
from .distributed import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_world,
    load_trainable_state,
    shard,
    shutdown,
    trainable_state,
)
from .graphed import GraphedPass, eager_pass
from .losses import lm_loss, loss_tokens, training_loss
from .options import RecoverOptions

CHECKPOINTS = "checkpoints"


class Interrupted(LinearizeError):
    exit_code = 130


class Stopped(LinearizeError):
    """--stop-after-steps reached: a checkpoint is saved and OUT is not written yet."""

    exit_code = 75  # EX_TEMPFAIL: not finished, run again (with --resume)
    label = "stopped"


@dataclass
class Position:
    """Where a run stands: stage index, optimizer steps in that stage, blocks consumed, tokens trained."""

    stage: int = 0
    step: int = 0
    blocks: int = 0
    tokens: int = 0


STOPPED = "stopped.txt"  # in the work folder while a run is stopped by --stop-after-steps


def workdir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def block_order(n_blocks: int, index: int, seed: int) -> int:
    """The block to train on at stream position `index`: a fresh permutation every epoch."""
    epoch, pos = divmod(index, n_blocks)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return int(perm[pos])


def stage_plan(opts: RecoverOptions, stage: str, train: Blocks, world_size: int = 1) -> tuple[int, int]:
    """(tokens to train, optimizer steps) for a stage; a step takes micro_batch x grad_accum blocks per rank."""
    seq = opts.orient_seq_len if stage == "orient" else opts.seq_len
    budget = opts.budget(stage)
    if budget is None:
        budget = int(opts.epochs * len(train.input_ids) * seq)
    blocks = math.ceil(budget / seq)
    return budget, math.ceil(blocks / (opts.micro_batch * opts.grad_accum * world_size))


def make_scheduler(optimizer, opts: RecoverOptions, total_steps: int):
    warmup = int(opts.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if opts.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


NEW_MODULES = ("gate_proj", "hedgehog_q", "hedgehog_k")


def new_attention_modules(model: torch.nn.Module) -> list[str]:
    """Names (as PEFT suffixes, "self_attn.gate_proj") of the modules a target adds to converted
    attention layers — hedgehog's feature maps, the gate-projection ablation. They train in full and
    travel with the adapter. The parent's name is part of the suffix: PEFT matches modules_to_save by
    name ending, and a bare "gate_proj" would also catch every MLP's gate projection."""
    found = set()
    for name, module in model.named_modules():
        if getattr(module, "linearize_kind", None) == "liger":
            parent = name.rsplit(".", 1)[-1]
            found.update(f"{parent}.{child}" for child in NEW_MODULES if hasattr(module, child))
    return sorted(found)


def training_dtype(device: torch.device) -> torch.dtype:
    """Frozen weights in bf16 on GPUs (LoRA weights stay fp32), fp32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep every trained tensor in fp32. PEFT makes LoRA weights fp32 but copies modules_to_save
    (hedgehog's feature maps, the gate projection) in the frozen weights' bf16, where AdamW's steps
    of ~lr = 1e-3 round away on weights near 1 (bf16's spacing there is 2^-7); FSDP2 also needs one
    dtype across the tensors it trains. Autocast still computes in bf16."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Recovery:
    def __init__(self, opts: RecoverOptions, console: Console | None = None):
        self.opts = opts
        self.console = console or Console(stderr=True)
        self.out = Path(opts.out).expanduser().resolve()
        self.work = workdir_for(self.out)
        self.world, self.device = init_world(resolve_device(opts.device))
        self.main = self.world.is_main
        self.steps_this_run = 0  # optimizer steps taken by this invocation (--stop-after-steps)
        self.sharded = opts.fsdp and self.world.size > 1
        if opts.cuda_graph and self.device.type != "cuda":
            raise LinearizeError("--cuda-graph needs a CUDA device: drop it to train on the CPU")
        if opts.cuda_graph and (self.world.size > 1 or opts.gradient_checkpointing):
            raise LinearizeError("--cuda-graph runs on one GPU without --gradient-checkpointing: drop one of them")

    # -- setup -------------------------------------------------------------------------------
    def prepare_folders(self) -> Position | None:
        """Check OUT and the work folder (every rank), then set them up (rank 0)."""
        if self.opts.resume:
            latest = self.latest_checkpoint()
            if latest is None:
                raise LinearizeError(f"nothing to resume: no checkpoint in {self.work}; run without --resume")
            barrier(self.world)
            if self.main:
                (self.work / STOPPED).unlink(missing_ok=True)
            return latest
        check_output(self.out, self.opts.overwrite)
        if self.work.exists() and not self.opts.overwrite:
            raise LinearizeError(
                f"an unfinished run is in {self.work}: pass --resume to continue it or --overwrite to start over"
            )
        barrier(self.world)  # every rank has looked before rank 0 changes anything
        if self.main:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
        barrier(self.world)
        return None

    def load(self):
        from peft import LoraConfig, get_peft_model

        from .. import is_converted

        torch.manual_seed(self.opts.seed)
        model = load_causal_lm(self.opts.ckpt, training_dtype(self.device), self.device)
        if not is_converted(model):
            raise LinearizeError(f"{self.opts.ckpt} is not a converted checkpoint: run `linearize convert` first")
        if self.opts.merge and self.main:  # found out now, not after the training
            require_free_space(self.work, tensor_bytes(model), "--merge's standalone checkpoint")
        self.tokenizer = load_tokenizer(self.opts.ckpt)
        new_modules = new_attention_modules(model)
        lora = LoraConfig(
            r=self.opts.lora_r, lora_alpha=self.opts.lora_alpha, target_modules=self.opts.lora_targets,
            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", modules_to_save=new_modules or None,
        )
        try:
            self.model = get_peft_model(model, lora)
        except ValueError as e:
            raise LinearizeError(f"--lora-targets: {first_line(e)}") from e
        upcast_trainable(self.model)
        if self.opts.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        if self.sharded:
            shard(self.model, list(model.model.layers))
        self.model.train()

    # -- checkpoints -------------------------------------------------------------------------
    def latest_checkpoint(self) -> Position | None:
        folder = self.work / CHECKPOINTS
        steps = sorted(folder.glob("step-*")) if folder.exists() else []
        if not steps:
            return None
        return Position(**json.loads((steps[-1] / "position.json").read_text()))

    def save_checkpoint(self, pos: Position, optimizer, scheduler, sync: bool = True) -> Path:
        folder = self.work / CHECKPOINTS
        name = f"step-{pos.stage:02d}-{pos.step:07d}"
        # Whole tensors, gathered from the shards where the model is sharded (a collective: every rank).
        weights, optim = trainable_state(self.model), self.optimizer_state(optimizer)
        if not self.main:  # rank 0 writes; the others wait so nobody reads a half-written checkpoint
            if sync:
                barrier(self.world)
            return folder / name
        final = folder / name
        # whole or not at all (a full disk, say): the last whole checkpoint stays the one --resume finds
        with atomic_folder(final, overwrite=True) as tmp:
            self.model.save_pretrained(tmp / "adapter", state_dict=weights)
            torch.save({"weights": weights, "optimizer": optim, "scheduler": scheduler.state_dict(),
                        "rng": rng_state()}, tmp / "trainer.pt")
            (tmp / "position.json").write_text(json.dumps(pos.__dict__))
        for old in sorted(folder.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        if sync:
            barrier(self.world)
        return final

    def restore(self, pos: Position, optimizer, scheduler) -> None:
        folder = self.work / CHECKPOINTS / f"step-{pos.stage:02d}-{pos.step:07d}"
        state = torch.load(folder / "trainer.pt", weights_only=False, map_location="cpu")
        load_trainable_state(self.model, state["weights"])
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def optimizer_state(self, optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                        cpu_offload=True))

    # -- training ----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.work / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def validate(self, val: Blocks) -> float | None:
        if len(val.input_ids) == 0:
            return None
        self.model.eval()
        losses = []
        for i in range(min(len(val.input_ids), self.opts.val_blocks)):
            ids = val.input_ids[i : i + 1].to(self.device)
            labels = val.labels[i : i + 1].to(self.device)
            with self.autocast():
                losses.append(lm_loss(self.model, ids, labels).float().item())
        self.model.train()
        return sum(losses) / len(losses)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the training device; on CUDA through pinned memory, which copies without
        making the host wait for the GPU (a pageable copy does)."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def loss_of(self, stage: str, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The stage's training loss of one micro-batch, under autocast."""
        with self.autocast():
            return training_loss(stage, self.opts.loss, self.opts.kd_weight, self.model, input_ids, labels)

    def run_stage(self, index: int, stage: str, train: Blocks, val: Blocks, resume_at: Position | None) -> dict:
        opts = self.opts
        budget, total_steps = stage_plan(opts, stage, train, self.world.size)
        seq = opts.orient_seq_len if stage == "orient" else opts.seq_len
        params = [p for p in self.model.parameters() if p.requires_grad]
        compute = functools.partial(self.loss_of, stage)
        if opts.cuda_graph and stage == "lm":  # align and orient run eagerly (their hooks keep Python state)
            run_pass = GraphedPass(compute, params, (opts.micro_batch, seq), self.device)
        else:
            run_pass = functools.partial(eager_pass, compute)
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
        scheduler = make_scheduler(optimizer, opts, total_steps)
        pos = Position(stage=index)
        if resume_at is not None and resume_at.stage == index:
            self.restore(resume_at, optimizer, scheduler)
            pos = resume_at
        last_loss, val_loss = float("nan"), None
        started, start_tokens = time.perf_counter(), pos.tokens
        progress = Progress(
            TextColumn(f"[bold]{stage}[/]"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
            TextColumn("{task.fields[rate]}"), TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TimeRemainingColumn(), console=self.console, transient=False, disable=not self.main,
        )
        with progress:
            task = progress.add_task(stage, total=budget, completed=pos.tokens, rate="", loss="-", lr="-")
            try:
                while pos.step < total_steps and pos.tokens < budget:
                    step_loss, step_tokens = self.optimizer_step(stage, run_pass, train, pos, budget, seq, optimizer,
                                                                  scheduler)
                    pos.step += 1
                    pos.tokens += step_tokens
                    last_loss = step_loss
                    rate = (pos.tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
                    record = {"stage": stage, "step": pos.step, "tokens": pos.tokens, "loss": step_loss,
                              "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate}
                    if pos.step % opts.eval_every == 0 or pos.step == total_steps or pos.tokens >= budget:
                        val_loss = record["val_loss"] = self.validate(val)
                    self.log(record)
                    progress.update(task, completed=pos.tokens, rate=f"{rate:,.0f} tok/s", loss=f"{step_loss:.4f}",
                                    lr=f"{record['lr']:.2e}")
                    self.steps_this_run += 1
                    if opts.stop_after_steps is not None and self.steps_this_run >= opts.stop_after_steps:
                        saved = self.save_checkpoint(pos, optimizer, scheduler)  # every rank stops here together
                        message = (f"after {self.steps_this_run} steps (--stop-after-steps), at {stage} step "
                                   f"{pos.step}: checkpoint saved in {saved}; rerun with --resume to continue")
                        if self.main:  # torchrun reports only "a child failed": the launcher reads this note
                            (self.work / STOPPED).write_text(message)
                        raise Stopped(message)
                    if pos.step % opts.save_every == 0:
                        self.save_checkpoint(pos, optimizer, scheduler)
            except KeyboardInterrupt:
                if self.world.size > 1 and (self.sharded or not self.main):
                    # Gathering shards needs every rank, and they are all stopping: the periodic checkpoint stays.
                    raise Interrupted("interrupted: rerun with --resume to continue from the last checkpoint") from None
                saved = self.save_checkpoint(pos, optimizer, scheduler, sync=False)  # the other ranks are stopping too
                raise Interrupted(
                    f"interrupted at {stage} step {pos.step}: checkpoint saved in {saved}; rerun with --resume"
                ) from None
        self.save_checkpoint(pos, optimizer, scheduler)
        return {"stage": stage, "steps": pos.step, "tokens": pos.tokens, "loss": last_loss, "val_loss": val_loss,
                "seconds": time.perf_counter() - started}

    def optimizer_step(self, stage, run_pass, train: Blocks, pos: Position, budget: int, seq: int, optimizer, scheduler):
        """One optimizer step over up to grad_accum micro-batches, each through `run_pass` (an eager pass
        or a GraphedPass); returns (mean loss, tokens)."""
        opts = self.opts
        world = self.world
        items, tokens_left = [], budget - pos.tokens  # (block, length): the budget ends exactly, mid-block if need be
        while len(items) < opts.micro_batch * opts.grad_accum * world.size and tokens_left > 0:
            items.append((block_order(len(train.input_ids), pos.blocks + len(items), opts.seed), min(seq, tokens_left)))
            tokens_left -= items[-1][1]
        micro = []
        mine = items[world.rank :: world.size]  # each rank takes every size-th block of the step
        for i in range(0, len(mine), opts.micro_batch):
            group = mine[i : i + opts.micro_batch]
            for n in sorted({n for _, n in group}, reverse=True):  # a cut-short block rides alone
                rows = [b for b, m in group if m == n]
                ids, labels = train.input_ids[rows, :n], train.labels[rows, :n]
                micro.append((ids, labels, loss_tokens(stage, ids, labels)))  # counted on the CPU: no device sync
        if self.sharded:  # every rank must run as many forward/backward passes (they are collectives)
            most = all_reduce_max(world, len(micro), self.device)
            spare = micro[0] if micro else (train.input_ids[:1, :seq], train.labels[:1, :seq], 0.0)
            micro += [(spare[0], spare[1], 0.0)] * (most - len(micro))  # weight 0: no effect on the step
        # a recorded pass adds into the same gradient tensors: zero them, do not drop them
        optimizer.zero_grad(set_to_none=not isinstance(run_pass, GraphedPass))
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Token-weighted sum of losses, tokens, non-finite count: kept on the device and read once a step,
        # so the host never waits for a forward before queueing its backward (a small model's step is
        # bound by the host). A non-finite loss's gradients are never applied: see below.
        loss_sum = torch.zeros(3, device=self.device)
        for ids, labels, weight in micro:
            loss = run_pass(self.to_device(ids), self.to_device(labels), weight)
            loss_sum[2] += (~torch.isfinite(loss)).float()
            loss_sum[0] += loss.float() * weight
            loss_sum[1] += weight
        all_reduce_sum(world, loss_sum)
        loss_total, weight_total, non_finite = loss_sum.tolist()  # the step's one wait for the GPU
        if non_finite > 0:
            last = self.latest_checkpoint()
            where = f"the last good checkpoint is step {last.step} in {self.work / CHECKPOINTS}" if last else \
                "no checkpoint was saved yet"
            raise LinearizeError(
                f"loss is nan at {stage} step {pos.step + 1}: stopped; {where} (lower --lr or check the data, then --resume)"
            )
        weight_total = max(weight_total, 1.0)  # a step of prompt-only blocks: loss 0, no gradient
        # Gradients of the step's token-mean loss, on every rank alike. FSDP has
        # already averaged them over the ranks (reduce-scatter); replicated ranks sum them here.
        for p in params:
            if self.sharded:
                if p.grad is not None:
                    p.grad.mul_(world.size / weight_total)
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(world, p.grad).div_(weight_total)
        torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        pos.blocks += len(items)
        return loss_total / weight_total, sum(n for _, n in items)

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> Path:
        resume_at = self.prepare_folders()
        try:
            return self.train(resume_at)
        except BaseException:
            # Failed before its first step (bad data, no room for --merge, ...) with no checkpoint: nothing to
            # resume, so the work folder goes, and the same command can simply be run again once fixed. A resumed
            # run always has a checkpoint, so its folder stays.
            if self.main and self.steps_this_run == 0 and self.latest_checkpoint() is None:
                shutil.rmtree(self.work, ignore_errors=True)
            raise

    def train(self, resume_at: Position | None) -> Path:
        self.load()
        seqs = {"orient": self.opts.orient_seq_len}
        data: dict[int, tuple[Blocks, Blocks, DataReport]] = {}
        finished = self.work / "stages.json"
        results = json.loads(finished.read_text()) if resume_at and finished.exists() else []
        for index, stage in enumerate(self.opts.stages):
            if resume_at is not None and index < resume_at.stage:
                continue  # finished before the interruption; its result is in stages.json
            seq = seqs.get(stage, self.opts.seq_len)
            if seq not in data:
                data[seq] = prepare(self.opts.data, self.tokenizer, fmt=self.opts.format, seq_len=seq,
                                    val_fraction=self.opts.val_fraction, seed=self.opts.seed)
                if self.main:
                    self.console.print(data[seq][2].summary())
                    (self.work / "data_report.json").write_text(json.dumps(_report_dict(data[seq][2]), indent=1))
            train, val, _ = data[seq]
            result = self.run_stage(index, stage, train, val, resume_at)
            results = [r for r in results if r["stage"] != stage] + [result]
            if self.main:
                (self.work / "stages.json").write_text(json.dumps(results, indent=1))
        report = data.get(self.opts.seq_len, next(iter(data.values())))[2]
        weights = trainable_state(self.model)  # gathered from the shards: every rank takes part
        if self.main:
            self.finish(results, report, weights)
        barrier(self.world)
        shutdown(self.world)
        return self.out

    def finish(self, results: list[dict], report: DataReport, weights: dict[str, torch.Tensor]) -> None:
        from .card import adapter_card

        self.model.save_pretrained(self.work, state_dict=weights)
        self.tokenizer.save_pretrained(self.work)
        card = adapter_card(self.opts, results, report)
        (self.work / "README.md").write_text(card)
        if self.opts.merge:
            from ..convert import write_checkpoint

            if self.sharded:  # fold the adapter into a fresh, whole copy of the model on the CPU
                from peft import PeftModel

                base = load_causal_lm(self.opts.ckpt, training_dtype(self.device), torch.device("cpu"))
                merged = PeftModel.from_pretrained(base, self.work).merge_and_unload()
            else:
                merged = self.model.merge_and_unload()
            merged.to(merged.get_input_embeddings().weight.dtype)  # the fp32 trained copies back to the model's dtype
            merged.eval()
            write_checkpoint(merged, self.tokenizer, self.work / "merged", card)
        shutil.rmtree(self.work / CHECKPOINTS, ignore_errors=True)
        if self.out.exists():  # --overwrite
            shutil.rmtree(self.out)
        self.work.rename(self.out)


def _report_dict(report: DataReport) -> dict:
    d = dict(report.__dict__)
    d["malformed"] = dict(report.malformed)
    return d


def recover(opts: RecoverOptions, console: Console | None = None) -> Path:
    """Run a recovery; with nproc > 1 (and not already under torchrun) in that many processes."""
    if opts.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        launch(opts, console)
        return Path(opts.out).expanduser().resolve()
    return Recovery(opts, console).run()
