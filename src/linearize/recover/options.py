"""Recovery options: one pydantic model, the single home of every default (CLI and recipes read it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .data import FORMATS, parse_tokens

STAGES = ("align", "orient", "lm")


class RecoverOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ckpt: str = Field(description="converted checkpoint folder")
    data: str = Field(description="Hub dataset name or local .json/.jsonl/.parquet/.txt; several, comma-separated, are mixed")
    out: Path = Field(description="output folder (the adapter)")
    format: Literal[FORMATS] = Field("auto", description="data format")  # type: ignore[valid-type]
    tokens: int | None = Field(None, description="token budget per stage (e.g. 20M); default: --epochs over the data")
    epochs: float = Field(1.0, gt=0, description="passes over the data when no --tokens")
    seq_len: int = Field(1024, ge=2, description="packed sequence length")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA alpha")
    lora_targets: list[str] = Field(["q_proj", "k_proj", "v_proj"], description="modules that get LoRA")
    loss: Literal["lm", "kd", "lm+kd"] = Field("lm", description="objective of the lm stage")
    kd_weight: float = Field(0.5, ge=0, le=1, description="weight of kd in lm+kd")
    stages: list[Literal[STAGES]] = Field(["lm"], description="stages in order: align, orient, lm")  # type: ignore[valid-type]
    stage_tokens: dict[str, int] = Field({}, description="token budget of individual stages, e.g. align=2M")
    orient_seq_len: int = Field(64, ge=2, description="sequence length of the orient stage")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule after warmup")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps spent warming up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    micro_batch: int = Field(1, ge=1, description="sequences per forward pass")
    grad_accum: int = Field(8, ge=1, description="micro-batches per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    cuda_graph: bool = Field(False, description="replay each micro-batch's forward and backward of the lm stage "
                             "from a CUDA graph (one GPU): for small models, whose steps wait on the host")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="share of blocks held out for validation")
    val_blocks: int = Field(16, ge=1, description="validation blocks evaluated each time, at most")
    eval_every: int = Field(200, ge=1, description="optimizer steps between validations")
    save_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    seed: int = Field(0, description="data order and initialisation seed")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    nproc: int = Field(1, ge=1, description="processes (GPUs) to train on: relaunched under torchrun")
    fsdp: bool = Field(False, description="with several processes, shard the model (FSDP2) instead of replicating it")
    resume: bool = Field(False, description="continue an interrupted run in OUT")
    stop_after_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps of this "
                                         "run, with a checkpoint (a job with a time slot); --resume continues")
    merge: bool = Field(False, description="also write a merged standalone checkpoint to OUT/merged")
    overwrite: bool = Field(False, description="replace OUT if it exists")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        return parse_tokens(v)

    @field_validator("stage_tokens", mode="before")
    @classmethod
    def _stage_tokens(cls, v):
        if isinstance(v, str):  # "align=2M,lm=20M"
            pairs = [p.split("=", 1) for p in v.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected stage=tokens pairs like align=2M,lm=20M")
            v = {k.strip(): val for k, val in pairs}
        out = {k: parse_tokens(val) for k, val in dict(v).items()}
        bad = sorted(set(out) - set(STAGES))
        if bad:
            raise ValueError(f"unknown stage(s) {bad}: stages are {', '.join(STAGES)}")
        return out

    def budget(self, stage: str) -> int | None:
        return self.stage_tokens.get(stage, self.tokens)
