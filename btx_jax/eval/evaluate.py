"""Evaluation: per-domain loss / perplexity on held-out batches, and per-domain routing statistics of a
LoRA-MoE (share of each domain's tokens sent to each expert, per layer and projection).

    results = evaluate_models({"seed": "runs/demo/seed/final"}, {"math": bundled_source("math")},
                              seq_len=128, batch_size=16, max_batches=8)
    main(["--model", "seed=runs/demo/seed/final", "--out", "runs/demo/eval"])     # scripts/evaluate.py

One model is in memory at a time: each is loaded sharded over every local device (FSDP, as training shards it;
one device on CPU: `btx_jax.mesh.inference_mesh`),
in the dtype asked for (default bf16 on accelerators, fp32 on CPU), evaluated and released before the next.
Each model reads its text with its own tokenizer unless one is given (btx_jax/eval/textgen.py `model_tokenizer`).

`main` evaluates checkpoints on bundled domains and writes a markdown report (report.md, results.json, loss
tables, routing heatmaps, loss curves of training runs, and with --tasks lm-evaluation-harness scores, which need
the `eval` extra).  results.json (and downstream.json) are rewritten, atomically, as each model (and task)
completes, so a crash keeps what was done.  Bad input is one stderr line and exit 2, found before any model runs where it can
be (models, tokenizers, tasks); a --seq-len beyond a model's max_position_embeddings is refused, not truncated
(losses at another length would not be comparable)."""
from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from btx_jax import mesh as mesh_lib
from btx_jax.eval import report
from btx_jax.checkpoint.tensor_files import check_destination
from btx_jax.command_line import ArgumentParser, fail, positive_int, run_cli
from btx_jax.config import DTYPES
from btx_jax.data import bundled_source, eval_batches
from btx_jax.data.packing import FIELDS
from btx_jax.model.generate import InputError
from btx_jax.model import Llama
from btx_jax.model.loss import forward, token_losses
from btx_jax.pretrained import Pretrained, inference_dtype, open_model
from btx_jax.eval.textgen import complete, model_tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model: Llama, params, batch):
    logits, aux = forward(model, params, batch)
    ce_sum, n = token_losses(logits, batch)
    return ce_sum, n, aux.get("expert_weight", {})


def evaluate_domain(pre: Pretrained, batches: Iterable[dict]) -> dict:
    """{loss, ppl, tokens, routing: {target: [layers, experts]}} over the batches (token-weighted); routing
    is the mean gate weight of each expert (rows sum to 1 on routed layers)."""
    model = pre.model()
    ce_total = n_total = 0.0
    routing: dict[str, np.ndarray] = {}
    for batch in batches:
        ce_sum, n, frac = jax.device_get(_eval_batch(model, pre.params, {k: batch[k] for k in FIELDS}))
        ce_total, n_total = ce_total + float(ce_sum), n_total + float(n)
        for target, f in frac.items():
            routing[target] = routing.get(target, 0.0) + np.asarray(f) * float(n)
    if n_total == 0:
        raise ValueError("evaluation batches contain no target tokens")
    loss = ce_total / n_total
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(n_total),
            "routing": {t: (v / n_total).tolist() for t, v in routing.items()}}


def routing_by_expert(routing: dict[str, list]) -> np.ndarray:
    """[experts] mean gate weight, averaged over every routed layer and projection."""
    rows = [np.asarray(f) for f in routing.values()]
    stacked = np.concatenate([r[r.sum(axis=-1) > 0] for r in rows], axis=0)
    return stacked.mean(axis=0)


def evaluate_models(models: dict[str, str], domains: dict[str, dict], tokenizer=None, *, seq_len: int,
                    batch_size: int, max_batches: int, dtype=None, cache_dir: str | Path | None = None,
                    each: Callable[[str, Pretrained, object, dict], None] | None = None) -> dict:
    """{model: {domain: evaluate_domain(...)}} for model dirs, one model in memory at a time: every model's
    config, tokenizer (`tokenizer`, else its own: `model_tokenizer`) and --seq-len are checked before any is
    loaded; then each is loaded on `mesh_lib.inference_mesh()` in `dtype` (`inference_dtype`), evaluated,
    passed to `each(name, pre, tokenizer, its results)` while loaded (samples, lm-eval tasks, partial results)
    and released.
    `cache_dir`: where the tokenised evaluation stores live (default: the data pipeline's)."""
    mesh = mesh_lib.inference_mesh()
    sources, tokenizers = {}, {}
    for name, path in models.items():
        src = sources[name] = open_model(path)          # configs and tensor headers only
        if seq_len > src.config.max_position_embeddings:
            raise InputError(f"seq_len={seq_len} exceeds model {name!r}'s max_position_embeddings "
                             f"({src.config.max_position_embeddings}, {path})")
        tokenizers[name] = model_tokenizer(path, src.config.vocab_size, tokenizer=tokenizer)
    results = {}
    for name, tok in tokenizers.items():
        pre = sources[name].load(dtype=inference_dtype(dtype), mesh=mesh)
        results[name] = {d: evaluate_domain(pre, eval_batches(data, tok, seq_len, batch_size, max_batches,
                                                              cache_dir=cache_dir))
                         for d, data in domains.items()}
        if each is not None:
            each(name, pre, tok, results[name])
        del pre
    return results


def routing_matrix(domain_results: dict[str, dict], domains: list[str]) -> np.ndarray | None:
    """[domains, experts] mean gate weight of each expert on each domain's tokens (None for dense models)."""
    if not domain_results[domains[0]]["routing"]:
        return None
    return np.stack([routing_by_expert(domain_results[d]["routing"]) for d in domains])


def btx_findings(results: dict, domains: list[str], seed: str, experts: dict[str, str], moe: str,
                 routing: np.ndarray | None, tolerance: float = 0.05) -> tuple[list[str], dict[str, bool]]:
    """Sentences and pass/fail flags for the Branch-Train-MiX effect: each expert beats the seed on its
    domain; the MoE is within `tolerance` (relative loss) of the best expert on every domain; each domain's
    tokens go mostly to its own expert."""
    lines, checks = [], {}
    for d, name in experts.items():
        gain = results[seed][d]["loss"] - results[name][d]["loss"]
        checks[f"{name} beats {seed} on {d}"] = gain > 0
        lines.append(f"{name} vs {seed} on {d}: loss {results[name][d]['loss']:.3f} vs {results[seed][d]['loss']:.3f} "
                     f"({'better' if gain > 0 else 'NOT better'} by {gain:.3f})")
    for d in domains:
        best = min(results[name][d]["loss"] for name in experts.values())
        rel = results[moe][d]["loss"] / best - 1.0
        checks[f"{moe} within {tolerance:.0%} of best expert on {d}"] = rel <= tolerance
        lines.append(f"{moe} on {d}: loss {results[moe][d]['loss']:.3f}, best expert {best:.3f} "
                     f"({rel:+.1%} relative)")
    if routing is not None:
        for i, (d, name) in enumerate(experts.items()):
            own = int(np.argmax(routing[i])) == i
            checks[f"{d} tokens go mostly to expert {name}"] = own
            lines.append(f"{d} tokens: {routing[i][i]:.0%} of the gate weight on its own expert {name}"
                         f" (largest share: {'yes' if own else 'NO'})")
    return lines, checks


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
    """scripts/evaluate.py (argv: sys.argv[1:] by default): 0, or SystemExit(2) with one line on stderr."""
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
