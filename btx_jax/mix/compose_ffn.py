"""Branch-Train-MiX as in the paper (Sukhbaatar et al. 2024): mix full-FFN experts into an FFN-MoE (Mixtral).

    moe = btx_jax.compose("seed", ["expert_wiki", "expert_math", "expert_novel"],
                          btx_jax.FfnMoESpec(top_k=2, seed_expert=True))
    moe.save_pretrained("moe-dir", format="mixtral")          # runs in transformers, vLLM, ...

Every expert is a dense model branched from the seed: an HF Llama directory, a btx checkpoint (trained with the
`ffn` or `full` phase, or a plain-LoRA `expert` checkpoint), a PEFT LoRA adapter directory on the seed, or a
`Pretrained`.  LoRA experts are materialised as W + B A s first (btx_jax/checkpoint/peft.py merged_kernels),
so the seed's LoRA experts can be mixed this way too.

The merged model: in every layer the FFN becomes a mixture of the experts' FFNs (gate/up/down_proj stacked in
the order given, then the seed's own FFN when `seed_expert=True`) with a new router on the hidden state (init
as for the LoRA-MoE: btx_jax/mix/router_init.py); each token runs its top-k experts (btx_jax/model/moe_ffn.py).
All other parameters (embeddings, attention, norms, lm_head) are averaged over the N experts (`shared=
"average"`; a leaf that every expert left bit-identical to the seed's, as the `ffn` phase does, is taken from
the seed exactly) or taken from the seed (`shared="seed"`).

Built leaf by leaf into the target shardings (`compose(..., mesh=)`, or the trainer's sharded target): every
leaf of the seed and of each expert is filled on the mesh by its `ModelSource` (btx_jax/pretrained.py: file
slices per device, orbax restores into shardings); an average is summed shard by shard where the shards live;
each device's shard of a stacked expert leaf [layers, experts, in, out] is stacked on that device from the
experts' matching shards, so no device ever holds a whole expert stack and host memory holds at most the
leaf being built besides what the devices hold.

Checks (ConfigError, one line naming the expert): the same architecture as the seed; branched from it — the
relative L2 distance of all its weights to the seed's must stay below `max_drift` (default 0.5: branch-trained
experts move a few percent, an independently trained model of the same shape is ~1.4 away); top_k between 1 and
the number of experts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from btx_jax import mesh as mesh_lib
from btx_jax.checkpoint import lazy, peft
from btx_jax.config import ConfigError, LlamaConfig, MoESpec
from btx_jax.model import routed_layers
from btx_jax.model.lora import expert_columns
from btx_jax.pretrained import ModelSource, Pretrained, detect_format, memory_source, open_model
from btx_jax.mix.router_init import RouterSpec

FFN = ("gate_proj", "up_proj", "down_proj")
ROUTER = "layers/moe/router/kernel"
SHARED = ("average", "seed")


@dataclasses.dataclass(frozen=True)
class FfnMoESpec(RouterSpec):
    """An FFN-MoE (the paper's BTX, Mixtral): the router options (btx_jax/mix/router_init.py RouterSpec) plus
    `shared`: the non-FFN weights "average"d over the experts or taken from the "seed"; `max_drift`: the largest
    relative L2 distance of an expert from the seed (the branched check; None: no check)."""
    shared: str = "average"
    max_drift: float | None = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.shared not in SHARED:
            raise ConfigError(f"shared={self.shared!r}: must be one of {', '.join(SHARED)}")
        if self.max_drift is not None and not (isinstance(self.max_drift, (int, float)) and not
                                               isinstance(self.max_drift, bool) and self.max_drift > 0):
            raise ConfigError(f"max_drift={self.max_drift!r}: must be a number > 0 (or None: no check)")


def _dense_paths(src: ModelSource) -> set[str]:
    return {p for p in src.abstract() if not peft.LORA_LEAF.fullmatch(p)}


def _expert_source(expert, seed: ModelSource, label: str, allow_pickle: bool) -> ModelSource:
    """The `ModelSource` of one dense expert (a PEFT adapter: the seed with its LoRA; folded when filled)."""
    if isinstance(expert, (str, Path)):
        if detect_format(Path(expert)) == "peft":
            config, lora = peft.load_adapter(expert, seed.config, allow_pickle=allow_pickle)
            src = seed.with_leaves(config, lora, covered=False)
        else:
            src = open_model(expert, allow_pickle=allow_pickle)
    elif isinstance(expert, Pretrained):
        src = memory_source(expert)
    else:
        raise TypeError(f"{label}: expected a model directory or a Pretrained, got {type(expert).__name__}")
    config = src.config
    if config.moe is not None or (config.adapter is not None and config.adapter.router):
        raise ConfigError(f"{label}: is already a mixture of experts; an FFN expert is a dense model (or plain LoRA)")
    peft.check_same_base(config, seed.config, label)
    if _dense_paths(src) != _dense_paths(seed):
        odd = sorted(_dense_paths(src) ^ _dense_paths(seed))[0]
        raise ConfigError(f"{label}: parameter {odd!r} exists in only one of the expert and the seed "
                          "(tie_word_embeddings differs?)")
    return src


def _dense_leaf(src: ModelSource, path: str, target: jax.ShapeDtypeStruct) -> jax.Array:
    """Leaf `path` of `src` in `target`'s dtype and sharding, with a plain LoRA on it folded in (in fp32)."""
    spec, prefix = src.config.adapter, path.rsplit("/", 1)[0]
    proj = prefix.rsplit("/", 1)[-1]
    if spec is None or not path.endswith("/kernel") or proj not in spec.targets:
        return src.fill({path: target})[path]
    work = mesh_lib.sharded_target({p: s for p, s in src.abstract().items() if p.startswith(prefix + "/")},
                                   target.sharding.mesh, dtype=jnp.float32)
    leaves = src.fill(work)
    fold = jax.jit(lambda k, a, b, s, r: peft.folded(k, a, b, s, r, xp=jnp).astype(target.dtype),
                   out_shardings=target.sharding)
    return fold(leaves[path], leaves[f"{prefix}/lora_a"], leaves[f"{prefix}/lora_b"], expert_columns(spec, proj)[1],
                routed_layers(src.config))


@jax.jit
def _sq_dist(x, s):
    return jnp.sum(jnp.square(x.astype(jnp.float32) - s.astype(jnp.float32)))


class _Builder:
    """One fill of the FFN-MoE: the target's leaves built one at a time, the drift sums gathered on the way."""

    def __init__(self, seed: ModelSource, experts: list[ModelSource], seed_expert: bool, shared: str):
        self.seed, self.experts, self.seed_expert, self.shared = seed, experts, seed_expert, shared
        self.num = [0.0] * len(experts)
        self.den = 0.0

    def shared_leaf(self, path: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        """The experts' mean of a non-FFN leaf in fp32 (the seed's where every expert kept it bit for bit)."""
        work = jax.ShapeDtypeStruct(target.shape, jnp.float32, sharding=target.sharding)
        s = self.seed.fill({path: work})[path]
        self.den += float(_sq_dist(s, jnp.zeros_like(s)))
        total, same = None, True
        for k, src in enumerate(self.experts):
            x = _dense_leaf(src, path, work)
            self.num[k] += float(_sq_dist(x, s))
            same = same and bool(jnp.array_equal(x, s))
            total = x if total is None else total + x
        mean = s if self.shared == "seed" or same else total / len(self.experts)
        return jax.device_put(mean.astype(target.dtype), target.sharding)

    def stacked_leaf(self, name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        """layers/moe/{name} [layers, experts, in, out]: each expert's kernel filled sharded as one slice of the
        stack (the stack's spec without its expert dimension); every device keeps the shards of the experts
        its own shard covers and stacks them."""
        path = f"layers/mlp/{name}/kernel"
        sharding = target.sharding
        spec = tuple(sharding.spec) + (None,) * (len(target.shape) - len(sharding.spec))
        one = NamedSharding(sharding.mesh, P(spec[0], *spec[2:]))
        work = jax.ShapeDtypeStruct(target.shape[:1] + target.shape[2:], target.dtype, sharding=one)
        covers = {d: lazy.normalize(index, target.shape)[1] for d, index in sharding.devices_indices_map(
            tuple(target.shape)).items() if d in sharding.addressable_devices}
        pieces = {d: [] for d in covers}
        s = self.seed.fill({path: work})[path]
        self.den += float(_sq_dist(s, jnp.zeros_like(s)))
        for k, src in enumerate(self.experts + ([None] if self.seed_expert else [])):
            x = s if src is None else _dense_leaf(src, path, work)
            if src is not None:
                self.num[k] += float(_sq_dist(x, s))
            for shard in x.addressable_shards:
                if covers[shard.device].start <= k < covers[shard.device].stop:
                    pieces[shard.device].append(shard.data)
            del x
        del s
        stacks = [jnp.stack(pieces.pop(d), axis=1) for d in list(covers)]     # one device's pieces at a time
        return jax.make_array_from_single_device_arrays(tuple(target.shape), sharding, stacks)

    def check_drift(self, labels: list[str], max_drift: float | None) -> None:
        for num, label in zip(self.num, labels):
            drift = float(np.sqrt(num / max(self.den, 1e-30)))
            if max_drift is not None and drift > max_drift:
                raise ConfigError(f"{label}: not branched from this seed (its weights are {drift:.2f} away from the "
                                  f"seed's, relative L2; limit max_drift={max_drift})")


def ffn_moe_source(seed, experts: Sequence, spec: FfnMoESpec, *, allow_pickle: bool = False) -> ModelSource:
    """The FFN-MoE (config.moe set) of a seed model and dense experts branched from it, as a `ModelSource`:
    configs are read and checked now, weights when it is filled (the branched check then: the relative L2
    distance over the leaves filled).  Nothing refers to files: a checkpoint of it stores every leaf."""
    experts = list(experts)
    choices = spec.check_choices(len(experts))
    seed = memory_source(seed) if isinstance(seed, Pretrained) else open_model(seed, allow_pickle=allow_pickle)
    if seed.config.adapter is not None or seed.config.moe is not None:
        raise ConfigError("compose: the seed model has adapters or experts; pass the plain (dense) seed model")
    labels = [str(e) if isinstance(e, (str, Path)) else f"experts[{i}]" for i, e in enumerate(experts)]
    sources = [_expert_source(e, seed, label, allow_pickle) for e, label in zip(experts, labels)]
    c = seed.config
    config: LlamaConfig = c.replace(moe=MoESpec(num_experts=choices, top_k=int(spec.top_k),
                                                seed_expert=bool(spec.seed_expert),
                                                router_jitter=float(spec.router_jitter)))
    router = spec.weights(spec.rng(), (c.num_layers, c.hidden_size, choices))

    def fill(target):
        build = _Builder(seed, sources, bool(spec.seed_expert), spec.shared)
        out = {}
        for path, t in sorted(target.items()):          # one leaf at a time
            name = path.rsplit("/", 1)[-1]
            out[path] = (mesh_lib.place(router, t) if path == ROUTER
                         else build.stacked_leaf(name, t) if path.startswith("layers/moe/")
                         else build.shared_leaf(path, t))
        build.check_drift(labels, spec.max_drift)
        return out

    return ModelSource(config, fill)
