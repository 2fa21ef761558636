"""`linearize eval`: perplexity parity with transformers' own loss, hand-checked task items, JSON, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from linearize.errors import LinearizeError
from linearize.evaluate.harness import harness_metrics, run_harness
from linearize.evaluate.perplexity import perplexity, windows
from linearize.evaluate.scoring import Score, encode, encode_pair, score_requests, special_prefix
from linearize.evaluate.tasks import Task, evaluate_task, load_task, metrics, requests_for
from linearize.loading import load_causal_lm, load_tokenizer

from .helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
STORIES = FIXTURES / "stories260k"
TASKS = FIXTURES / "tasks"
STORY = FIXTURES / "text" / "story.txt"


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm(str(STORIES)), load_tokenizer(str(STORIES))


def reference_perplexity(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity recipe: labels=-100 on already-scored tokens, loss from the model itself."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + context, ids.shape[1])
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one inside
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count), count


# ---- perplexity --------------------------------------------------------------------------------


@pytest.mark.parametrize(("context", "stride", "batch"), [(64, 32, 3), (64, 64, 4), (100, 37, 2), (512, 256, 8)])
def test_perplexity_equals_transformers_loss(lm, context, stride, batch):
    model, tok = lm
    text = STORY.read_text()
    ids = tok(text, return_tensors="pt").input_ids  # the tokenizer's own encoding, BOS included
    assert encode(tok, text, special_prefix(tok)) == ids[0].tolist()
    expected, expected_tokens = reference_perplexity(model, ids, context, stride)
    ours = perplexity(model, ids[0].tolist(), context=context, stride=stride, batch_size=batch)
    assert ours.tokens == expected_tokens
    assert ours.value == pytest.approx(expected, rel=1e-5)


def test_windows_score_each_token_once():
    for n, context, stride in [(10, 4, 2), (10, 4, 4), (11, 5, 3), (3, 8, 4), (100, 16, 1)]:
        targets = [t for w in windows(n, context, stride) for t in range(w.first_target, w.end)]
        assert len(targets) == len(set(targets)), "a token scored twice"
        assert max(targets) == n - 1 and min(targets) == 1
        for w in windows(n, context, stride):
            assert w.end - w.begin <= context and w.first_target > w.begin
        if stride < context:  # overlapping windows leave no token unscored
            assert sorted(targets) == list(range(1, n))


# ---- tasks -------------------------------------------------------------------------------------


def test_special_prefix_and_pair_encoding(lm):
    _, tok = lm
    assert special_prefix(tok) == [tok.bos_token_id]
    r = encode_pair(tok, "Lily saw a ", "dog", [1])  # the context's trailing space moves to the continuation
    assert r.context == encode(tok, "Lily saw a", [1])
    assert r.context + r.continuation == encode(tok, "Lily saw a dog", [1])


def test_batched_scores_equal_single_sequence_loss(lm):
    """Right-padded batches of mixed lengths give each request the loglik transformers computes alone."""
    model, tok = lm
    task = load_task(TASKS, "mc_stories")
    flat = [r for reqs in requests_for(task, tok, special_prefix(tok)) for r in reqs]
    scores = score_requests(model, flat, batch_size=3, max_length=512)
    for r, s in zip(flat, scores, strict=True):
        ids = torch.tensor([r.context + r.continuation])
        labels = ids.clone()
        labels[:, : len(r.context)] = -100
        with torch.no_grad():
            loss = model(ids, labels=labels).loss.item()
        assert s.loglik == pytest.approx(-loss * len(r.continuation), rel=1e-4, abs=1e-4)
        assert s.tokens == len(r.continuation)


def test_multiple_choice_acc_and_acc_norm(lm):
    model, tok = lm
    # Hand-checked (logliks printed once and read by hand):
    # 1. "...girl named" -> "Lily." (-0.15) beats "Zorbax." (-38.8): both metrics right.
    # 2. "...saw a big" -> "dog." (-5.4, 4 chars) beats the 55-char sentence (-19.3) in total,
    #    but per character the sentence wins (-0.35 vs -1.34): acc wrong, acc_norm right (gold 1).
    # 3. "...play in the" -> "park." (-2.0, -0.40/char) wins in total; "garden with their toys."
    #    (-7.0, -0.30/char) wins per character: acc right (gold 0), acc_norm wrong.
    full = evaluate_task(model, tok, load_task(TASKS, "mc_stories"), batch_size=4, max_length=512)
    assert full == pytest.approx({"acc": 2 / 3, "acc_norm": 2 / 3})
    first_two = evaluate_task(model, tok, load_task(TASKS, "mc_stories", limit=2), batch_size=4, max_length=512)
    assert first_two == pytest.approx({"acc": 1 / 2, "acc_norm": 1.0})


def test_winogrande_scores_the_continuation_after_each_option(lm):
    model, tok = lm
    task = load_task(TASKS, "schema_stories")
    assert task.format == "schema"
    # "loved to play outside." follows the Lily story (-5.7) far better than gibberish (-23.9);
    # "wanted to play with it." follows "He" (-6.4) better than "9" (-7.6).
    assert evaluate_task(model, tok, task, batch_size=2, max_length=512) == {"acc": 1.0}
    reqs = requests_for(task, tok, special_prefix(tok))[0]
    # the same continuation tokens are scored under both options
    assert reqs[0].continuation == reqs[1].continuation == encode(tok, " loved to play outside.")


def test_lambada_greedy_last_word(lm):
    model, tok = lm
    task = load_task(TASKS, "lambada_stories")
    # The model's own greedy story says "...play outside in the park" and "...a big, red ball":
    # both reproduced; "Zorbax" is not a name this model would ever produce.
    result = evaluate_task(model, tok, task, batch_size=3, max_length=512)
    assert result["acc"] == pytest.approx(2 / 3)
    lls = [score_requests(model, reqs, batch_size=1, max_length=512)[0].loglik
           for reqs in requests_for(task, tok, special_prefix(tok))]
    assert result["ppl"] == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-4)


def test_metric_reduction_by_hand():
    s = lambda ll: Score(loglik=ll, greedy=False, tokens=1)  # noqa: E731
    mc = Task("mc", "multiple_choice", [{"query": "q", "choices": ["a", "bbbb"], "gold": 1},
                                        {"query": "q", "choices": ["cc", "d"], "gold": 0}])
    # item 1: -2 > -3 picks "a" (wrong); per char -2/1 < -3/4 picks "bbbb" (right)
    # item 2: -1 > -5 picks "cc" (right); per char -1/2 > -5/1 picks "cc" (right)
    assert metrics(mc, [[s(-2), s(-3)], [s(-1), s(-5)]]) == {"acc": 0.5, "acc_norm": 1.0}
    schema = Task("w", "schema", [{"context_options": ["x", "y"], "continuation": "z", "gold": 0}])
    assert metrics(schema, [[s(-4), s(-1)]]) == {"acc": 0.0}


def test_bad_task_files(tmp_path):
    (tmp_path / "odd.jsonl").write_text('{"question": "?", "answer": 1}\n')
    (tmp_path / "gold.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    (tmp_path / "broken.jsonl").write_text('{"query": "q", "choices": ["a"], "gold": 0}\n{not json\n')
    for name, words in [("odd", "match no known format"), ("gold", "outside its 2 options"),
                        ("broken", "broken.jsonl:2 is not valid JSON"), ("missing", "unknown task 'missing'")]:
        with pytest.raises(LinearizeError, match=words):
            load_task(tmp_path, name)


# ---- harness -----------------------------------------------------------------------------------


def test_harness_without_lm_eval_is_a_clear_error(lm, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    with pytest.raises(LinearizeError, match=r"pip install 'linearize\[eval\]'"):
        run_harness(*lm, ["arc_easy"], limit=2, batch_size=2)


def test_harness_metric_names():
    raw = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}}
    assert harness_metrics(raw) == {"arc_easy": {"acc": 0.5, "acc_norm": 0.75}}


# ---- command line ------------------------------------------------------------------------------


def test_cli_json_schema_and_limit(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, stderr = run_cli(
        ["eval", STORIES, "--compare", STORIES, "--ppl", STORY, "--tasks", "mc_stories,schema_stories,lambada_stories",
         "--task-dir", TASKS, "--limit", "2", "--context", "128", "--json", out], capsys)
    assert code == 0, stderr
    assert "recovered %" in stdout and "mc_stories acc_norm" in stdout
    result = json.loads(out.read_text())
    assert set(result) == {"perplexity", "tasks", "meta"}
    assert set(result["perplexity"]) == {"story"}
    pair = result["perplexity"]["story"]
    assert pair["model"] == pytest.approx(pair["reference"]) and 1 < pair["model"] < 20
    assert set(result["tasks"]) == {"mc_stories", "schema_stories", "lambada_stories"}
    assert result["tasks"]["mc_stories"]["model"] == pytest.approx({"acc": 0.5, "acc_norm": 1.0})  # --limit 2
    assert set(result["tasks"]["lambada_stories"]["reference"]) == {"acc", "ppl"}
    meta = result["meta"]
    assert meta["task_items"] == {"mc_stories": 2, "schema_stories": 2, "lambada_stories": 2}
    assert meta["context"] == 128 and meta["stride"] == 64
    assert meta["tokens"]["story"]["model"] > 100
    assert meta["device"].startswith("cpu") and {"torch", "transformers", "linearize"} <= set(meta["versions"])


def test_cli_without_reference_has_null_reference(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LINEARIZE_TASK_DIR", str(TASKS))
    out = tmp_path / "eval.json"
    code, stdout, stderr = run_cli(["eval", STORIES, "--tasks", "schema_stories", "--json", out], capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["tasks"]["schema_stories"] == {"model": {"acc": 1.0}, "reference": None}
    assert "recovered" not in stdout


def test_teacher_reference_is_the_source_model(tmp_path, lm):
    """--teacher runs the converted checkpoint's softmax attention: the source model's numbers exactly."""
    from rich.console import Console

    from linearize.convert import convert
    from linearize.evaluate import EvalOptions, run_eval

    converted = convert(str(STORIES), tmp_path / "conv", console=Console(quiet=True))
    result = run_eval(EvalOptions(checkpoint=str(converted), teacher=True, ppl_files=[STORY], context=128,
                                  tasks=["lambada_stories"], task_dir=TASKS))
    model, tok = lm
    ids = tok(STORY.read_text(), return_tensors="pt").input_ids
    source_ppl, _ = reference_perplexity(model, ids, 128, 64)
    assert result["perplexity"]["story"]["reference"] == pytest.approx(source_ppl, rel=1e-4)
    assert result["perplexity"]["story"]["model"] != pytest.approx(source_ppl, rel=1e-2)  # Liger before any training
    assert result["tasks"]["lambada_stories"]["reference"]["acc"] == pytest.approx(2 / 3)
    assert result["meta"]["reference"] == "teacher"


@pytest.mark.parametrize(("args", "message"), [
    (["--ppl", "no/such/file.txt"], "perplexity file not found: no/such/file.txt"),
    (["--tasks", "nope", "--task-dir", TASKS], "unknown task 'nope'"),
    (["--tasks", "mc_stories"], "pass --task-dir DIR or set LINEARIZE_TASK_DIR"),
    (["--tasks", "mc_stories", "--task-dir", "no/such/dir"], "task folder not found"),
    (["--ppl", STORY, "--teacher", "--compare", STORIES], "pass one of them"),
    (["--ppl", STORY, "--context", "64", "--stride", "100"], "longer than --context"),
    ([], "nothing to evaluate"),
    (["--ppl", STORY, "--teacher"], "teacher mode needs a model converted by linearize"),
])
def test_cli_bad_input_is_one_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("LINEARIZE_TASK_DIR", raising=False)
    code, _, stderr = run_cli(["eval", STORIES, *args], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr


def test_recovered_percent_of_a_zero_score_is_zero():
    from linearize.evaluate.report import recovered

    assert recovered("acc", 0.0, 0.5) == 0.0
    assert recovered("acc", 0.25, 0.5) == 50.0
    assert recovered("ppl", 20.0, 10.0) == 50.0
    assert recovered("acc", 0.3, 0.0) is None and recovered("ppl", 0.0, 3.0) is None
