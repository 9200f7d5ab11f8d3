"""Branch-Train-MiX "mix" step: compose domain LoRA experts on one base into a LoRA-MoE (mergoo semantics), or
with mode="ffn" full-FFN experts into an FFN-MoE (the paper's BTX, Mixtral architecture: btx_jax/compose_ffn.py).

    moe = btx_jax.compose("llama-dir", ["lora-wiki", "lora-math", "lora-novel"], top_k=2,
                          router_init="normal")
    moe.save_pretrained("moe-dir", format="mergoo")        # or "btx"

Experts are PEFT adapter directories, btx_jax LoRA checkpoints (save_pretrained(format="btx") of a plain-LoRA
model) or plain-LoRA `Pretrained` objects.  Every expert must fit the base (tensor shapes) and target the same
projections; ranks, alphas and rsLoRA may differ per expert (their A/B are concatenated along the rank axis).

The result routes every target projection of the layers in `router_layers` (default: all) with a bias-free
router on the projection's own input width; the base is always applied, the top-k experts' LoRA deltas are
mixed with a softmax over the k selected router logits (see btx_jax/model/lora.py).

Router init and ties.  `router_init="zeros"` gives every expert the same logit.  Top-k then breaks the tie by
index (jax.lax.top_k is stable: lowest indices first; torch.topk, hence mergoo, does not document its
tie order), so EVERY token is sent to experts
0..k-1 with weight 1/k each and the remaining experts are never selected until the router's weights separate
(they still receive gradient through the load-balancing loss, whose router probabilities cover all experts, but
not from the language-model loss).  That is an equal mixture of the first k experts, not of all experts.
`router_init="normal"` (the default, N(0, router_std^2) with router_std=0.02, which is also what mergoo's
freshly loaded gates get from HF's initializer_range) breaks the ties with small random logits, so tokens are
spread over all experts from the start.  The seed expert (`seed_expert=True`, a LoRA-free choice that keeps the
base projection alone, like BTX keeping the seed FFN) is the last router output.

The command line is scripts/compose.py (btx_jax/compose_cli.py).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from btx_jax.checkpoint import btx, peft
from btx_jax.compose_ffn import compose_ffn_source
from btx_jax.config import AdapterSpec, ConfigError
from btx_jax.model import abstract_leaves, routed_layers
from btx_jax.pretrained import ModelSource, Pretrained, memory_source, open_model, warn_other_base
from btx_jax.router_init import check_router_init, router_weights

MODES = ("lora", "ffn")   # LoRA-MoE per linear (mergoo) | FFN-MoE per layer (the BTX paper, Mixtral)


def _expert_lora(expert, base_config, label: str, allow_pickle: bool):
    """(AdapterSpec of the single expert, {lora path: leaf}) of one expert argument."""
    if isinstance(expert, Pretrained):
        spec = expert.config.adapter
        if spec is None or spec.router or len(spec.experts) != 1:
            raise ConfigError(f"{label}: not a plain LoRA model (an expert needs exactly one LoRA expert and no "
                              "router)")
        if spec.router_layers is not None:
            raise ConfigError(f"{label}: LoRA on a subset of layers (router_layers) cannot be used as an expert")
        peft.check_same_base(expert.config, base_config, label)
        return spec, {k: v for k, v in expert.flat_numpy().items() if peft.LORA_LEAF.fullmatch(k)}
    if not isinstance(expert, (str, Path)):
        raise TypeError(f"{label}: expected an adapter directory or a Pretrained, got {type(expert).__name__}")
    config, lora = peft.load_adapter(expert, base_config, allow_pickle=allow_pickle)
    return config.adapter, lora


def compose_source(base, experts: Sequence, *, top_k: int = 2, seed_expert: bool = False,
                   router_init: str = "normal", router_std: float = 0.02, router_layers: Sequence[int] | None = None,
                   router_jitter: float = 0.0, seed: int = 0, allow_pickle: bool = False,
                   allow_other_base: bool = False) -> ModelSource:
    """The LoRA-MoE as a `ModelSource` (nothing read yet; see `compose` for the arguments).  Its reference
    names the base and the expert directories, so a lean checkpoint of it stores only routers and what trains."""
    experts = list(experts)
    if not experts:
        raise ConfigError("compose needs at least one expert")
    check_router_init(router_init)
    choices = len(experts) + int(bool(seed_expert))
    if not 1 <= int(top_k) <= choices:
        raise ConfigError(f"top_k={top_k} must be between 1 and the number of experts ({choices}"
                          f"{' including the seed expert' if seed_expert else ''})")
    base = base if isinstance(base, ModelSource) else memory_source(base) if isinstance(base, Pretrained) \
        else open_model(base, allow_pickle=allow_pickle)
    if base.config.adapter is not None:
        raise ConfigError("compose: the base model already has an adapter; pass the plain base model")
    labels = [str(e) if isinstance(e, (str, Path)) else f"experts[{i}]" for i, e in enumerate(experts)]
    loaded = [_expert_lora(e, base.config, label, allow_pickle) for e, label in zip(experts, labels)]
    for e in experts if base.reference is not None else ():
        if isinstance(e, (str, Path)):
            warn_other_base(e, base.reference["path"])
    first_targets = loaded[0][0].targets
    for (spec, _), label in zip(loaded[1:], labels[1:]):
        if set(spec.targets) != set(first_targets):
            raise ConfigError(f"{label}: targets {list(spec.targets)} differ from {labels[0]}'s "
                              f"{list(first_targets)}; all experts must target the same modules")
    spec = AdapterSpec(targets=first_targets, experts=tuple(s.experts[0] for s, _ in loaded),
                       dropout=max(s.dropout for s, _ in loaded), router=True, top_k=int(top_k),
                       seed_expert=bool(seed_expert), router_jitter=float(router_jitter),
                       router_layers=None if router_layers is None else tuple(sorted({int(i) for i in router_layers})),
                       init=loaded[0][0].init)
    config = base.config.replace(adapter=spec)
    flags = routed_layers(config)
    rng = np.random.default_rng(seed)
    routers = {path: router_weights(rng, sds.shape, router_init, router_std) * flags.reshape((-1,) + (1,) * (sds.ndim - 1))
               for path, sds in sorted(abstract_leaves(config).items())
               if path.endswith("/router")}
    on_disk = base.reference is not None and all(isinstance(e, (str, Path)) for e in experts)
    src = base.with_leaves(config, peft.concat_experts([lora for _, lora in loaded], flags), covered=on_disk)
    src = src.with_leaves(config, routers, covered=False)
    reference = {**base.reference, "experts": [str(btx.resolve(e)) for e in experts]} if on_disk else None
    src = dataclasses.replace(src, reference=reference)
    return src if allow_other_base else _checking_base(src, experts, labels)


def _checking_base(src: ModelSource, experts: list, labels: list[str]) -> ModelSource:
    """`src` whose fill refuses the base if it is not the one a btx expert was trained on (the digest of the
    frozen weights its training recorded, btx_jax/checkpoint/btx.py, against the same leaves here)."""
    recorded = []
    for e, label in zip(experts, labels):
        if isinstance(e, (str, Path)) and btx.is_btx(Path(e)):
            ref = btx.read_config(e)[1]
            if ref and ref.get("digest") and ref.get("digest_paths"):
                recorded.append((label, ref))
    if not recorded:
        return src

    def fill(target):
        out = src.fill(target)
        for label, ref in recorded:
            if all(p in out for p in ref["digest_paths"]):
                found = btx.digest({p: out[p] for p in ref["digest_paths"]})
                if found != ref["digest"]:
                    raise ConfigError(f"{label}: was trained on another base ({ref['path']}, digest {ref['digest']}; "
                                      f"this base: {found}); pass allow_other_base=True (--allow-other-base, "
                                      "model.compose.allow_other_base) if they are meant to be used together")
        return out
    return dataclasses.replace(src, fill=fill)


def warn_repeated(experts: Sequence) -> None:
    """A warning line for each expert given twice (the same directory, or the same object): a mixture of copies."""
    first = {}
    for i, e in enumerate(experts):
        key = btx.resolve(e) if isinstance(e, (str, Path)) else id(e)
        if key in first:
            print(f"warning: expert {i} ({e}) is the same as expert {first[key]}: the mixture holds two identical "
                  "experts", file=sys.stderr)
        first.setdefault(key, i)


def compose(base, experts: Sequence, *, mode: str = "lora", top_k: int = 2, seed_expert: bool = False,
            router_init: str = "normal", router_std: float = 0.02, router_layers: Sequence[int] | None = None,
            router_jitter: float = 0.0, seed: int = 0, dtype=None, allow_pickle: bool = False,
            allow_other_base: bool = False, shared: str = "average", max_drift: float | None = 0.5,
            mesh=None) -> Pretrained:
    """LoRA-MoE `Pretrained` from a base (HF Llama directory or base `Pretrained`) and LoRA experts, or with
    `mode="ffn"` an FFN-MoE (Mixtral) from a seed and dense experts (btx_jax/compose_ffn.py; `shared` and
    `max_drift` are its options).

    `top_k`: experts mixed per token (1..len(experts) + seed_expert).  `router_init`: "normal" (default) or
    "zeros" (see the module docstring on ties).  `router_layers`: decoder layer indices to route (mergoo's
    router_layers_index; default all); the other layers run the base projection alone and hold zeros.
    `allow_other_base`: skip the check that btx experts were trained on this base (their recorded digest).
    `mesh`: shard the MoE over it as it is built, leaf by leaf (default: one device)."""
    if mode not in MODES:
        raise ConfigError(f"compose mode {mode!r} is not one of {', '.join(MODES)}")
    warn_repeated(experts)
    if mode == "ffn":
        if router_layers is not None:
            raise ConfigError("router_layers applies to the LoRA-MoE only; an FFN-MoE routes every layer")
        src = compose_ffn_source(base, experts, top_k=top_k, seed_expert=seed_expert, router_init=router_init,
                                 router_std=router_std, router_jitter=router_jitter, shared=shared,
                                 max_drift=max_drift, rng_seed=seed, allow_pickle=allow_pickle)
    else:
        src = compose_source(base, experts, top_k=top_k, seed_expert=seed_expert, router_init=router_init,
                             router_std=router_std, router_layers=router_layers, router_jitter=router_jitter,
                             seed=seed, allow_pickle=allow_pickle, allow_other_base=allow_other_base)
    if dtype is None and isinstance(base, Pretrained):
        dtype = base.dtype
    return src.load(dtype=dtype, mesh=mesh)
