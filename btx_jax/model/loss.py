"""The forward pass as training and evaluation run it, and the token cross-entropy on its logits.

    logits, aux = forward(model, params, batch)          # batch: packed rows (btx_jax/data/packing.py FIELDS)
    ce_sum, tokens = token_losses(logits, batch)         # masked sum, and the tokens it covers

`aux` holds the router losses of a routed model (lb_loss, z_loss, expert_frac: btx_jax/model/lora.py
summarize_aux), {} otherwise.  The train step's chunked loss (no [tokens, vocab] logits) is
btx_jax/model/chunked_ce.py, driven by btx_jax/train/step.py.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from btx_jax.model.llama import Llama
from btx_jax.model.lora import routed_count, summarize_aux


def forward(model: Llama, params, batch, rng=None, return_hidden: bool = False):
    """(fp32 logits [B, T, V], aux dict) for one batch; aux holds lb_loss, z_loss, expert_frac.  With
    `return_hidden`, (final hidden states, lm_head weight) instead of the logits."""
    rngs = {"dropout": rng} if rng is not None else {}
    out, variables = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                                 return_hidden=return_hidden, rngs=rngs, mutable=["aux"])
    if not routed_count(model.config):
        return out, {}
    return out, summarize_aux(variables["aux"]["layers"], model.config)


def token_losses(logits_BTV, batch):
    """(sum of masked token cross-entropies, number of masked tokens)."""
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce_BT * mask), jnp.sum(mask)
