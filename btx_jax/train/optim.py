"""AdamW with linear warmup + cosine decay, global-norm clipping, no weight decay on norms, optional
skipping of non-finite updates.  Built over the trainable sub-tree only, so frozen parameters have no
optimizer state at all (equivalent to optax.multi_transform with set_to_zero, without the empty leaves)."""
from __future__ import annotations

import jax
import optax

from btx_jax import param_paths
from btx_jax.schema import Train


def schedule(t: Train) -> optax.Schedule:
    """`t` is the `train` section of the config.  The warmup rises from 0, evaluated at the optimizer count
    plus `warmup_offset` (1: step 1 trains at lr / warmup_steps; 0, runs checkpointed before it existed: step
    1 trains at lr 0).  A resume compares the key, so an old run is refused rather than shifted silently."""
    warmup = max(t.warmup_steps, 1)
    base = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
                                              decay_steps=max(t.steps, warmup + 1), end_value=t.lr * t.min_lr_ratio)
    return lambda count: base(count + t.warmup_offset)


def decay_mask(tree):
    """Weight decay on matrices only: not on norm scales."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: not param_paths.path_str(kp).endswith("scale"), tree)


def make_optimizer(t: Train) -> optax.GradientTransformation:
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
        optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask),
    )
    if t.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=t.max_consecutive_nonfinite)
    return tx
