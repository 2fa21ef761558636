"""Recover: data handling, objectives, and a training loop that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.convert import convert
from linearize.errors import LinearizeError
from linearize.loading import load_causal_lm
from linearize.recover import losses
from linearize.recover.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE, encode_alpaca, parse_tokens, prepare
from linearize.recover.options import RecoverOptions
from linearize.recover.trainer import Recovery, recover, workdir_for

from .conftest import FIXTURES
from .helpers import run_cli

STORIES_TEXT = FIXTURES / "data" / "tinystories.txt"
ALPACA = FIXTURES / "data" / "alpaca_60.json"


@pytest.fixture(scope="module")
def converted_dir(stories_path, tmp_path_factory):
    return convert(str(stories_path), tmp_path_factory.mktemp("conv") / "gla", window=16)


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    return AutoTokenizer.from_pretrained(stories_path)


def options(converted_dir, out, **kw) -> RecoverOptions:
    base = dict(ckpt=str(converted_dir), data=str(STORIES_TEXT), out=out, seq_len=64, micro_batch=2, grad_accum=1,
                tokens=None, epochs=1.0, eval_every=1000, save_every=1000, lr=1e-3, warmup_ratio=0.0, val_blocks=2)
    base.update(kw)
    return RecoverOptions(**base)


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


# -- data ---------------------------------------------------------------------------------------


def test_alpaca_prompt_is_masked_token_for_token(tokenizer):
    row = {"instruction": "Name a color.", "input": "", "output": "Red"}
    ids, labels = encode_alpaca(row, tokenizer)
    prompt = tokenizer(ALPACA_NO_INPUT.format(instruction="Name a color."), add_special_tokens=True).input_ids
    answer = tokenizer("Red", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ids == prompt + answer
    assert labels == [IGNORE] * len(prompt) + answer
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    with_input = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    ids, labels = encode_alpaca(with_input, tokenizer)
    prompt = tokenizer(ALPACA_WITH_INPUT.format(instruction="Add.", input="2 and 3")).input_ids
    assert labels[: len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt) :] == ids[len(prompt) :]


def test_malformed_rows_are_counted_and_empty_data_is_an_error(tokenizer, tmp_path):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "Say hi.", "input": "", "output": ""},
        {"instruction": "", "input": "", "output": "x"},
        {"instruction": "Count.", "input": "", "output": "1 2 3"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    train, val, report = prepare(str(path), tokenizer, seq_len=16, val_fraction=0.0)
    assert (report.rows, report.used, report.format) == (4, 2, "alpaca")
    assert report.malformed == {"missing output": 1, "missing instruction": 1}
    assert "1 missing output" in report.summary()
    assert train.input_ids.shape[1] == 16 and len(val.input_ids) == 0
    path.write_text(json.dumps(rows[1:3]))
    with pytest.raises(LinearizeError, match="no usable rows"):
        prepare(str(path), tokenizer, seq_len=16)
    with pytest.raises(LinearizeError, match="not found"):
        prepare(str(tmp_path / "missing.json"), tokenizer)


def test_several_sources_mix_each_in_its_own_format(tokenizer, tmp_path):
    """--data a.json,b.txt: both sources' examples packed together, each formatted (and masked) as its
    own kind; counts add up, a malformed reason names its source, an empty source is an error."""
    both, _, report = prepare(f"{ALPACA}, {STORIES_TEXT}", tokenizer, seq_len=32, val_fraction=0.0)
    alpaca, _, a = prepare(str(ALPACA), tokenizer, seq_len=32, val_fraction=0.0)
    text, _, t = prepare(str(STORIES_TEXT), tokenizer, seq_len=32, val_fraction=0.0)
    assert report.format == "alpaca+text" and report.source == f"{ALPACA} + {STORIES_TEXT}"
    assert (report.rows, report.used) == (a.rows + t.rows, a.used + t.used)
    # the same learned tokens, in another order and packing: alpaca's prompts stay masked
    assert report.learned_tokens == a.learned_tokens + t.learned_tokens
    assert sorted(both.labels[both.labels != IGNORE].tolist()) == sorted(
        alpaca.labels[alpaca.labels != IGNORE].tolist() + text.labels[text.labels != IGNORE].tolist())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": ""},
                               {"instruction": "Count.", "input": "", "output": "1 2 3"}]))
    _, _, report = prepare(f"{STORIES_TEXT},{bad}", tokenizer, seq_len=32)
    assert report.malformed == {f"missing output ({bad})": 1}
    bad.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": ""}]))
    with pytest.raises(LinearizeError, match=f"{bad} has no usable rows"):
        prepare(f"{STORIES_TEXT},{bad}", tokenizer, seq_len=32)
    with pytest.raises(LinearizeError, match="--data is empty"):
        prepare(" , ", tokenizer)


def test_packing_split_and_seeded_shuffle(tokenizer):
    a_train, a_val, report = prepare(str(STORIES_TEXT), tokenizer, seq_len=64, seed=1)
    b_train, _, _ = prepare(str(STORIES_TEXT), tokenizer, seq_len=64, seed=1)
    c_train, _, _ = prepare(str(STORIES_TEXT), tokenizer, seq_len=64, seed=2)
    assert torch.equal(a_train.input_ids, b_train.input_ids)
    assert not torch.equal(a_train.input_ids, c_train.input_ids)
    assert report.format == "text" and report.val_blocks == len(a_val.input_ids) >= 1
    assert report.tokens == (report.train_blocks + report.val_blocks) * 64


def test_token_budgets_parse():
    assert parse_tokens("20M") == 20_000_000 and parse_tokens("1.5K") == 1500 and parse_tokens(77) == 77
    with pytest.raises(LinearizeError):
        parse_tokens("lots")


# -- objectives ---------------------------------------------------------------------------------


@pytest.fixture
def peft_model(converted_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))


def test_kd_is_zero_for_the_student_in_teacher_mode(peft_model):
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    with linearize.teacher(peft_model):
        assert losses.kd_loss(peft_model, ids, labels).item() < 1e-6
        assert losses.align_loss(peft_model, ids).item() < 1e-10
    assert losses.kd_loss(peft_model, ids, labels).item() > 1e-3


def test_lm_kd_mix_runs_the_student_once_and_matches_the_separate_losses(peft_model):
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :9] = IGNORE
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    torch.nn.init.normal_(lora[1], std=0.02)  # a non-zero lora_B: the student differs from the teacher in its adapter too

    def loss_and_grads(fn):
        peft_model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora]

    forwards = []
    handle = peft_model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    mixed, mixed_grads = loss_and_grads(lambda: losses.training_loss("lm", "lm+kd", 0.3, peft_model, ids, labels))
    handle.remove()
    assert len(forwards) == 2  # the teacher's and the student's: one student forward, so one backward
    apart, apart_grads = loss_and_grads(
        lambda: 0.7 * losses.lm_loss(peft_model, ids, labels) + 0.3 * losses.kd_loss(peft_model, ids, labels))
    torch.testing.assert_close(mixed, apart, rtol=1e-5, atol=1e-6)
    for a, b in zip(mixed_grads, apart_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in mixed_grads)


def test_align_and_orient_losses_train_the_lora_weights(peft_model):
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    # the orient stage matches attention matrices, which v does not enter
    for objective, trained in ((losses.align_loss, ("q_proj", "k_proj", "v_proj")), (losses.orient_loss, ("q_proj", "k_proj"))):
        peft_model.zero_grad()
        loss = objective(peft_model, ids)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        for proj in trained:
            grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n and proj in n]  # A gets none while B = 0
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), (objective.__name__, proj)


# -- training -----------------------------------------------------------------------------------


def test_loss_falls_on_tinystories_within_30_steps(converted_dir, tmp_path):
    out = recover(options(converted_dir, tmp_path / "out", tokens=30 * 2 * 64))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert records[-1]["tokens"] == 30 * 2 * 64 and records[-1]["val_loss"] is not None
    assert not workdir_for(out).exists() and not (out / "checkpoints").exists()
    card = (out / "README.md").read_text()
    assert "tinystories.txt" in card and "| lm | 30 |" in card
    base = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)


def test_token_budget_is_exact(converted_dir, tmp_path):
    out = recover(options(converted_dir, tmp_path / "out", tokens=1000))  # 7 blocks of 64 and 40 tokens more
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["tokens"] == 1000


def test_resume_reaches_the_same_adapter(converted_dir, tmp_path, monkeypatch):
    kw = dict(tokens=12 * 2 * 64, save_every=6)
    straight = recover(options(converted_dir, tmp_path / "straight", **kw))

    real_step = Recovery.optimizer_step
    calls = {"n": 0}

    def stop_after_six(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Recovery, "optimizer_step", stop_after_six)
    with pytest.raises(LinearizeError, match="interrupted at lm step 6.*--resume"):
        recover(options(converted_dir, tmp_path / "resumed", **kw))
    assert not (tmp_path / "resumed").exists() and workdir_for(tmp_path / "resumed").exists()
    monkeypatch.setattr(Recovery, "optimizer_step", real_step)
    resumed = recover(options(converted_dir, tmp_path / "resumed", resume=True, **kw))
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("grad_accum, poisoned_pass", [(1, 5), (2, 9)], ids=["one-pass", "first-of-two-passes"])
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(converted_dir, tmp_path, monkeypatch, grad_accum,
                                                                    poisoned_pass):
    """A non-finite loss in any pass of step 5 (the step reads its non-finite count once, after its
    passes) stops the run naming that step, before the optimizer applies anything."""
    real = losses.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == poisoned_pass else loss

    monkeypatch.setattr("linearize.recover.trainer.training_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(LinearizeError, match=r"loss is nan at lm step 5: stopped; the last good checkpoint is step 3"):
        recover(options(converted_dir, out, tokens=8 * 2 * 64 * grad_accum, save_every=3, grad_accum=grad_accum))
    assert calls["n"] == poisoned_pass + grad_accum - 1  # the step's other passes ran; no later step did
    assert not out.exists()
    assert (workdir_for(out) / "checkpoints" / "step-00-0000003").is_dir()


def test_merge_without_room_fails_before_training(converted_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20))
    with pytest.raises(LinearizeError, match="--merge's standalone checkpoint needs about"):
        recover(options(converted_dir, tmp_path / "out", tokens=6 * 2 * 64, merge=True))
    assert not (tmp_path / "out").exists()


def test_disk_filling_during_a_checkpoint_keeps_the_last_whole_one(converted_dir, tmp_path, monkeypatch):
    import errno

    real, calls = torch.save, {"n": 0}

    def fills_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr("linearize.recover.trainer.torch.save", fills_on_second)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        recover(options(converted_dir, out, tokens=8 * 2 * 64, save_every=3))
    checkpoints = workdir_for(out) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00-0000003"], "half-written checkpoint left"
    monkeypatch.undo()
    resumed = recover(options(converted_dir, out, tokens=8 * 2 * 64, save_every=3, resume=True))
    assert (resumed / "adapter_model.safetensors").is_file()


def test_merge_equals_adapter(converted_dir, tmp_path, monkeypatch):
    out = recover(options(converted_dir, tmp_path / "out", tokens=6 * 2 * 64, merge=True))
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted_dir), out)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(converted_dir)(ids).logits
    assert (adapted - plain).abs().max() > 1e-3, "the adapter should have changed the model"
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "linearize_llama"
    # the adapter names its base by absolute path, and linearize's loader folds it in from anywhere
    assert Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]).is_absolute()
    monkeypatch.chdir(tmp_path / "out" / "merged")
    with torch.no_grad():
        loaded = load_causal_lm(str(out))(ids).logits
    torch.testing.assert_close(loaded, adapted, rtol=1e-4, atol=1e-4)


def test_eval_generate_and_info_take_the_adapter_folder(converted_dir, tmp_path, capsys):
    """`linearize recover CKPT -o OUT` then `linearize eval OUT` (and generate, info): the adapter folder is a
    model source, its perplexity that of the merged model."""
    out = recover(options(converted_dir, tmp_path / "out", tokens=4 * 2 * 64))
    story = FIXTURES / "text" / "story.txt"
    code, stdout, err = run_cli(["eval", out, "--ppl", story, "--device", "cpu", "--json", tmp_path / "adapter.json"],
                                capsys)
    assert code == 0, err
    base = load_causal_lm(str(converted_dir))
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(converted_dir).save_pretrained(tmp_path / "merged")
    code, _, err = run_cli(["eval", tmp_path / "merged", "--ppl", story, "--device", "cpu", "--json",
                            tmp_path / "merged.json"], capsys)
    assert code == 0, err
    ppl = [json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]["story"]["model"]
           for name in ("adapter", "merged")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5), ppl
    code, stdout, err = run_cli(["generate", out, "Once upon a time", "--max-new-tokens", "4"], capsys)
    assert code == 0 and stdout.strip().startswith("Once upon a time"), err
    code, stdout, err = run_cli(["info", out], capsys)
    assert code == 0 and "LoRA r=8" in stdout and "linearize_llama" in stdout, err
    # a second recovery on top of the adapter folder names that folder as its base, and loads through it
    second = recover(options(out, tmp_path / "second", tokens=2 * 2 * 64))
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out)
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stacked = PeftModel.from_pretrained(load_causal_lm(str(out)), second).merge_and_unload()(ids).logits
        torch.testing.assert_close(load_causal_lm(str(second))(ids).logits, stacked)


def test_align_then_lm_stages_on_alpaca(converted_dir, tmp_path):
    opts = options(converted_dir, tmp_path / "out", data=str(ALPACA), stages=["align", "orient", "lm"],
                   stage_tokens="align=256,orient=256,lm=512", orient_seq_len=32)
    out = recover(opts)
    stages = json.loads((out / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["align", "orient", "lm"]
    assert [s["tokens"] for s in stages] == [256, 256, 512]
    assert json.loads((out / "data_report.json").read_text())["format"] == "alpaca"


def test_cli_recover_errors(converted_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    args = ["recover", converted_dir, "--data", STORIES_TEXT, "--seq-len", "64"]
    code, _, err = run_cli([*args, "-o", tmp_path / "taken"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli([*args, "-o", tmp_path / "x", "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    code, _, err = run_cli([*args, "-o", tmp_path / "y", "--stages", "align,warp"], capsys)
    assert code == 2 and "--stages" in err
    code, _, err = run_cli([*args, "-o", tmp_path / "z", "--data", tmp_path / "none.json"], capsys)
    assert code == 2 and "not found" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "a run that never started left a work folder"
    (tmp_path / "bad.json").write_text("[]")
    code, _, err = run_cli([*args, "-o", tmp_path / "z", "--data", tmp_path / "bad.json"], capsys)
    assert code == 2 and "no usable" in err, err
    (tmp_path / "bad.json").write_text("")
    code, _, err = run_cli([*args, "-o", tmp_path / "z", "--data", tmp_path / "bad.json"], capsys)
    assert code == 2 and "is empty" in err, err
    code, _, err = run_cli([*args, "-o", tmp_path / "z", "--data", tmp_path / "taken"], capsys)
    assert code == 2 and "is a folder" in err, err
    code, _, err = run_cli([*args, "-o", tmp_path / "z"], capsys)  # the same command, data fixed: no --overwrite
    assert code == 0, err
    assert (tmp_path / "z" / "adapter_model.safetensors").is_file()


def test_cuda_graph_needs_a_gpu(converted_dir, tmp_path, capsys):
    """--cuda-graph on the CPU: a one-line error before anything is written (tests/test_gpu.py runs it on a GPU)."""
    args = ["recover", converted_dir, "--data", STORIES_TEXT, "--seq-len", "64", "--device", "cpu", "--cuda-graph"]
    code, _, err = run_cli([*args, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "--cuda-graph needs a CUDA device" in err
    assert not (tmp_path / "x").exists() and not workdir_for(tmp_path / "x").exists()


def test_recovery_passes_skip_the_packed_sequence_check(stories_path, monkeypatch):
    """transformers checks a forward's position ids for packed sequences: a device sync every pass, and
    while a CUDA graph records (simulated here) a full mask that moves SDPA off its causal kernels. The
    recovery losses pass no position ids, so they skip the check: SDPA gets no mask and `is_causal`."""
    import transformers.masking_utils as masking_utils  # noqa: PLC0415
    import transformers.utils.import_utils as import_utils  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(stories_path, attn_implementation="sdpa")
    checks, seen = [], []
    find = masking_utils.find_packed_sequence_indices

    def counted(position_ids):
        checks.append(1)
        return find(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counted)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        seen.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 512, (2, 48))
    model(input_ids=ids, use_cache=False)  # as the losses call it, without their context
    assert checks and seen and not any(no_mask for no_mask, _ in seen), "the simulated recording built no mask"
    checks.clear()
    seen.clear()
    losses.lm_loss(model, ids, ids)
    assert not checks and seen and all(s == (True, True) for s in seen), (checks, seen)
    assert masking_utils.find_packed_sequence_indices is counted  # restored after the loss


def assert_same_training(one_dir, two_dir, weights_rtol: float = 1e-4, weights_atol: float = 1e-6) -> None:
    """Same tokens and losses step by step (to 1e-4), and the same adapter."""
    one = [json.loads(line) for line in (one_dir / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    a, b = adapter_weights(one_dir), adapter_weights(two_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=weights_rtol, atol=weights_atol)


def test_two_processes_match_one_at_equal_global_batch(converted_dir, tmp_path, capsys):
    """torchrun with 2 CPU ranks (gloo), grad-accum 1, against 1 process with grad-accum 2, on Alpaca with
    micro-batches of 2: the ranks group the step's blocks differently and the masked prompts leave
    blocks with different numbers of labelled tokens, so only a token-weighted step loss agrees."""
    common = ["recover", converted_dir, "--data", ALPACA, "--seq-len", "64", "--micro-batch", "2",
              "--tokens", str(8 * 4 * 64), "--eval-every", "4", "--device", "cpu"]
    code, _, err = run_cli([*common, "-o", tmp_path / "one", "--grad-accum", "2"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*common, "-o", tmp_path / "two", "--grad-accum", "1", "--nproc", "2"], capsys)
    assert code == 0, err
    # float32 sums in another order; Adam's step divides by sqrt(v), so the weights differ by ~1e-5
    assert_same_training(tmp_path / "one", tmp_path / "two", weights_rtol=1e-3, weights_atol=1e-4)


def test_new_gate_projection_trains_and_travels_with_the_adapter(stories_path, tmp_path):
    ckpt = convert(str(stories_path), tmp_path / "conv", window=16, gate="projection")
    out = recover(options(ckpt, tmp_path / "out", tokens=4 * 2 * 64, merge=True))
    saved = adapter_weights(out)
    gate_keys = [k for k in saved if "gate_proj" in k]
    assert gate_keys and all("self_attn.gate_proj" in k for k in gate_keys), sorted(saved)[:5]
    assert not any(".mlp." in k for k in saved), "the MLP's gate_proj is not the attention gate: LoRA only there"
    before = load_file(ckpt / "model.safetensors")
    key = gate_keys[0]
    original = next(v for k, v in before.items() if k.endswith(key.split("base_model.model.")[-1].replace("modules_to_save.default.", "")))
    assert not torch.equal(saved[key], original), "gate_proj should have trained"
    merged = load_file(out / "merged" / "model.safetensors")
    assert any("gate_proj" in k for k in merged)


def test_default_recovery_trains_lora_on_qkv_and_nothing_else(stories_path, tmp_path):
    ckpt = convert(str(stories_path), tmp_path / "conv", window=16)
    out = recover(options(ckpt, tmp_path / "out", tokens=2 * 2 * 64))
    saved = adapter_weights(out)
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k][:5]
    assert {k.split(".")[-3] for k in saved} == {"q_proj", "k_proj", "v_proj"}


def test_lm_loss_of_a_block_without_labels_is_zero_not_nan(peft_model):
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    assert losses.lm_loss(peft_model, ids, labels).item() == 0.0
    labels[0, 5:] = ids[0, 5:]
    reference = peft_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(losses.lm_loss(peft_model, ids, labels), reference)


def test_a_rank_failing_after_the_output_is_written_does_not_fail_the_run(tmp_path, monkeypatch):
    """torchrun's exit code is non-zero when any rank dies, also in teardown after rank 0 has renamed OUT
    into place (its last step): then the run counts as done. Without a new OUT it is an error."""
    from rich.console import Console

    from linearize.recover import distributed

    opts = RecoverOptions(ckpt=str(tmp_path), data="x.txt", out=tmp_path / "out", nproc=2)
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: 1)
    with pytest.raises(LinearizeError, match="exited with code 1"):
        distributed.launch(opts)

    def finish_then_crash(cmd):
        (tmp_path / "out").mkdir()
        return 134

    monkeypatch.setattr(distributed.subprocess, "call", finish_then_crash)
    console = Console(record=True, width=200)
    distributed.launch(opts, console)
    assert "exited with code 134 after the run had finished" in console.export_text()
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: 1)  # OUT was there before: no excuse
    with pytest.raises(LinearizeError, match="exited with code 1"):
        distributed.launch(opts)


def test_fsdp_two_processes_match_one(converted_dir, tmp_path, capsys):
    """FSDP2 (fully_shard) over 2 CPU ranks: same curve and adapter as 1 process at equal global batch,
    with a checkpoint gathered mid-run and the merged model folded from the gathered adapter."""
    common = ["recover", converted_dir, "--data", STORIES_TEXT, "--seq-len", "64", "--micro-batch", "1",
              "--tokens", str(6 * 2 * 64 + 40), "--eval-every", "3", "--save-every", "3", "--device", "cpu", "--merge"]
    code, _, err = run_cli([*common, "-o", tmp_path / "one", "--grad-accum", "2"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*common, "-o", tmp_path / "two", "--grad-accum", "1", "--nproc", "2", "--fsdp"], capsys)
    assert code == 0, err
    assert_same_training(tmp_path / "one", tmp_path / "two")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "merged")(ids).logits
        m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "merged")(ids).logits
    torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-4)


def test_align_trains_hedgehog_feature_maps_and_they_travel(stories_path, tmp_path):
    ckpt = convert(str(stories_path), tmp_path / "conv", target="hedgehog", window=16)
    before = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "hedgehog" in k}
    assert before and all(torch.equal(w, torch.eye(8).repeat(w.shape[0], 1, 1)) for w in before.values())
    out = recover(options(ckpt, tmp_path / "out", stages=["align", "lm"], stage_tokens="align=512,lm=256", merge=True))
    saved = {k: v for k, v in adapter_weights(out).items() if "hedgehog" in k}
    assert len(saved) == len(before)
    merged = {k: v for k, v in load_file(out / "merged" / "model.safetensors").items() if "hedgehog" in k}
    assert merged.keys() == before.keys()
    assert any(not torch.equal(merged[k], before[k]) for k in before), "the feature maps should have trained"


def test_trained_tensors_are_fp32_over_bf16_frozen_weights(stories_path, tmp_path, monkeypatch):
    """On GPUs the frozen weights load in bf16; PEFT's copies of hedgehog's feature maps would be bf16
    too, where AdamW's small steps round away on the identity's ones. They must train in fp32, and the
    merged checkpoint must come back in the model's dtype."""
    from linearize.recover import trainer

    monkeypatch.setattr(trainer, "training_dtype", lambda device: torch.bfloat16)
    ckpt = convert(str(stories_path), tmp_path / "conv", target="hedgehog", window=16)
    run = Recovery(options(ckpt, tmp_path / "out"))
    run.load()
    trained = {n: p.dtype for n, p in run.model.named_parameters() if p.requires_grad}
    assert any("hedgehog" in n for n in trained) and any("lora" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}

    out = recover(options(ckpt, tmp_path / "merged_run", stages=["align", "lm"], stage_tokens="align=256,lm=256",
                          merge=True))
    merged = load_file(out / "merged" / "model.safetensors")
    assert {w.dtype for w in merged.values()} == {torch.bfloat16}
    assert any(not torch.equal(w.float(), torch.eye(8).repeat(w.shape[0], 1, 1))
               for k, w in merged.items() if "hedgehog" in k), "the feature maps should have trained"


@pytest.mark.parametrize("target", ["hedgehog", "gdn", "gsa"])
def test_probed_mixing_matrix_is_the_layers_linear_map(stories_path, tmp_path, target):
    """orient reads hedgehog/gdn/gsa mixing matrices off the layer with one-hot value probes: M v must
    reproduce the layer's own output for any v (float64), and the orient stage runs on them."""
    from linearize.kernels.liger.naive import repeat_heads

    extra = {"slots": 4} if target == "gsa" else {}
    ckpt = convert(str(stories_path), tmp_path / "conv", target=target, window=8, **extra)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
    layer = model.model.layers[0].self_attn
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, model.config.hidden_size, dtype=torch.float64)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(20)[None])
    with torch.no_grad():
        q, k, v = layer.family.project_qkv(layer, hidden)
        mixing = losses.probed_mixing_matrix(layer, q, k, position_embeddings)
        direct = layer.parallel_mix(q, k, v, position_embeddings)
    via_matrix = torch.einsum("bhts,bshd->bthd", mixing.double(), repeat_heads(v, q.shape[2]))
    torch.testing.assert_close(via_matrix, direct, rtol=1e-5, atol=1e-6)
    out = recover(options(ckpt, tmp_path / "out", stages=["orient"], stage_tokens="orient=128", orient_seq_len=32))
    assert json.loads((out / "stages.json").read_text())[0]["stage"] == "orient"


@pytest.mark.parametrize("target", ["mamba2", "hgrn2", "gdn", "gsa"])
def test_every_recurrent_target_trains(stories_path, tmp_path, target):
    """LoRA recovery runs through each target's recurrence (gdn and gsa once failed here: their
    in-place state updates broke autograd), the loss stays finite and the adapter moves."""
    extra = {"slots": 4} if target == "gsa" else {}
    ckpt = convert(str(stories_path), tmp_path / "conv", target=target, window=16, **extra)
    out = recover(options(ckpt, tmp_path / "out", tokens=3 * 2 * 64))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses_seen = [m["loss"] for m in metrics if "loss" in m]
    assert losses_seen and all(torch.isfinite(torch.tensor(losses_seen)))
    lora_b = [w for k, w in adapter_weights(out).items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: nonzero means it trained


@pytest.mark.parametrize("nproc, fsdp", [(1, False), (2, False), (2, True)], ids=["one", "ddp", "fsdp"])
def test_stop_after_steps_then_resume_matches_a_straight_run(converted_dir, tmp_path, capsys, nproc, fsdp):
    """A run stopped by --stop-after-steps (exit 75, checkpoint, no OUT) and resumed with --resume ends with
    the adapter and loss curve of one uninterrupted process: in one process, and under torchrun with 2
    CPU ranks replicated (DDP arithmetic) or sharded (FSDP2) at equal global batch."""
    common = ["recover", converted_dir, "--data", STORIES_TEXT, "--seq-len", "64", "--micro-batch", "1",
              "--tokens", str(6 * 2 * 64), "--eval-every", "3", "--save-every", "100", "--device", "cpu"]
    code, _, err = run_cli([*common, "-o", tmp_path / "straight", "--grad-accum", "2"], capsys)
    assert code == 0, err
    split = [*common, "-o", tmp_path / "split", "--grad-accum", str(2 // nproc), "--nproc", str(nproc),
             *(["--fsdp"] if fsdp else [])]
    code, _, err = run_cli([*split, "--stop-after-steps", "2"], capsys)
    assert code == 75, err
    assert not (tmp_path / "split").exists() and workdir_for(tmp_path / "split").exists()
    code, _, err = run_cli([*split, "--resume"], capsys)
    assert code == 0, err
    assert_same_training(tmp_path / "straight", tmp_path / "split")
