"""Held-out evaluation while training (`train.eval_every`): every eval_every steps and after the last step, the
token-mean cross-entropy of the current weights on held-out batches, per domain and overall, written to
metrics.jsonl and TensorBoard as `eval/loss` and `eval/loss/<domain>`.

Held-out data never changes what training reads.  A domain is a training source with an `eval_path` (its
held-out files, tokenised into their own store like btx_jax/eval/evaluate.py's domains: `eval_batches`, in file
order, no shuffling), named by the source's name; sources without one are not evaluated.  Synthetic data
has one domain, "synthetic": random tokens of another stream (seed train.seed + 1).  Each evaluation reads the
same first `train.eval_batches` batches of train.global_batch_size rows of every domain (fewer when the
held-out files hold fewer), kept in host memory.

The compiled evaluation is the train step's forward pass and loss (btx_jax/train/step.py `ce_sum`, without
dropout, gradients or aux losses), sharded like it: the trainable and frozen weights in the state's
shardings, the batch in the batch sharding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax import mesh as mesh_lib
from btx_jax.data import eval_batches, load_tokenizer
from btx_jax.data.packing import FIELDS
from btx_jax.data.sources import Source
from btx_jax.data.synthetic import SyntheticPipeline
from btx_jax.schema import Train
from btx_jax.train.hooks import Hook, Loop
from btx_jax.train.phases import merge
from btx_jax.train.step import ce_sum


def domains(t: Train, d: dict, vocab_size: int) -> dict[str, list[dict]]:
    """{domain: [global held-out batch, ...]} (host numpy arrays) of train section `t` and data section `d`."""
    seq_len, batch, n = t.seq_len, t.global_batch_size, t.eval_batches
    if d.get("kind") == "synthetic":
        stream = SyntheticPipeline(vocab_size=vocab_size, seq_len=seq_len, global_batch_size=batch, seed=t.seed + 1)
        return {"synthetic": [next(stream) for _ in range(n)]}
    tokenizer = load_tokenizer(d["tokenizer"])
    out = {}
    for spec in d["sources"]:
        source = Source.from_dict(spec)
        if source.eval_path:
            out[source.name] = list(eval_batches(spec, tokenizer, seq_len, batch, n, kind=d.get("kind"),
                                                 cache_dir=d.get("cache_dir")))
    return out


def make_eval_step(model, state_shardings: dict, batch_sharding, t: Train, mesh, rules):
    """jit (trainable, frozen, batch) -> (sum of masked token cross-entropies, masked tokens)."""
    model = model.clone(deterministic=True)

    def sums(trainable, frozen, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), mesh_lib.use_rules(rules):
            ce, _ = ce_sum(model, merge(trainable, frozen), batch, None, t.loss_chunk, mesh, rules, t.loss_layout)
        return ce, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return jax.jit(sums, in_shardings=(state_shardings["trainable"], state_shardings["frozen"],
                                       {k: batch_sharding for k in FIELDS}))


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch (the contiguous block the batch sharding gives it)."""
    rows = x.shape[0] // jax.process_count()
    return x[jax.process_index() * rows:(jax.process_index() + 1) * rows]


class HeldOutEval(Hook):
    def __init__(self, every: int, batches: dict[str, list[dict]], eval_step, batch_sharding, metrics_log):
        self.every, self.eval_step, self.sharding, self.metrics_log = every, eval_step, batch_sharding, metrics_log
        self.batches = {name: [{k: np.asarray(_local_rows(b[k])) for k in FIELDS} for b in bs]
                        for name, bs in batches.items()}
        self.evaluated = None          # the step last evaluated

    def on_step(self, loop: Loop) -> None:
        if loop.step % self.every == 0:
            self.evaluate(loop)

    def on_end(self, loop: Loop) -> None:
        if self.evaluated != loop.step and loop.step > loop.start:   # after the last step, once
            self.evaluate(loop)

    def evaluate(self, loop: Loop) -> dict:
        """{"eval/loss": overall, "eval/loss/<domain>": ...} of the state after `loop.step`, logged."""
        sums = {}
        for name, batches in self.batches.items():
            parts = [self.eval_step(loop.state["trainable"], loop.state["frozen"],
                                    {k: jax.make_array_from_process_local_data(self.sharding, b[k]) for k in FIELDS})
                     for b in batches]
            sums[name] = np.sum(np.asarray(jax.device_get(parts), np.float64), axis=0)     # (ce sum, tokens)
        total = np.sum(list(sums.values()), axis=0)
        row = {"eval/loss": float(total[0] / max(total[1], 1.0)),
               **{f"eval/loss/{name}": float(ce / max(n, 1.0)) for name, (ce, n) in sums.items()}}
        self.metrics_log.write(loop.step, row)
        self.evaluated = loop.step
        return row
