"""mergoo LoRA-MoE checkpoints (mergoo 0.0.10 layout) <-> btx_jax LoRA-MoE parameters.

Layout.  config.json is the base model's HF config plus `num_experts`, `num_experts_per_tok` (top-k),
`router_layers` (the routed projection names, e.g. ["gate_proj", "up_proj"]), `router_layers_index` (the
decoder layers that are routed) and `adapter_configs` (one PEFT LoraConfig dict per expert; r, lora_alpha,
use_rslora, lora_dropout are what mergoo reads).  In a routed (layer, projection) the tensors are

    model.layers.{i}.mlp.gate_proj.base_layer.weight   [out, in]   the frozen base linear
    model.layers.{i}.mlp.gate_proj.gate.weight         [E, in]     the bias-free router
    model.layers.{i}.mlp.gate_proj.lora_A.{e}.weight   [r_e, in]   expert e
    model.layers.{i}.mlp.gate_proj.lora_B.{e}.weight   [out, r_e]

and every other projection keeps its plain `...weight`.  The forward (mergoo's LoRAMoeLayer) is
y = base(x) + sum_{e in top-k(gate(x))} softmax_topk(gate(x))_e * B_e A_e x * s_e, which is btx_jax's
LoRA-MoE Linear (btx_jax/model/lora.py).

router_layers_index.  mergoo (compose_layers.convert_linear_to_moe) builds a LoRAMoeLayer only when the layer
index is in router_layers_index AND the projection name is in router_layers; every other projection is a plain
nn.Linear with no LoRA at all.  btx_jax's scanned layers hold adapter parameters in every layer and multiply the
delta by a per-layer 0/1 flag (model/llama.py routed_layers), so loading fills the unrouted layers' LoRA and
router parameters with zeros (ignoring any `lora_A.{e}` tensors there: mergoo's own composer writes the whole
PEFT state dict, including `base_layer.weight` and LoRA tensors in unrouted layers, which mergoo's model then
does not use), reads an unrouted layer's kernel from `.weight` (or `.base_layer.weight` when only that exists,
as the composer writes it), and saving writes unrouted layers as plain `.weight` without adapter tensors.
An empty router_layers_index means no routed layer (mergoo's `[None]` composer setting).

Routers on the layer's own input width.  Stock mergoo creates every gate as Linear(hidden_size, E), so a routed
down_proj (input width intermediate_size) crashes in mergoo (mergoo issue #13), as does o_proj when
heads * head_dim != hidden_size.  btx_jax's router sits on the projection's input width: for a routed down_proj
it writes `down_proj.gate.weight` with shape [E, intermediate_size].  btx_jax reads and writes such checkpoints;
stock mergoo cannot run them (a patched LoRAMoeLayer that builds its gate on in_features can).

Missing gates.  mergoo's composer does not save routers (they are created when the MoE model is loaded, with HF's
normal(initializer_range) init).  If no `gate.weight` tensor exists, routers are initialised the same way
(seeded, with a warning); a checkpoint with only some of them is refused.

Not representable.  mergoo has no seed (LoRA-free) expert: `seed_expert=True` models are refused on export
(save with format='btx').  Router jitter is a training setting and is not stored.  rank_pattern / alpha_pattern
are written into adapter_configs and honoured by btx_jax, but stock mergoo ignores them.  mergoo has one
lora_dropout per expert; btx_jax keeps one dropout for all experts (the largest is used on load).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from btx_jax import param_paths
from btx_jax.checkpoint import peft
from btx_jax.checkpoint.hf import BASE_LEAF, export_tensors, load_leaves
from btx_jax.checkpoint.tensor_files import CheckpointError, TensorReader, read_json, write_tensors
from btx_jax.config import ALL_TARGETS, AdapterSpec, ConfigError, LlamaConfig
from btx_jax.model import abstract_params, routed_layers

MERGOO_KEYS = ("num_experts", "num_experts_per_tok", "router_layers", "router_layers_index", "adapter_configs")
ROUTER_LEAF = re.compile(r"layers/\w+/\w+/router")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_TARGET_KERNEL = re.compile(r"(model\.layers\.\d+\.\w+\.(\w+))\.weight")


def _layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def _expert_key(key: str, e: int) -> str:
    return re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{e}.weight", key)


def spec_from_config(raw: dict, base: LlamaConfig, source: str) -> AdapterSpec:
    """AdapterSpec of a mergoo config.json dict (ConfigError naming `source` otherwise)."""
    missing = [k for k in MERGOO_KEYS if k not in raw and k != "router_layers_index"]
    if missing:
        raise ConfigError(f"{source}: missing mergoo key {missing[0]!r}")
    adapter_configs = raw["adapter_configs"]
    if not isinstance(adapter_configs, list) or len(adapter_configs) != int(raw["num_experts"]):
        raise ConfigError(f"{source}: num_experts={raw['num_experts']} but "
                          f"{len(adapter_configs) if isinstance(adapter_configs, list) else 'no'} adapter_configs")
    names = raw["router_layers"]
    if not isinstance(names, list) or not names or any(n not in ALL_TARGETS for n in names):
        bad = [n for n in names if n not in ALL_TARGETS] if isinstance(names, list) and names else [names]
        raise ConfigError(f"{source}: router_layers entry {bad[0]!r} is not a Llama projection "
                          f"(valid: {', '.join(ALL_TARGETS)})")
    targets = tuple(t for t in ALL_TARGETS if t in names)
    experts, dropouts = [], []
    for e, ac in enumerate(adapter_configs):
        where = f"{source}: adapter_configs[{e}]"
        expert, expert_targets, dropout = peft.parse_adapter_config(ac, base.num_layers, where)
        if set(expert_targets) != set(targets):
            raise ConfigError(f"{where}: target modules {list(expert_targets)} differ from router_layers "
                              f"{list(targets)}")
        experts.append(expert)
        dropouts.append(dropout)
    index = raw.get("router_layers_index")
    index = list(range(base.num_layers)) if index is None else [i for i in index if i is not None]
    layers = tuple(sorted({int(i) for i in index}))
    try:
        spec = AdapterSpec(targets=targets, experts=tuple(experts), dropout=max(dropouts), router=True,
                           top_k=int(raw["num_experts_per_tok"]),
                           router_layers=None if layers == tuple(range(base.num_layers)) else layers)
        spec.validate(base.num_layers)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return spec


class _UnroutedZeros:
    """A TensorReader view in which the adapter tensors (LoRA, gate) of unrouted layers read as zeros."""

    def __init__(self, reader: TensorReader, shapes: dict[str, tuple], dtype):
        self.reader, self.directory, self.shapes, self.dtype_ = reader, reader.directory, shapes, dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.shapes[key]) if key in self.shapes else self.reader.shape(key)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self.dtype_) if key in self.shapes else self.reader.dtype(key)

    def get_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        if key in self.shapes:
            return np.zeros([s.stop - s.start for s in index], self.dtype_)
        return self.reader.get_slice(key, index)


def _hf_shapes(config: LlamaConfig, select, key_of, layers) -> dict[str, tuple]:
    """{HF key: HF shape} of the selected leaves' slices in `layers`."""
    out = {}
    for path, sds in param_paths.flatten(abstract_params(config)).items():
        if not select(path):
            continue
        rule = param_paths.rule_for(path)
        for i, key in param_paths.hf_keys(path, config.num_layers):
            if i in layers:
                shape = tuple(sds.shape[1:])
                out[key_of(path, key)] = shape[::-1] if rule.transpose else shape
    return out


def load(directory: str | Path, dtype=None, allow_pickle: bool = False) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig with the LoRA-MoE adapter, {path: lazy leaf or array}) of a mergoo LoRA-MoE directory."""
    directory = Path(directory)
    source = str(directory / "config.json")
    raw = read_json(directory / "config.json")
    base = LlamaConfig.from_hf(raw, source=source)
    spec = spec_from_config(raw, base, source)
    config = base.replace(adapter=spec)
    routed = routed_layers(config)
    unrouted = {i for i in range(config.num_layers) if not routed[i]}
    reader = TensorReader(directory, allow_pickle=allow_pickle)

    def kernel_key(path, key):
        m = _TARGET_KERNEL.fullmatch(key)
        if not m or m.group(2) not in spec.targets:
            return key
        wrapped = f"{m.group(1)}.base_layer.weight"
        if _layer_of(key) in unrouted and (key in reader or wrapped not in reader):
            return key
        return wrapped

    flat = load_leaves(reader, config, lambda p: bool(BASE_LEAF.fullmatch(p)), key_of=kernel_key, dtype=dtype)
    fill_dtype = flat["embed_tokens"].dtype
    lora = []
    for e, expert in enumerate(spec.experts):
        single = peft.lora_config(base, expert, spec.targets)

        def key_of(path, key, e=e):
            return _expert_key(key, e)

        select = lambda p: bool(peft.LORA_LEAF.fullmatch(p))  # noqa: E731
        view = _UnroutedZeros(reader, _hf_shapes(single, select, key_of, unrouted), fill_dtype)
        lora.append(load_leaves(view, single, select, key_of=key_of, dtype=dtype))
    flat.update(peft.concat_experts(lora, routed))
    flat.update(_load_routers(reader, config, unrouted, fill_dtype, raw, dtype))
    return config, flat


def _load_routers(reader, config, unrouted, fill_dtype, raw, dtype) -> dict[str, np.ndarray]:
    select = lambda p: bool(ROUTER_LEAF.fullmatch(p))  # noqa: E731
    shapes = _hf_shapes(config, select, lambda p, k: k, unrouted)
    routed_keys = sorted(set(_hf_shapes(config, select, lambda p, k: k, set(range(config.num_layers)))) - set(shapes))
    present = [k for k in routed_keys if k in reader]
    if routed_keys and not present:
        std = float(raw.get("initializer_range", 0.02))
        warnings.warn(f"{reader.directory}: no router (gate.weight) tensors; initialising routers with "
                      f"normal(0, {std}) like mergoo does when it loads a freshly composed checkpoint")
        rng = np.random.default_rng(0)
        out = {}
        for path, sds in param_paths.flatten(abstract_params(config)).items():
            if select(path):
                arr = (rng.standard_normal(sds.shape) * std).astype(fill_dtype)
                arr *= routed_layers(config)[:, None, None].astype(fill_dtype)
                out[path] = arr
        return out
    return load_leaves(_UnroutedZeros(reader, shapes, fill_dtype), config, select, dtype=dtype)


def config_dict(config: LlamaConfig) -> dict:
    """mergoo config.json of a LoRA-MoE LlamaConfig."""
    spec = config.adapter
    hf = config.to_hf()
    hf.update({
        "num_experts": len(spec.experts),
        "num_experts_per_tok": spec.top_k,
        "router_layers": list(spec.targets),
        "router_layers_index": [int(i) for i in np.flatnonzero(routed_layers(config))],
        "adapter_configs": [
            peft.adapter_config_dict(AdapterSpec(targets=spec.targets, experts=(e,), dropout=spec.dropout,
                                                 init=spec.init))
            for e in spec.experts],
    })
    return hf


def check_savable(config: LlamaConfig) -> None:
    """CheckpointError unless the model is a LoRA-MoE mergoo can hold (before anything is read)."""
    spec = config.adapter
    if spec is None or not spec.router:
        raise CheckpointError("the mergoo format holds a LoRA-MoE (several experts + router); this model has "
                              f"{'no adapter' if spec is None else 'a plain LoRA'}: use format='hf' or 'peft'")
    if spec.seed_expert:
        raise CheckpointError("mergoo has no seed (LoRA-free) expert: a seed_expert=True LoRA-MoE cannot be "
                              "written as mergoo (save with format='btx')")


def save(directory: Path, config: LlamaConfig, flat: dict[str, np.ndarray],
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Write (`config`, {path: array}) of a LoRA-MoE model as a mergoo checkpoint directory."""
    check_savable(config)
    spec = config.adapter
    routed = routed_layers(config)
    (directory / "config.json").write_text(json.dumps(config_dict(config), indent=2))

    def kernel_key(path, key):
        m = _TARGET_KERNEL.fullmatch(key)
        if m and m.group(2) in spec.targets and routed[_layer_of(key)]:
            return f"{m.group(1)}.base_layer.weight"
        return key

    def routed_only(pairs):
        return ((k, t) for k, t in pairs if routed[_layer_of(k)])

    def tensors():
        yield from export_tensors(flat, config, lambda p: bool(BASE_LEAF.fullmatch(p)), key_of=kernel_key)
        yield from routed_only(export_tensors(flat, config, lambda p: bool(ROUTER_LEAF.fullmatch(p))))
        starts = {t: np.cumsum((0,) + spec.ranks(t)) for t in spec.targets}
        for e in range(len(spec.experts)):
            piece = {}
            for path, arr in flat.items():
                if peft.LORA_LEAF.fullmatch(path):
                    target = path.split("/")[2]
                    lo, hi = starts[target][e], starts[target][e + 1]
                    piece[path] = arr[:, :, lo:hi] if path.endswith("lora_a") else arr[:, lo:hi, :]
            yield from routed_only(export_tensors(piece, config, lambda p: True,
                                                  key_of=lambda path, key, e=e: _expert_key(key, e)))

    write_tensors(directory, tensors(), max_shard_bytes=max_shard_bytes)
