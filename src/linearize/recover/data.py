"""Recovery data: read rows, format and mask them, pack them into fixed-length blocks.

Formats: `alpaca` (instruction / input / output; the prompt is masked from the loss with -100
and EOS is appended), `chat` (a `messages` list rendered with the tokenizer's chat template;
only assistant turns are learned), `text` (plain documents, every token learned). Malformed
rows are counted by reason and reported, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LinearizeError, first_line

IGNORE = -100
FORMATS = ("auto", "alpaca", "text", "chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class DataReport:
    source: str
    format: str
    rows: int = 0
    used: int = 0
    malformed: Counter = field(default_factory=Counter)
    tokens: int = 0  # tokens in the packed blocks
    learned_tokens: int = 0  # of which carry a label
    train_blocks: int = 0
    val_blocks: int = 0

    def summary(self) -> str:
        bad = ", ".join(f"{n} {why}" for why, n in self.malformed.most_common()) or "none"
        return (
            f"{self.source}: {self.used}/{self.rows} rows used ({self.format}); malformed: {bad}; "
            f"{self.tokens:,} tokens in {self.train_blocks} train + {self.val_blocks} validation blocks"
        )


class Malformed(ValueError):
    """A row that cannot be used; the message is the reason, counted in the report."""


def read_rows(source: str) -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet/.txt file or a Hub dataset (train split)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.is_dir():
        raise LinearizeError(f"{source} is a folder: point --data at a .json, .jsonl, .parquet or .txt file")
    if path.is_file() and path.stat().st_size == 0:
        raise LinearizeError(f"{source} is empty: there are no rows to train on")
    try:
        if path.exists():
            suffix = path.suffix.lower()
            if suffix in (".json", ".jsonl"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            elif suffix in (".txt", ".raw", ".text"):
                ds = datasets.load_dataset("text", data_files=str(path), split="train", sample_by="paragraph")
            else:
                raise LinearizeError(f"{source}: unknown data file type {suffix!r}; use .json, .jsonl, .parquet or .txt")
        elif source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl", ".parquet", ".txt")):
            raise LinearizeError(f"data file not found: {source}")
        else:
            ds = datasets.load_dataset(source, split="train")
    except LinearizeError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(e):  # datasets' words for a file with no records, such as "[]"
            raise LinearizeError(f"{source} has no usable rows (it holds no records)") from e
        raise LinearizeError(f"could not read {source}: {first_line(e)}") from e
    return [dict(row) for row in ds]


def detect_format(rows: list[dict], source: str) -> str:
    keys = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "messages" in keys:
        return "chat"
    if "text" in keys:
        return "text"
    raise LinearizeError(
        f"{source}: cannot tell the data format from columns {sorted(keys)}; "
        "expected instruction/output (alpaca), messages (chat) or text; or pass --format"
    )


def encode_alpaca(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    instruction, output = row.get("instruction"), row.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise Malformed("missing instruction")
    if not isinstance(output, str) or not output.strip():
        raise Malformed("missing output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise Malformed("input is not text")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = tokenizer(template.format(instruction=instruction, input=extra), add_special_tokens=True).input_ids
    answer = tokenizer(output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def encode_text(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Malformed("empty text")
    ids = tokenizer(text.strip(), add_special_tokens=True).input_ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_chat(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Malformed("missing messages")
    if any(not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str) for m in messages):
        raise Malformed("message without role or content")
    if not any(m["role"] == "assistant" for m in messages):
        raise Malformed("no assistant turn")
    if tokenizer.chat_template is None:
        raise LinearizeError("this tokenizer has no chat template: use --format alpaca or text")

    def render(msgs, prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt, return_dict=False))

    ids, labels = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], prompt=True)
        upto = render(messages[: i + 1], prompt=False)
        labels += [IGNORE] * (len(before) - len(ids)) + upto[len(before) :]
        ids = upto
    return ids, labels


ENCODERS = {"alpaca": encode_alpaca, "text": encode_text, "chat": encode_chat}


@dataclass
class Blocks:
    input_ids: torch.Tensor  # [N, seq_len]
    labels: torch.Tensor  # [N, seq_len], -100 where nothing is learned


def split_sources(source: str) -> list[str]:
    """`--data a.json,b.txt`: several sources, mixed into one set of blocks."""
    return [part.strip() for part in source.split(",") if part.strip()]


def encode_source(source: str, tokenizer, fmt: str) -> tuple[list, DataReport]:
    """One source's encoded examples and its report; a source with no usable row is an error."""
    rows = read_rows(source)
    fmt = detect_format(rows, source) if fmt == "auto" else fmt
    report = DataReport(source=source, format=fmt, rows=len(rows))
    encode = ENCODERS[fmt]
    examples = []
    for row in rows:
        try:
            examples.append(encode(row, tokenizer))
        except Malformed as why:
            report.malformed[str(why)] += 1
    report.used = len(examples)
    if not examples:
        raise LinearizeError(f"{source} has no usable rows ({report.summary()}); check --format")
    return examples, report


def prepare(
    source: str, tokenizer, *, fmt: str = "auto", seq_len: int = 1024, val_fraction: float = 0.02, seed: int = 0
) -> tuple[Blocks, Blocks, DataReport]:
    """Read, encode and pack `source` (one, or several comma-separated, each in its own format when
    `fmt` is auto); returns train blocks, validation blocks and a report."""
    if fmt not in FORMATS:
        raise LinearizeError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if seq_len < 2:
        raise LinearizeError(f"--seq-len must be at least 2, got {seq_len}")
    sources = split_sources(source)
    if not sources:
        raise LinearizeError("--data is empty: give a data file or a Hub dataset name")
    encoded = [encode_source(src, tokenizer, fmt) for src in sources]
    examples = [example for part, _ in encoded for example in part]
    parts = [part_report for _, part_report in encoded]
    malformed = Counter()
    for part in parts:  # with several sources a reason names its source: "missing output" alone says not where
        malformed.update({(f"{why} ({part.source})" if len(parts) > 1 else why): n for why, n in part.malformed.items()})
    report = DataReport(source=" + ".join(sources), format="+".join(dict.fromkeys(p.format for p in parts)),
                        rows=sum(p.rows for p in parts), used=len(examples), malformed=malformed)
    # Shuffle documents, then concatenate and cut into blocks (the remainder is padded out of the loss).
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = torch.tensor([t for i in order for t in examples[i][0]])
    labels = torch.tensor([t for i in order for t in examples[i][1]])
    n_blocks = (len(ids) + seq_len - 1) // seq_len
    pad = n_blocks * seq_len - len(ids)
    ids = torch.cat([ids, ids.new_full((pad,), tokenizer.eos_token_id)]).view(n_blocks, seq_len)
    labels = torch.cat([labels, labels.new_full((pad,), IGNORE)]).view(n_blocks, seq_len)
    n_val = max(1, round(val_fraction * n_blocks)) if n_blocks >= 2 and val_fraction > 0 else 0
    report.tokens, report.learned_tokens = n_blocks * seq_len, int((labels != IGNORE).sum())
    report.train_blocks, report.val_blocks = n_blocks - n_val, n_val
    return Blocks(ids[n_val:], labels[n_val:]), Blocks(ids[:n_val], labels[:n_val]), report


def parse_tokens(text: str | int | None) -> int | None:
    """'20M' -> 20_000_000; also K and B suffixes and plain integers."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise LinearizeError(f"cannot read a token count from {text!r}: use e.g. 500K, 20M or 1B") from None
    if value <= 0:
        raise LinearizeError(f"a token budget must be positive, got {text!r}")
    return int(value)
