"""The jit-compiled train step: token-mean cross-entropy + router aux losses, gradients with respect to the
trainable sub-tree only, gradient accumulation over microbatches with `lax.scan`, one optimizer update.

The forward pass and the plain token loss are btx_jax/model/loss.py's (evaluation runs the same).  The
cross-entropy is chunked (btx_jax/model/chunked_ce.py: lm_head applied `loss_chunk` positions at a time,
no [tokens, vocab] fp32 logits) unless `loss_chunk=0`, which projects all logits at once (the plain path).

State is a plain dict pytree {step, trainable, frozen, opt_state, rng} (what orbax checkpoints).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from btx_jax import mesh as mesh_lib, param_paths
from btx_jax.model import Llama
from btx_jax.model.chunked_ce import DEFAULT_CHUNK, chunked_cross_entropy
from btx_jax.model.loss import forward, token_losses
from btx_jax.train.phases import merge




def resolve_layout(layout: str, tokens: int, head_DV: tuple[int, int], mesh, rules=mesh_lib.DEFAULT_RULES) -> str:
    """"batch" or "vocab": how the chunked loss over `tokens` (global batch x seq of one microbatch) with an
    lm_head of shape `head_DV` is sharded.
      batch  hidden states stay batch-sharded and every device gathers lm_head ([D, V], in the forward and
             again in the backward: 2 D V elements moved)
      vocab  every device keeps its vocab shard of lm_head and gathers each [B, chunk, D] slice of hidden
             states (forward, backward, and the reduce-scatter of their gradient: 3 B T D elements)
      auto   the one that moves fewer bytes: vocab parallel when 3 B T < 2 V (small token batches against a
             large vocabulary, where it also holds less: a slice instead of the whole head)
    Vocab parallel needs V divisible by the devices it is split over; otherwise "batch"."""
    vocab = head_DV[1]
    wanted = layout == "vocab" or (layout == "auto" and 3 * tokens < 2 * vocab)
    split = math.prod(mesh.shape[a] for a in _vocab_axes(head_DV, mesh, rules))
    return "vocab" if wanted and vocab % split == 0 else "batch"


def _head_spec(head_DV: tuple[int, int], mesh, rules):
    """The spec a batch-layout loss computes lm_head in (gathered over the batch's mesh axes)."""
    return mesh_lib.gathered_spec(param_paths.rule_for("lm_head").axes, tuple(head_DV), mesh, rules)


def _vocab_axes(head_DV: tuple[int, int], mesh, rules) -> tuple[str, ...]:
    """Mesh axes a vocab-parallel head is split over: its own (tensor) ones, then the batch's."""
    return (mesh_lib.entry_axes(_head_spec(head_DV, mesh, rules)[1])
            + mesh_lib.entry_axes(mesh_lib.batch_sharding(mesh, rules).spec[0]))


def ce_sum(model: Llama, params, batch, rng=None, loss_chunk: int = DEFAULT_CHUNK, mesh=None,
           rules=mesh_lib.DEFAULT_RULES, loss_layout: str = "auto"):
    """(sum of masked token cross-entropies, aux dict): chunked when loss_chunk > 0, else from full logits.
    With a `mesh`, the chunked loss runs in a fixed layout (`resolve_layout`): batch-sharded hidden states and
    a gathered lm_head, or gathered slices of hidden states and a vocab-sharded lm_head (left to itself, XLA
    may instead gather the [batch, chunk, vocab] logits onto every device)."""
    if loss_chunk <= 0:
        logits, aux = forward(model, params, batch, rng)
        return token_losses(logits, batch)[0], aux
    (h_BTD, head_DV), aux = forward(model, params, batch, rng, return_hidden=True)
    layout = None
    if mesh is not None:
        named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        B, T, _ = h_BTD.shape
        if resolve_layout(loss_layout, B * T, head_DV.shape, mesh, rules) == "vocab":
            layout = (named(), named(None, _vocab_axes(head_DV.shape, mesh, rules) or None))
        else:
            h_BTD = jax.lax.with_sharding_constraint(h_BTD, named(mesh_lib.batch_sharding(mesh, rules).spec[0], None))
            head_DV = jax.lax.with_sharding_constraint(head_DV, named(*_head_spec(head_DV.shape, mesh, rules)))
    return chunked_cross_entropy(h_BTD, head_DV, batch["targets"], batch["loss_mask"], loss_chunk, layout), aux


def make_train_step(model: Llama, tx: optax.GradientTransformation, *, microbatches: int, lb_alpha: float,
                    z_alpha: float, loss_chunk: int = DEFAULT_CHUNK, mesh=None, rules=mesh_lib.DEFAULT_RULES,
                    loss_layout: str = "auto"):
    """step(state, batch) -> (state, metrics).  `batch` arrays are [global_batch, seq].  `mesh` is put in
    context while tracing with `rules` (kernels that run per shard, such as the TPU and GPU attention, read both:
    btx_jax/mesh.py `use_rules`); `rules` also fix the loss's shardings."""

    def loss_fn(trainable, frozen, micro, rng, total_tokens):
        ce, aux = ce_sum(model, merge(trainable, frozen), micro, rng, loss_chunk, mesh, rules, loss_layout)
        loss = ce / total_tokens
        if aux:
            loss = loss + (lb_alpha * aux["lb_loss"] + z_alpha * aux["z_loss"]) / microbatches
        return loss, (ce, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        if mesh is None:
            return traced(state, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), mesh_lib.use_rules(rules):
            return traced(state, batch)

    def traced(state, batch):
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:]), batch)
        rng, step_rng = jax.random.split(state["rng"])

        def accumulate(grads, xs):
            mb, i = xs
            (_, (ce, aux)), g = grad_fn(state["trainable"], state["frozen"], mb, jax.random.fold_in(step_rng, i),
                                        total_tokens)
            return jax.tree_util.tree_map(jnp.add, grads, g), (ce, aux)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
        grads, (ce_sums, auxs) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        ce = jnp.sum(ce_sums) / total_tokens
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
                   "tokens": total_tokens}
        if auxs:
            metrics.update(lb_loss=jnp.mean(auxs["lb_loss"]), z_loss=jnp.mean(auxs["z_loss"]),
                           expert_frac={t: jnp.mean(f, axis=0) for t, f in auxs["expert_frac"].items()})
            metrics["total_loss"] = ce + lb_alpha * metrics["lb_loss"] + z_alpha * metrics["z_loss"]
        new_state = {"step": state["step"] + 1, "trainable": trainable, "frozen": state["frozen"],
                     "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    return step


def init_state(trainable, frozen, tx, seed: int) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen,
            "opt_state": tx.init(trainable), "rng": jax.random.PRNGKey(seed)}
