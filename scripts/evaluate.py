"""Evaluate checkpoints per domain and write a markdown report with tables and plots.

    python scripts/evaluate.py --model seed=runs/demo/seed/final --model moe=runs/demo/router/final \
        --workdir seed=runs/demo/seed --out runs/demo/eval

Domains default to the bundled held-out splits (wiki, math, novel); each row of the table is a model.
A --seq-len beyond a model's max_position_embeddings is refused (exit 2), not truncated: losses at a different
length would not be comparable.
`--tasks btx_jcommonsenseqa,btx_gsm8k` also runs lm-evaluation-harness tasks for every model (needs `.[eval]`):
a table of accuracy / exact match ± stderr in the report and results.json, and a bar chart (downstream.png)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.cli import ArgumentParser, fail, positive_int, run_cli  # noqa: E402


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            fail(f"{flag} expects NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (HF, mergoo or btx checkpoint)")
    p.add_argument("--workdir", action="append", help="NAME=DIR of a training run, for the loss-curve plot")
    p.add_argument("--domains", default="wiki,math,novel", help="bundled domains to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the bundled one)")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-batches", type=positive_int, default=8)
    p.add_argument("--prompt", action="append", default=[], help="sample generations from every model")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--tasks", default=None, help="lm-eval tasks, comma-separated (offline: btx_jcommonsenseqa, "
                   "btx_jsquad, btx_gsm8k; any harness task or YAML file)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: override the tasks' few-shot count")
    p.add_argument("--max-gen-toks", type=int, default=None, help="lm-eval: cap on generated tokens")
    p.add_argument("--out", required=True, help="output directory (report.md, results.json, PNGs)")
    args = p.parse_args()
    run_cli(lambda: evaluate_cli(args))


def evaluate_cli(args) -> None:
    from btx_jax import evaluate, report
    from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, load_tokenizer
    models, workdirs = _pairs(args.model, "--model"), _pairs(args.workdir, "--workdir")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    tokenizer = load_tokenizer(args.tokenizer or BUNDLED_TOKENIZER)
    results, loaded = evaluate.evaluate_models(models, {d: bundled_source(d) for d in domains}, tokenizer,
                                          seq_len=args.seq_len, batch_size=args.batch_size,
                                          max_batches=args.max_batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    routing, heatmaps = {}, {}
    for name in models:
        m = evaluate.routing_matrix(results[name], domains)
        if m is not None:
            routing[name] = m
            experts = [f"expert{i}" for i in range(m.shape[1])]
            heatmaps[name] = report.plot_routing_heatmap(m, domains, experts, out / f"routing_{name}.png")
    curves = report.plot_loss_curves({k: Path(v) for k, v in workdirs.items()}, out / "loss_curves.png")
    downstream, scores = None, {}
    if args.tasks:
        from btx_jax import downstream as ds
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if t.endswith(".yaml") and not Path(t).is_file():
                raise FileNotFoundError(f"task file not found: {t}")
        scores = ds.run_tasks(loaded, tasks, tokenizer=tokenizer, limit=args.limit, batch_size=args.batch_size,
                              num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks)
        downstream = ds.report_section(scores, out)
        (out / "downstream.json").write_text(json.dumps(scores, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    n_exp = next(iter(routing.values())).shape[1] if routing else 0
    samples = {}
    if args.prompt:
        from btx_jax.textgen import complete
        samples = {name: list(zip(args.prompt, complete(pre, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                                        temperature=0.7, top_p=0.9)))
                   for name, pre in loaded.items()}
    path = report.write_report(out, results=results, domains=domains, routing=routing,
                               experts=[f"expert{i}" for i in range(n_exp)], loss_curves=curves,
                               heatmaps=heatmaps, samples=samples, findings=[], header="btx-jax evaluation",
                               downstream=downstream)
    print(report.loss_table(results, domains))
    if scores:
        print(report.downstream_table(scores))
    print(f"[btx] report: {path}")


if __name__ == "__main__":
    main()
