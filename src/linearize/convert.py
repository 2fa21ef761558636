"""`linearize convert`: a source checkpoint in, a converted Hugging Face folder out."""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from . import __version__
from .card import conversion_card
from .checkpoint import atomic_folder, check_output, require_free_space, tensor_bytes
from .errors import LinearizeError, first_line
from .families import family_for
from .loading import load_tokenizer, resolve_device, resolve_dtype, split_source
from .modeling import CLASSES, TARGETS, default_settings, linearize_model
from .options import ConvertOptions

D = {name: field.default for name, field in ConvertOptions.model_fields.items()}


def kept_layers(n_layers: int, keep: list[int] | None, keep_every: int | None) -> list[int]:
    """--keep-attention 0,8,16 or --keep-attention-every 4 (layers 0, 4, 8, ...), checked against the model."""
    if keep and keep_every:
        raise LinearizeError("use either --keep-attention or --keep-attention-every, not both")
    if keep_every is not None:
        if keep_every <= 0:
            raise LinearizeError(f"--keep-attention-every must be a positive integer, got {keep_every}")
        return list(range(0, n_layers, keep_every))
    keep = sorted(set(keep or []))
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise LinearizeError(f"--keep-attention {bad} out of range: this model has layers 0..{n_layers - 1}")
    return keep


def convert_with(opts: ConvertOptions, command: str | None = None, console: Console | None = None) -> Path:
    """`convert` from validated options (the CLI and recipes come this way)."""
    return convert(
        opts.source, opts.out, target=opts.to, window=opts.window, keep_attention=opts.keep_attention,
        keep_attention_every=opts.keep_attention_every, gate=opts.gate, slots=opts.slots, dtype=opts.dtype,
        overwrite=opts.overwrite,
        command=command, console=console,
    )


def convert(
    source: str,
    out: Path,
    *,
    target: str = D["to"],
    window: int = D["window"],
    keep_attention: list[int] | None = None,
    keep_attention_every: int | None = None,
    gate: str = D["gate"],
    slots: int = D["slots"],
    dtype: str = D["dtype"],
    overwrite: bool = False,
    command: str | None = None,
    console: Console | None = None,
) -> Path:
    """Convert `source` (Hub id, folder or .gguf) and write it to `out`; returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    console = console or Console(stderr=True)
    start = time.perf_counter()
    if target not in TARGETS:
        raise LinearizeError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if window < 0:
        raise LinearizeError(f"--window must be a positive number of tokens, got {window} (use --no-window for pure GLA)")
    out = Path(out)
    check_output(out, overwrite)  # fail before the slow part
    torch_dtype = resolve_dtype(dtype, resolve_device("auto"))

    path, extra = split_source(source)
    with console.status(f"reading {source}"):
        try:
            config = AutoConfig.from_pretrained(path, **extra)
        except (OSError, ValueError) as e:
            raise LinearizeError(f"could not read a model config from {source}: {first_line(e)}") from e
        family = family_for(config.model_type)
        keep = kept_layers(config.num_hidden_layers, keep_attention, keep_attention_every)
    with console.status(f"loading {source} ({family.name})"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        if extra.get("gguf_file"):  # GGUF weights arrive dequantized: save them as plain tensors
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        tokenizer = load_tokenizer(source)
    settings = default_settings(
        target=target, window=window, keep_attention=keep, gate=gate, slots=slots, source=source, family=family.name,
        version=__version__,
    )
    linearize_model(model, family, settings)
    command = command or f"linearize convert {source} --to {target} -o {out}"
    require_free_space(out.parent, tensor_bytes(model), f"the checkpoint {out}")
    with console.status(f"writing {out}"), atomic_folder(out, overwrite) as tmp:
        write_checkpoint(model, tokenizer, tmp, conversion_card(model.config, command, time.perf_counter() - start))
    return out


def write_checkpoint(model, tokenizer, folder: Path, card: str) -> None:
    """A converted model as a Hugging Face folder: weights, config with auto_map, tokenizer, shim, card."""
    family_name = model.config.linearize["family"]
    config_class, causal_lm_class = CLASSES[family_name]
    model.config.auto_map = {
        "AutoConfig": f"modeling_linearize.{config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_linearize.{causal_lm_class.__name__}",
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shim = resources.files("linearize") / "templates" / "modeling_linearize.py"
    with resources.as_file(shim) as shim_path:
        shutil.copy(shim_path, folder / "modeling_linearize.py")
    (folder / "README.md").write_text(card)
