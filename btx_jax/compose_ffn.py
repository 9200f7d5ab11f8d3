"""Branch-Train-MiX as in the paper (Sukhbaatar et al. 2024): mix full-FFN experts into an FFN-MoE (Mixtral).

    moe = btx_jax.compose("seed", ["expert_wiki", "expert_math", "expert_novel"], mode="ffn", top_k=2,
                          seed_expert=True)
    moe.save_pretrained("moe-dir", format="mixtral")          # runs in transformers, vLLM, ...

Every expert is a dense model branched from the seed: an HF Llama directory, a btx checkpoint (trained with the
`ffn` or `full` phase, or a plain-LoRA `expert` checkpoint), a PEFT LoRA adapter directory on the seed, or a
`Pretrained`.  LoRA experts are materialised as W + B A s first (btx_jax/checkpoint/peft.py merged_kernels),
so the seed's LoRA experts can be mixed this way too.

The merged model: in every layer the FFN becomes a mixture of the experts' FFNs (gate/up/down_proj stacked in
the order given, then the seed's own FFN when `seed_expert=True`) with a new router on the hidden state (init
as for the LoRA-MoE: btx_jax/router_init.py); each token runs its top-k experts (btx_jax/model/moe_ffn.py).
All other parameters (embeddings, attention, norms, lm_head) are averaged over the N experts (`shared=
"average"`; a leaf that every expert left bit-identical to the seed's, as the `ffn` phase does, is taken from
the seed exactly) or taken from the seed (`shared="seed"`).

Checks (ConfigError, one line naming the expert): the same architecture as the seed; branched from it — the
relative L2 distance of all its weights to the seed's must stay below `max_drift` (default 0.5: branch-trained
experts move a few percent, an independently trained model of the same shape is ~1.4 away); top_k between 1 and
the number of experts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from btx_jax.checkpoint import peft
from btx_jax.config import ConfigError, MoESpec
from btx_jax.pretrained import Pretrained, detect_format, load_pretrained, memory_source
from btx_jax.router_init import check_router_init, router_weights

FFN_LEAF = re.compile(r"layers/mlp/(gate_proj|up_proj|down_proj)/kernel")
SHARED = ("average", "seed")


def _dense(expert, seed: Pretrained, label: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """{path: fp32 array} of one expert with any plain LoRA folded into its kernels."""
    if isinstance(expert, (str, Path)):
        if detect_format(Path(expert)) == "peft":
            config, lora = peft.load_adapter(expert, seed.config, allow_pickle=allow_pickle)
            expert = memory_source(seed).with_leaves(config, lora, covered=False).load()
        else:
            expert = load_pretrained(expert, allow_pickle=allow_pickle)
    elif not isinstance(expert, Pretrained):
        raise TypeError(f"{label}: expected a model directory or a Pretrained, got {type(expert).__name__}")
    config = expert.config
    if config.moe is not None or (config.adapter is not None and config.adapter.router):
        raise ConfigError(f"{label}: is already a mixture of experts; an FFN expert is a dense model (or plain LoRA)")
    peft.check_same_base(config, seed.config, label)
    flat = {k: np.asarray(v, np.float32) for k, v in peft.merged_kernels(expert.flat_numpy(), config).items()}
    return flat


def _drift(flat: dict[str, np.ndarray], seed_flat: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((flat[k] - seed_flat[k]) ** 2)) for k in seed_flat)
    den = sum(float(np.sum(seed_flat[k] ** 2)) for k in seed_flat)
    return float(np.sqrt(num / max(den, 1e-30)))


def compose_ffn(seed, experts: Sequence, *, top_k: int = 2, seed_expert: bool = False,
                router_init: str = "normal", router_std: float = 0.02, router_jitter: float = 0.0,
                shared: str = "average", max_drift: float | None = 0.5, rng_seed: int = 0, dtype=None,
                allow_pickle: bool = False) -> Pretrained:
    """FFN-MoE `Pretrained` (config.moe set) from a seed model and dense experts branched from it."""
    experts = list(experts)
    if not experts:
        raise ConfigError("compose needs at least one expert")
    check_router_init(router_init)
    if shared not in SHARED:
        raise ConfigError(f"shared={shared!r} is not one of {', '.join(SHARED)}")
    choices = len(experts) + int(bool(seed_expert))
    if not 1 <= int(top_k) <= choices:
        raise ConfigError(f"top_k={top_k} must be between 1 and the number of experts ({choices}"
                          f"{' including the seed expert' if seed_expert else ''})")
    if not isinstance(seed, Pretrained):
        seed = load_pretrained(seed, dtype=dtype, allow_pickle=allow_pickle)
    if seed.config.adapter is not None or seed.config.moe is not None:
        raise ConfigError("compose: the seed model has adapters or experts; pass the plain (dense) seed model")
    seed_flat = {k: np.asarray(v, np.float32) for k, v in seed.flat_numpy().items()}
    labels = [str(e) if isinstance(e, (str, Path)) else f"experts[{i}]" for i, e in enumerate(experts)]
    ffn: dict[str, list[np.ndarray]] = {k: [] for k in seed_flat if FFN_LEAF.fullmatch(k)}
    sums = {k: np.zeros_like(v) for k, v in seed_flat.items() if k not in ffn}
    same_as_seed = dict.fromkeys(sums, True)
    for expert, label in zip(experts, labels):       # one expert in memory at a time
        flat = _dense(expert, seed, label, allow_pickle)
        if set(flat) != set(seed_flat):
            odd = sorted(set(flat) ^ set(seed_flat))[0]
            raise ConfigError(f"{label}: parameter {odd!r} exists in only one of the expert and the seed "
                              "(tie_word_embeddings differs?)")
        drift = _drift(flat, seed_flat)
        if max_drift is not None and drift > max_drift:
            raise ConfigError(f"{label}: not branched from this seed (its weights are {drift:.2f} away from the "
                              f"seed's, relative L2; limit max_drift={max_drift})")
        for k in ffn:
            ffn[k].append(flat[k])
        for k in sums:
            sums[k] += flat[k]
            same_as_seed[k] = same_as_seed[k] and np.array_equal(flat[k], seed_flat[k])
    out = {k: seed_flat[k] if shared == "seed" or same_as_seed[k] else sums[k] / len(experts) for k in sums}
    for name in ("gate_proj", "up_proj", "down_proj"):
        stack = ffn.pop(f"layers/mlp/{name}/kernel") + ([seed_flat[f"layers/mlp/{name}/kernel"]] if seed_expert
                                                        else [])
        out[f"layers/moe/{name}"] = np.stack(stack, axis=1)            # [layers, experts, in, out]
    config = seed.config.replace(moe=MoESpec(num_experts=choices, top_k=int(top_k), seed_expert=bool(seed_expert),
                                             router_jitter=float(router_jitter)))
    c = config
    out["layers/moe/router/kernel"] = router_weights(np.random.default_rng(rng_seed),
                                                     (c.num_layers, c.hidden_size, choices), router_init, router_std)
    return Pretrained.from_arrays(config, out, dtype if dtype is not None else seed.dtype)
