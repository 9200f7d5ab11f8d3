"""Branch-Train-MiX "mix" step: compose experts on one base into a mixture of experts, one spec per mode:

    moe = btx_jax.compose("llama-dir", ["lora-wiki", "lora-math", "lora-novel"], btx_jax.LoraMoESpec(top_k=2))
    moe.save_pretrained("moe-dir", format="mergoo")        # or "btx"
    moe = btx_jax.compose("seed-dir", ["ffn-wiki", "ffn-math"], btx_jax.FfnMoESpec(top_k=2, seed_expert=True))

`LoraMoESpec` (the default): LoRA experts into a LoRA-MoE per linear (mergoo semantics, this module).
`FfnMoESpec`: dense experts branched from a seed into an FFN-MoE per layer (the BTX paper, Mixtral:
btx_jax/mix/compose_ffn.py).  Both share the router options (btx_jax/mix/router_init.py RouterSpec); a spec checks its
fields when it is made, `make_spec(mode, options)` builds one from named options (the CLI, model.compose.*) and
refuses an option its mode does not have.  `compose(..., dtype=, mesh=, allow_pickle=)` are how it is read.

LoRA experts are PEFT adapter directories, btx_jax LoRA checkpoints (save_pretrained(format="btx") of a
plain-LoRA model) or plain-LoRA `Pretrained` objects.  Every expert must fit the base (tensor shapes) and target
the same projections; ranks, alphas and rsLoRA may differ per expert (their A/B are concatenated along the rank
axis).

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

The package exports the function as `btx_jax.compose`; inside the package import from
`btx_jax.mix.compose` the module (`from btx_jax.mix.compose import ...`), never through the `btx_jax` attribute.
The command line is scripts/compose.py (btx_jax/cli/compose.py).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from btx_jax.checkpoint import btx, peft
from btx_jax.mix.compose_ffn import FfnMoESpec, ffn_moe_source
from btx_jax.config import AdapterSpec, ConfigError
from btx_jax.model import abstract_leaves, routed_layers
from btx_jax.pretrained import ModelSource, Pretrained, memory_source, open_model, warn_other_base
from btx_jax.mix.router_init import RouterSpec


@dataclasses.dataclass(frozen=True)
class LoraMoESpec(RouterSpec):
    """A LoRA-MoE (mergoo): the router options (btx_jax/mix/router_init.py RouterSpec) plus `router_layers`: the
    decoder layers to route (mergoo's router_layers_index; None: all; the others run the base alone and hold
    zeros) and `allow_other_base`: skip the check that btx experts were trained on this base (their recorded
    digest)."""
    router_layers: tuple[int, ...] | None = None
    allow_other_base: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.router_layers is not None:
            layers = self.router_layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or \
                    not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ConfigError(f"router_layers={layers!r}: must be a list of layer indices (integers >= 0)")
            object.__setattr__(self, "router_layers", tuple(sorted({int(i) for i in layers})))
        if not isinstance(self.allow_other_base, bool):
            raise ConfigError(f"allow_other_base={self.allow_other_base!r}: must be true or false")


SPECS = {"lora": LoraMoESpec, "ffn": FfnMoESpec}   # LoRA-MoE per linear (mergoo) | FFN-MoE per layer (BTX, Mixtral)
MODES = tuple(SPECS)


def make_spec(mode: str, options: dict, label: Callable[[str], str] = str) -> LoraMoESpec | FfnMoESpec:
    """The spec of `mode` from its `options` by field name; an unknown mode, an option the mode does not have or
    a bad value is a ConfigError naming it as `label(field)` (e.g. "model.compose.top_k", "--top-k")."""
    if mode not in SPECS:
        raise ConfigError(f"{label('mode')}={mode!r}: must be one of {', '.join(MODES)}")
    names = [f.name for f in dataclasses.fields(SPECS[mode])]
    for key in options:
        if key not in names:
            other = [m for m, c in SPECS.items() if key in {f.name for f in dataclasses.fields(c)}]
            raise ConfigError(f"{label(key)}: not an option of mode {mode!r}"
                              + (f" (only of mode {other[0]!r})" if other else f" (its options: {', '.join(names)})"))
    try:
        return SPECS[mode](**options)
    except ConfigError as e:            # "field=value: ..." -> "label(field)=value: ..."
        field, sep, rest = str(e).partition("=")
        raise ConfigError(f"{label(field)}={rest}" if sep and field in names else str(e)) from None


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


def lora_moe_source(base, experts: Sequence, spec: LoraMoESpec, *, allow_pickle: bool = False) -> ModelSource:
    """The LoRA-MoE as a `ModelSource` (nothing read yet).  Its reference names the base and the expert
    directories, so a lean checkpoint of it stores only routers and what trains."""
    experts = list(experts)
    spec.check_choices(len(experts))
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
    for (other, _), label in zip(loaded[1:], labels[1:]):
        if set(other.targets) != set(first_targets):
            raise ConfigError(f"{label}: targets {list(other.targets)} differ from {labels[0]}'s "
                              f"{list(first_targets)}; all experts must target the same modules")
    adapter = AdapterSpec(targets=first_targets, experts=tuple(s.experts[0] for s, _ in loaded),
                          dropout=max(s.dropout for s, _ in loaded), router=True, top_k=int(spec.top_k),
                          seed_expert=bool(spec.seed_expert), router_jitter=float(spec.router_jitter),
                          router_layers=spec.router_layers, init=loaded[0][0].init)
    config = base.config.replace(adapter=adapter)
    flags = routed_layers(config)
    rng = spec.rng()
    routers = {path: spec.weights(rng, sds.shape) * flags.reshape((-1,) + (1,) * (sds.ndim - 1))
               for path, sds in sorted(abstract_leaves(config).items())
               if path.endswith("/router")}
    on_disk = base.reference is not None and all(isinstance(e, (str, Path)) for e in experts)
    src = base.with_leaves(config, peft.concat_experts([lora for _, lora in loaded], flags), covered=on_disk)
    src = src.with_leaves(config, routers, covered=False)
    reference = {**base.reference, "experts": [str(btx.resolve(e)) for e in experts]} if on_disk else None
    src = dataclasses.replace(src, reference=reference)
    return src if spec.allow_other_base else _checking_base(src, experts, labels)


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
                                      f"this base: {found}); set allow_other_base (LoraMoESpec, --allow-other-base, "
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


def compose_source(base, experts: Sequence, spec: LoraMoESpec | FfnMoESpec, *,
                   allow_pickle: bool = False) -> ModelSource:
    """The MoE `spec` describes, as a `ModelSource` (btx_jax/pretrained.py): the LoRA-MoE of a base and LoRA
    experts, or the FFN-MoE of a seed and dense experts."""
    if not isinstance(spec, (LoraMoESpec, FfnMoESpec)):
        raise TypeError(f"compose: spec must be a LoraMoESpec or an FfnMoESpec, got {type(spec).__name__}")
    experts = list(experts)
    warn_repeated(experts)
    build = ffn_moe_source if isinstance(spec, FfnMoESpec) else lora_moe_source
    return build(base, experts, spec, allow_pickle=allow_pickle)


def compose(base, experts: Sequence, spec: LoraMoESpec | FfnMoESpec = LoraMoESpec(), *, dtype=None, mesh=None,
            allow_pickle: bool = False) -> Pretrained:
    """The MoE `spec` describes (default: a top-2 LoRA-MoE) from a base (a model directory or a `Pretrained`)
    and experts (directories or `Pretrained`s), loaded in `dtype` (default: the base `Pretrained`'s, else fp32)
    and sharded over `mesh` leaf by leaf as it is built (default: one device)."""
    if dtype is None and isinstance(base, Pretrained):
        dtype = base.dtype
    return compose_source(base, experts, spec, allow_pickle=allow_pickle).load(dtype=dtype, mesh=mesh)
