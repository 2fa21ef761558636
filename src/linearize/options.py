"""Convert options: one pydantic model, the single home of convert's defaults (CLI and recipes read it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .modeling import TARGETS


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: str = Field(description="Hub id, local model folder, or .gguf file")
    out: Path = Field(description="output folder (must not exist unless overwrite)")
    to: str = Field("gla", description="target structure: gla (Liger), mamba2, hgrn2, hedgehog, gdn or gsa")
    window: int = Field(64, ge=0, description="sliding-window size in tokens; 0 = pure GLA (--no-window)")
    keep_attention: list[int] = Field([], description="layers kept as softmax attention, e.g. 0,8,16")
    keep_attention_every: int | None = Field(None, ge=1, description="keep every N-th layer (0, N, 2N, ...)")
    gate: Literal["key", "none", "projection"] = Field(
        "key", description="forget gate: from the key (Liger); none or a new random projection (ablations)"
    )
    slots: int = Field(64, ge=1, description="memory slots per head of the gsa target (must divide head_dim)")
    dtype: str = Field("auto", description="auto (as stored), float32, float16 or bfloat16")
    overwrite: bool = Field(False, description="replace OUT if it exists")

    @field_validator("to")
    @classmethod
    def _target(cls, v: str) -> str:
        if v not in TARGETS:
            raise ValueError(f"unknown target {v!r}: choose one of {', '.join(TARGETS)}")
        return v
