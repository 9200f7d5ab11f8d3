"""The evaluation report: a markdown file with the per-domain loss table, the routing table and heatmap,
loss curves from each phase's metrics.jsonl, downstream task scores (table + bar chart) and sample generations.

Plots are drawn on a `matplotlib.figure.Figure` with its own Agg canvas, matplotlib imported where they are
drawn: no pyplot, so the caller's matplotlib backend and figure state stay as they were."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def write_json(path: Path, obj) -> Path:
    """`obj` as JSON at `path`, atomically (written beside it, then renamed): a reader, or a crash, sees the
    previous file or the new one whole; the file gets the mode the umask gives."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        # a step's train and eval rows (train.eval_every) merge; a resumed run re-logs steps: the last record wins
        rows[r["step"]] = {**rows.get(r["step"], {}), **r}
    return [rows[s] for s in sorted(rows)]


def _figure(figsize: tuple[float, float]):
    """(figure, axes) on an Agg canvas of its own (pyplot and the process's backend are not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_loss_curves(workdirs: dict[str, Path], out: Path) -> Path | None:
    curves = {name: read_metrics(d) for name, d in workdirs.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = _figure((7, 4))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (token cross-entropy)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_routing_heatmap(matrix: np.ndarray, domains: list[str], experts: list[str], out: Path) -> Path:
    fig, ax = _figure((1.4 * len(experts) + 2, 0.8 * len(domains) + 1.5))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(float(matrix.max()), 1e-6))
    ax.set_xticks(range(len(experts)), experts)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("expert")
    ax.set_ylabel("domain of the tokens")
    for i in range(len(domains)):
        for j in range(len(experts)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="white" if matrix[i, j] < 0.6 * matrix.max() else "black")
    fig.colorbar(im, ax=ax, label="mean gate weight")
    return _save(fig, out)


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def loss_table(results: dict[str, dict[str, dict]], domains: list[str]) -> str:
    """Models x domains: loss (perplexity)."""
    rows = [[name] + [f"{r[d]['loss']:.3f} ({r[d]['ppl']:.1f})" for d in domains] for name, r in results.items()]
    return _table(["model"] + [f"{d} loss (ppl)" for d in domains], rows)


def downstream_table(scores: dict[str, dict[str, dict]]) -> str:
    """Models x tasks: headline metric ± standard error (btx_jax.eval.downstream.run_tasks results)."""
    tasks = list(next(iter(scores.values())))
    header = ["model"] + [f"{t} ({scores[next(iter(scores))][t]['metric']}, n={scores[next(iter(scores))][t]['n']})"
                          for t in tasks]
    rows = [[name] + [f"{r[t]['value']:.3f} ± {r[t]['stderr']:.3f}" for t in tasks] for name, r in scores.items()]
    return _table(header, rows)


def plot_downstream(scores: dict[str, dict[str, dict]], out: Path, chance: dict[str, float] | None = None) -> Path:
    """Grouped bars (one group per task, one bar per model) with ±1 stderr error bars and chance lines."""
    models, tasks = list(scores), list(next(iter(scores.values())))
    width = 0.8 / len(models)
    fig, ax = _figure((max(5.0, 1.2 * len(models) * len(tasks) + 2), 4))
    for i, name in enumerate(models):
        x = np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, [scores[name][t]["value"] for t in tasks], width,
               yerr=[scores[name][t]["stderr"] for t in tasks], capsize=3, label=name)
    for j, t in enumerate(tasks):
        if chance and t in chance:
            ax.hlines(chance[t], j - 0.45, j + 0.45, colors="gray", linestyles="--",
                      label="chance" if j == 0 else None)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({scores[models[0]][t]['metric']})" for t in tasks])
    ax.set_ylabel("score (±1 stderr)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def write_report(out_dir: Path, *, results: dict, domains: list[str], routing: dict[str, np.ndarray] | None,
                 experts: list[str] | dict[str, list[str]], loss_curves: Path | None, heatmaps: dict[str, Path],
                 samples: dict[str, list], findings: list[str], header: str, downstream: list[str] | None = None
                 ) -> Path:
    """`downstream`: markdown lines of the downstream section (table, chart, caveats), if any."""
    parts = [f"# {header}", "", "## Held-out loss per domain", "", loss_table(results, domains), ""]
    if downstream:
        parts += ["## Downstream tasks (lm-evaluation-harness, backend btx)", ""] + downstream + [""]
    if findings:
        parts += ["## What the numbers show", ""] + [f"- {f}" for f in findings] + [""]
    if routing:
        for name, matrix in routing.items():
            labels = experts[name] if isinstance(experts, dict) else experts      # per-model labels or one list
            parts += [f"## Routing of {name}: mean gate weight per expert on each domain's tokens", "",
                      _table(["domain"] + labels, [[d] + [float(x) for x in row] for d, row in zip(domains, matrix)]),
                      "", f"![routing heatmap {name}]({heatmaps[name].name})", ""]
    if loss_curves:
        parts += ["## Training loss curves", "", f"![loss curves]({loss_curves.name})", ""]
    if samples:
        parts += ["## Sample generations (temperature 0.7, top-p 0.9, seed 0)", ""]
        for name, items in samples.items():
            one_line = lambda t: t.replace("\n", " ⏎ ").replace("`", "'")
            parts += [f"**{name}**", ""] + [f"- `{one_line(p)}` -> `{one_line(g)}`" for p, g in items] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
