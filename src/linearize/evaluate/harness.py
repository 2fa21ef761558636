"""lm-evaluation-harness tasks run on our in-memory model through its Python API (optional extra `eval`)."""

from __future__ import annotations

import torch

from ..errors import LinearizeError, first_line

INSTALL_HINT = "--harness needs lm-evaluation-harness: pip install 'linearize[eval]' (or pip install 'lm-eval[hf]')"


def run_harness(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: int | None,
                batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for each harness task, stderr and non-numeric fields left out."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise LinearizeError(INSTALL_HINT) from e
    # HFLM takes a loaded model object, so a converted model (or one inside `teacher`) runs as is.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except (KeyError, ValueError) as e:
        raise LinearizeError(f"lm-evaluation-harness refused tasks {','.join(tasks)}: {first_line(e)}") from e
    return harness_metrics(out["results"])


def harness_metrics(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The harness keys metrics as "acc,none" (metric, filter); keep the metric name and numbers only."""
    clean = {}
    for task, values in results.items():
        clean[task] = {
            key.split(",")[0]: float(v)
            for key, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in key
        }
    return clean
