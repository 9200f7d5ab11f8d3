"""Evaluation: per-domain loss / perplexity on held-out batches, and per-domain routing statistics of a
LoRA-MoE (share of each domain's tokens sent to each expert, per layer and projection).

    results = evaluate_models({"seed": "runs/demo/seed/final"}, {"math": bundled_source("math")},
                              seq_len=128, batch_size=16, max_batches=8)

One model is in memory at a time: each is loaded sharded over every local device (FSDP, as training shards it;
one device on CPU: `btx_jax.mesh.inference_mesh`), in the dtype asked for (default bf16 on accelerators, fp32 on
CPU), evaluated and released before the next.  Each model reads its text with its own tokenizer unless one is given
(btx_jax/eval/textgen.py `model_tokenizer`); a seq_len beyond a model's max_position_embeddings is refused, not
truncated (losses at another length would not be comparable).

The command line, `btx evaluate` (btx_jax/cli/evaluate.py), writes a markdown report of these results (report.md,
results.json, loss tables, routing heatmaps, loss curves of training runs, and with --tasks lm-evaluation-harness
scores, which need the `eval` extra)."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Iterable

import jax
import numpy as np

from btx_jax import mesh as mesh_lib
from btx_jax.data import eval_batches
from btx_jax.data.packing import FIELDS
from btx_jax.model.generate import InputError
from btx_jax.model import Llama
from btx_jax.model.loss import forward, token_losses
from btx_jax.pretrained import Pretrained, inference_dtype, open_model
from btx_jax.eval.textgen import model_tokenizer


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
