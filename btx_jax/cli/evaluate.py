"""`btx evaluate`: checkpoints evaluated per domain (btx_jax/eval/evaluate.py), a markdown report with tables and
plots (btx_jax/eval/report.py), and with --tasks lm-evaluation-harness scores (btx_jax/eval/downstream.py)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from btx_jax.checkpoint.tensor_files import check_destination
from btx_jax.command_line import ArgumentParser, fail, positive_int, run_cli
from btx_jax.config import DTYPES
from btx_jax.data import bundled_source
from btx_jax.eval import report
from btx_jax.eval.evaluate import evaluate_models, routing_matrix
from btx_jax.eval.textgen import complete
from btx_jax.pretrained import Pretrained

CLI_HELP = """Evaluate checkpoints per domain and write a markdown report with tables and plots.

    btx evaluate --model seed=runs/demo/seed/final --model moe=runs/demo/router/final \\
        --workdir seed=runs/demo/seed --out runs/demo/eval

Domains default to the bundled held-out splits (wiki, math, novel); each row of the table is a model.
Models are evaluated one at a time, sharded over every local accelerator (one device on CPU), in --dtype;
results.json is rewritten as each completes.
A --seq-len beyond a model's max_position_embeddings is refused (exit 2), not truncated: losses at a different
length would not be comparable.
`--tasks btx_jcommonsenseqa,btx_gsm8k` also runs lm-evaluation-harness tasks for every model (needs `.[eval]`):
a table of accuracy / exact match ± stderr in the report and results.json, and a bar chart (downstream.png)."""


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            fail(f"{flag} expects NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="btx evaluate", description=CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=DIR (HF, mergoo or btx checkpoint)")
    p.add_argument("--workdir", action="append", help="NAME=DIR of a training run, for the loss-curve plot")
    p.add_argument("--domains", default="wiki,math,novel", help="bundled domains to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: each model's own, saved "
                   "with it or recorded by its training run; the bundled one for the demo's 4,096-token models)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="parameter and compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--cache-dir", default=None, help="where the tokenised evaluation stores are kept (default: "
                   "the data pipeline's)")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`btx evaluate` (argv: sys.argv[1:] by default): 0, or SystemExit(2) with one line on stderr."""
    args = build_parser().parse_args(argv)
    run_cli(lambda: evaluate_cli(args))
    return 0


def evaluate_cli(args) -> None:
    """Evaluate every --model on the --domains (and --tasks), write the report into --out and print its tables;
    results.json / downstream.json are rewritten (atomically) as each model / task completes."""
    check_destination(args.out, overwrite=None, what=f"--out {args.out}")      # a file there: refused before any work
    models, workdirs = _pairs(args.model, "--model"), _pairs(args.workdir, "--workdir")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    sources = {d: bundled_source(d) for d in domains}
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks:
        from btx_jax.eval import downstream as ds      # the `eval` extra (lm-evaluation-harness)
        ds.check_tasks(tasks)                     # a misspelt task: refused before any model runs
    out = Path(args.out)
    done, scores, samples = {}, {}, {}

    def each(name: str, pre: Pretrained, tok, domain_results: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)          # after the checks: bad input leaves no --out behind
        done[name] = domain_results
        report.write_json(out / "results.json", done)
        if args.prompt:
            samples[name] = list(zip(args.prompt, complete(pre, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                                                           temperature=0.7, top_p=0.9)))
        for task in tasks:                              # downstream.json rewritten after each task
            scores.setdefault(name, {}).update(ds.run_tasks(
                {name: pre}, [task], tokenizer=tok, limit=args.limit, batch_size=args.batch_size,
                num_fewshot=args.num_fewshot, max_gen_toks=args.max_gen_toks)[name])
            report.write_json(out / "downstream.json", scores)

    results = evaluate_models(models, sources, args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                              max_batches=args.max_batches, dtype=args.dtype, cache_dir=args.cache_dir, each=each)
    routing, heatmaps = {}, {}
    for name in models:
        m = routing_matrix(results[name], domains)
        if m is not None:
            routing[name] = m
            experts = [f"expert{i}" for i in range(m.shape[1])]
            heatmaps[name] = report.plot_routing_heatmap(m, domains, experts, out / f"routing_{name}.png")
    curves = report.plot_loss_curves({k: Path(v) for k, v in workdirs.items()}, out / "loss_curves.png")
    downstream = ds.report_section(scores, out) if scores else None
    n_exp = next(iter(routing.values())).shape[1] if routing else 0
    path = report.write_report(out, results=results, domains=domains, routing=routing,
                               experts=[f"expert{i}" for i in range(n_exp)], loss_curves=curves,
                               heatmaps=heatmaps, samples=samples, findings=[], header="btx-jax evaluation",
                               downstream=downstream)
    print(report.loss_table(results, domains))
    if scores:
        print(report.downstream_table(scores))
    print(f"[btx] report: {path}")
