"""Downstream scores: lm-evaluation-harness tasks (backend `btx`, offline tasks of btx_jax/eval/tasks/ included) run
for several checkpoints, reduced to one headline metric with its standard error per (model, task).

    results = run_tasks({"seed": "runs/demo/seed/final", "moe": pre}, ["btx_jcommonsenseqa"], tokenizer=tok)
    results["moe"]["btx_jcommonsenseqa"] -> {"metric": "acc", "value": 0.31, "stderr": 0.046, "n": 100}

Needs the optional extra `.[eval]` (lm-eval)."""
from __future__ import annotations

import difflib
import functools
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from btx_jax.eval import report
from btx_jax.config import ConfigError
from btx_jax.eval.harness import TASKS_DIR, BtxLM, check_task_file
from btx_jax.pretrained import Pretrained

# headline metric of a task, first match wins (multiple choice: acc; generation: exact match)
HEADLINE = ("acc,none", "exact_match,strict-match", "exact_match,whitespaces", "exact_match,none",
            "exact_match,flexible-extract", "acc_norm,none")
# chance level of the bundled multiple-choice tasks (generation tasks: 0)
CHANCE = {"btx_jcommonsenseqa": 0.2}


def headline(task_result: dict) -> tuple[str, float, float]:
    """(metric name, value, stderr) of one task's harness results."""
    for key in HEADLINE + tuple(k for k in task_result if "," in k and "_stderr" not in k):
        if key in task_result and isinstance(task_result[key], (int, float)):
            name, flt = key.split(",", 1)
            stderr = task_result.get(f"{name}_stderr,{flt}")
            return key.replace(",none", ""), float(task_result[key]), float(stderr) if stderr not in (None, "N/A") else 0.0
    raise ValueError(f"no metric in task results: {sorted(task_result)}")


@functools.lru_cache(maxsize=4)
def task_manager(builtin_tasks: bool, include_path: str | None = None) -> TaskManager:
    """The bundled tasks (btx_jax/eval/tasks/) and `include_path`, plus the harness's own when `builtin_tasks`
    (indexing those thousands takes a minute or more: done once per process)."""
    return TaskManager(include_path=[str(TASKS_DIR)] + ([include_path] if include_path else []),
                       include_defaults=builtin_tasks)


def check_tasks(tasks: list[str], *, include_path: str | None = None, builtin_tasks: bool = True) -> TaskManager:
    """The TaskManager that knows every one of `tasks` (names, globs or YAML files), or one error naming the
    first unknown one, the closest bundled name and the bundled tasks: before any model runs.  The harness's
    own tasks are indexed only when a task is neither bundled nor a `btx_*` name (ours only) nor a file."""
    for t in tasks:
        if t.endswith(".yaml"):
            check_task_file(t)
    names = [t for t in tasks if not t.endswith(".yaml")]
    local = task_manager(False, include_path)
    outside = [t for t in names if not local.match_tasks([t]) and not t.startswith("btx_")]
    manager = task_manager(True, include_path) if builtin_tasks and outside else local
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        bundled = sorted(local.all_tasks)
        close = difflib.get_close_matches(unknown[0], bundled, n=1)
        raise ConfigError(f"unknown lm-eval task {unknown[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                          f"bundled tasks: {', '.join(bundled)}"
                          + ("; list the harness's own with: btx lm-eval ls tasks" if builtin_tasks
                             else " (the harness's own are not searched here)"))
    return manager


def run_tasks(models: dict[str, str | Pretrained], tasks: list[str], *, tokenizer=None, limit: int | None = None,
              batch_size: int = 16, num_fewshot: int | None = None, max_gen_toks: int | None = None,
              include_path: str | None = None, builtin_tasks: bool = True) -> dict[str, dict[str, dict]]:
    """{model: {task: {metric, value, stderr, n}}} for model directories or loaded `Pretrained` models
    (`builtin_tasks=False`: only the bundled tasks and `include_path`); unknown tasks are refused first
    (`check_tasks`).  A directory is loaded (sharded, see btx_jax/eval/harness.py) only while its tasks run."""
    manager = check_tasks(list(tasks), include_path=include_path, builtin_tasks=builtin_tasks)
    gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
    out = {}
    for name, model in models.items():
        lm = BtxLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, gen_kwargs=gen_kwargs, log_samples=False)
        out[name] = {}
        for task, task_result in res["results"].items():     # a group's subtasks appear one by one
            if task in res.get("n-samples", {}):
                metric, value, stderr = headline(task_result)
                out[name][task] = {"metric": metric, "value": value, "stderr": stderr,
                                   "n": res["n-samples"][task]["effective"]}
        del lm, res                   # this model is released before the next one loads
    return out


def report_section(scores: dict[str, dict[str, dict]], out_dir: Path, note: str | None = None) -> list[str]:
    """Markdown lines for the report: the table, the bar chart (written to out_dir/downstream.png), a note."""
    chart = report.plot_downstream(scores, Path(out_dir) / "downstream.png", chance=CHANCE)
    chance = [f"{t}: {CHANCE[t]:.0%}" for t in next(iter(scores.values())) if t in CHANCE]
    lines = [report.downstream_table(scores), "", f"![downstream scores]({chart.name})", ""]
    if chance:
        lines.append(f"Chance level: {', '.join(chance)}.")
    return lines + ([note] if note else [])
