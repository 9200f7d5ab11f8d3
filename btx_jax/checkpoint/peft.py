"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) <-> btx_jax LoRA parameters.

Reading (`attach`, `load_adapter`): the adapter config's r, lora_alpha, use_rslora, lora_dropout,
target_modules (a list of names or name suffixes, mergoo's set-string "{'gate_proj', 'up_proj'}", a regex, or
"all-linear"), rank_pattern and alpha_pattern (PEFT's `(.*\\.)?key$` matching, first key wins) become one
`ExpertSpec` + the target tuple.  btx_jax keeps one rank per projection for all layers, so a pattern (or a
target regex) that covers only some layers of a projection is refused, as are DoRA, bias != "none",
modules_to_save, layers_to_transform and other PEFT features that are not plain LoRA.  Every tensor of the
adapter file must be used: a stray tensor means the config and the weights disagree.

Writing (`save`): the same layout PEFT writes (keys `base_model.model.<HF key>.lora_A.weight`, task_type
CAUSAL_LM), so `peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)` loads it.  Only a plain LoRA (one
expert, no router, every layer) can be written; a LoRA-MoE goes to the mergoo format.

`merged_kernels` folds a plain LoRA into the base kernels: W' = W + A B s (used by save_pretrained(format="hf",
merge_lora=True)); a router is not a linear fold, so LoRA-MoE models are refused.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np

from btx_jax import param_paths
from btx_jax.checkpoint import btx, lazy
from btx_jax.checkpoint.hf import export_tensors, load_leaves
from btx_jax.checkpoint.tensor_files import CheckpointError, TensorReader, read_json, write_tensors
from btx_jax.checkpoint.lazy import LazyLeaf
from btx_jax.config import ALL_TARGETS, AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.model import routed_layers
from btx_jax.model.lora import expert_columns

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model"          # adapter_model.safetensors
PREFIX = "base_model.model."
LORA_LEAF = re.compile(r"layers/\w+/\w+/lora_[ab]")
_BLOCK = {t: param_paths.PROJECTIONS[t][2] for t in ALL_TARGETS}

# PEFT config keys that change the computation beyond plain LoRA: (key, allowed "empty" values, what to say).
_REFUSED = (
    ("use_dora", (False, None), "DoRA (use_dora=true) is not supported"),
    ("bias", ("none", None), "LoRA bias (bias != 'none') is not supported"),
    ("lora_bias", (False, None), "LoRA bias (lora_bias=true) is not supported"),
    ("modules_to_save", (None, [], ()), "modules_to_save (fully trained extra modules) is not supported"),
    ("layers_to_transform", (None, [], ()), "layers_to_transform (LoRA on a subset of layers) is not supported"),
    ("layer_replication", (None, [], ()), "layer_replication is not supported"),
    ("fan_in_fan_out", (False, None), "fan_in_fan_out=true does not apply to Llama's nn.Linear layers"),
    ("trainable_token_indices", (None, [], {}), "trainable_token_indices is not supported"),
    ("exclude_modules", (None, [], (), ""), "exclude_modules is not supported"),
)


def module_name(target: str, layer: int) -> str:
    return f"model.layers.{layer}.{_BLOCK[target]}.{target}"


def _parse_targets(value, num_layers: int, source: str) -> tuple[str, ...]:
    """PEFT target_modules -> projection names (in ALL_TARGETS order), every layer, or ConfigError."""
    names = {t: [module_name(t, i) for i in range(num_layers)] for t in ALL_TARGETS}
    if isinstance(value, str) and value.strip()[:1] in "{[(":
        try:
            value = list(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError):
            raise ConfigError(f"{source}: target_modules {value!r} is not a list or set") from None
    if value == "all-linear":
        return ALL_TARGETS
    covered: dict[str, int] = {t: 0 for t in ALL_TARGETS}
    if isinstance(value, str):       # PEFT: a string is a regex full-matched against module names
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise ConfigError(f"{source}: target_modules regex {value!r} is invalid ({e})") from None
        for t, mods in names.items():
            covered[t] = sum(bool(pattern.fullmatch(m)) for m in mods)
        if not any(covered.values()):
            raise ConfigError(f"{source}: target_modules regex {value!r} matches no Llama projection "
                              f"(valid: {', '.join(ALL_TARGETS)})")
    elif isinstance(value, (list, tuple)) and value:
        for entry in value:
            if not isinstance(entry, str):
                raise ConfigError(f"{source}: target_modules entry {entry!r} is not a string")
            hit = False
            for t, mods in names.items():
                n = sum(m == entry or m.endswith("." + entry) for m in mods)
                covered[t] += n
                hit = hit or n > 0
            if not hit:
                raise ConfigError(f"{source}: LoRA target module {entry!r} does not exist in a Llama layer "
                                  f"(valid: {', '.join(ALL_TARGETS)})")
    else:
        raise ConfigError(f"{source}: target_modules must be a non-empty list of module names, got {value!r}")
    partial = [t for t, n in covered.items() if 0 < n < num_layers]
    if partial:
        raise ConfigError(f"{source}: target_modules cover {partial[0]} in only some layers; btx_jax needs a "
                          "LoRA target in every layer")
    return tuple(t for t in ALL_TARGETS if covered[t])


def _per_target(pattern: dict, targets, num_layers: int, what: str, source: str) -> tuple:
    """PEFT rank_pattern / alpha_pattern -> ((target, value), ...); refuses values that differ by layer."""
    if not pattern:
        return ()
    if not isinstance(pattern, dict):
        raise ConfigError(f"{source}: {what} must be a dict, got {pattern!r}")
    out = []
    for t in targets:
        values = set()
        for i in range(num_layers):
            key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module_name(t, i))), None)
            values.add(None if key is None else pattern[key])
        if len(values) > 1:
            raise ConfigError(f"{source}: {what} gives {t} different values in different layers "
                              f"({sorted(map(str, values))}); btx_jax needs one value per projection")
        value = values.pop()
        if value is not None:
            out.append((t, value))
    return tuple(out)


def parse_adapter_config(raw: dict, num_layers: int, source: str) -> tuple[ExpertSpec, tuple[str, ...], float]:
    """(ExpertSpec, targets, lora_dropout) of a PEFT LoRA adapter_config dict, or ConfigError (one line)."""
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ConfigError(f"{source}: peft_type {peft_type!r} is not LORA")
    for key, allowed, why in _REFUSED:
        if raw.get(key) not in allowed:
            raise ConfigError(f"{source}: {why} (found {key}={raw.get(key)!r})")
    try:
        rank, alpha = int(raw["r"]), float(raw.get("lora_alpha", 8))
        dropout = float(raw.get("lora_dropout") or 0.0)
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value ({e})") from None
    if rank <= 0:
        raise ConfigError(f"{source}: r={rank} must be positive")
    targets = _parse_targets(raw.get("target_modules"), num_layers, source)
    ranks = tuple((t, int(v)) for t, v in _per_target(raw.get("rank_pattern"), targets, num_layers,
                                                       "rank_pattern", source) if int(v) != rank)
    alphas = tuple((t, float(v)) for t, v in _per_target(raw.get("alpha_pattern"), targets, num_layers,
                                                         "alpha_pattern", source) if float(v) != alpha)
    expert = ExpertSpec(rank=rank, alpha=alpha, rslora=bool(raw.get("use_rslora", False)),
                        rank_pattern=ranks, alpha_pattern=alphas)
    return expert, targets, dropout


def lora_config(base: LlamaConfig, expert: ExpertSpec, targets, dropout: float = 0.0,
                init: str = "kaiming") -> LlamaConfig:
    """`base` with a plain single-expert LoRA adapter (validates the targets)."""
    return base.replace(adapter=AdapterSpec(targets=tuple(targets), experts=(expert,), dropout=dropout,
                                            router=False, init=init))


def load_adapter(directory: str | Path, base: LlamaConfig, *, allow_pickle: bool = False
                 ) -> tuple[LlamaConfig, dict]:
    """(base config + the adapter's LoRA spec, {lora path: lazy leaf}) of a PEFT adapter directory or a btx_jax
    LoRA checkpoint, checked against `base`'s shapes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: adapter directory not found")
    if btx.is_btx(directory):
        return _load_btx_adapter(directory, base)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    source = str(directory / ADAPTER_CONFIG)
    raw = read_json(directory / ADAPTER_CONFIG)
    expert, targets, dropout = parse_adapter_config(raw, base.num_layers, source)
    init = "gaussian" if str(raw.get("init_lora_weights")).lower() == "gaussian" else "kaiming"
    config = lora_config(base, expert, targets, dropout, init)
    reader = TensorReader(directory, prefix=ADAPTER_WEIGHTS, allow_pickle=allow_pickle)
    used: set[str] = set()

    def key_of(path, key):
        used.add(PREFIX + key)
        return PREFIX + key

    flat = load_leaves(reader, config, lambda p: bool(LORA_LEAF.fullmatch(p)), key_of=key_of)
    extra = sorted(set(reader.keys()) - used)
    if extra:
        raise CheckpointError(f"{directory}: tensor {extra[0]!r} is not a LoRA weight of the targets "
                              f"{list(targets)} in {ADAPTER_CONFIG}")
    return config, flat


def _load_btx_adapter(directory: Path, base: LlamaConfig) -> tuple[LlamaConfig, dict]:
    config, _ = btx.read_config(directory)
    spec = config.adapter
    if spec is None or spec.router or len(spec.experts) != 1:
        raise ConfigError(f"{directory}: btx checkpoint is not a single-expert LoRA model "
                          f"({'no adapter' if spec is None else f'{len(spec.experts)} experts, router={spec.router}'})")
    if spec.router_layers is not None:
        raise ConfigError(f"{directory}: LoRA on a subset of layers (router_layers) cannot be used as an expert")
    check_same_base(config, base, str(directory))
    shapes = {k: v for k, v in btx.stored_shapes(directory).items() if LORA_LEAF.fullmatch(k)}
    return base.replace(adapter=spec), {k: _stored_leaf(directory, k, v) for k, v in shapes.items()}


def _stored_leaf(directory: Path, path: str, sds) -> LazyLeaf:
    """A LoRA leaf of a btx checkpoint, restored whole to the host when sliced: once per placement on a mesh
    (`lazy.reading`), and not kept afterwards (a source held for a whole run holds no host copy)."""
    full = lambda: btx.restore(directory, {path: sds})[path]  # noqa: E731
    return LazyLeaf(sds.shape, sds.dtype, lambda index: lazy.read_once((directory, path), full)[index])


def check_same_base(config: LlamaConfig, base: LlamaConfig, source: str) -> None:
    """ConfigError naming the first architecture field where `config` (adapter ignored) differs from `base`."""
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
        a, b = getattr(config, field), getattr(base, field)
        if a != b:
            raise ConfigError(f"{source}: {field}={a} does not match the base model's {field}={b}")


def concat_experts(loras: list[dict], routed) -> dict[str, LazyLeaf]:
    """LoRA-MoE leaves from single-expert LoRA leaves: A and B concatenated along the rank axis (expert e's
    columns follow expert e-1's), zeroed in unrouted layers (`routed`: per-layer 0/1 flags)."""
    flags = np.asarray(routed, np.float32)
    out = {}
    for path in loras[0]:
        axis = 2 if path.endswith("lora_a") else 1
        out[path] = lazy.concat([lora[path] for lora in loras], axis=axis).map(
            lambda idx, a: a * flags[idx[0]].reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype))
    return out


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_config_dict(spec: AdapterSpec) -> dict:
    """PEFT LoraConfig dict of a plain-LoRA AdapterSpec."""
    e = spec.experts[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": e.rank, "lora_alpha": _number(e.alpha), "use_rslora": e.rslora,
        "target_modules": list(spec.targets), "lora_dropout": spec.dropout,
        "rank_pattern": dict(e.rank_pattern), "alpha_pattern": {k: _number(v) for k, v in e.alpha_pattern},
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "use_dora": False, "inference_mode": True,
        "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
    }


def check_savable(config: LlamaConfig) -> None:
    """CheckpointError unless the model's adapter can be written as one PEFT adapter (before anything is read)."""
    spec = config.adapter
    if spec is None:
        raise CheckpointError("this model has no LoRA adapter to save in the PEFT format (use format='hf')")
    if spec.router or len(spec.experts) != 1:
        raise CheckpointError(f"a LoRA-MoE ({len(spec.experts)} experts + router) cannot be written as one PEFT "
                              "adapter: use format='mergoo' (or 'btx')")
    if spec.router_layers is not None:
        raise CheckpointError("LoRA on a subset of layers (router_layers) cannot be written as a PEFT adapter "
                              "(btx_jax does not write layers_to_transform): use format='btx'")


def save(directory: Path, config: LlamaConfig, flat: dict[str, np.ndarray]) -> None:
    """Write the plain LoRA adapter of (`config`, {path: array}) as a PEFT adapter directory."""
    check_savable(config)
    spec = config.adapter
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(spec), indent=2))
    write_tensors(directory, export_tensors(flat, config, lambda p: bool(LORA_LEAF.fullmatch(p)),
                                            key_of=lambda path, key: PREFIX + key),
                  prefix=ADAPTER_WEIGHTS)


def check_mergeable(config: LlamaConfig) -> None:
    """CheckpointError unless the model's adapter folds linearly into the base kernels (a plain LoRA)."""
    if config.adapter is not None and config.adapter.router:
        raise CheckpointError("cannot merge a LoRA-MoE into the base weights: the router's top-k mixture depends "
                              "on each token, so it is not a linear fold (save with format='mergoo' or 'btx')")


def merged_kernels(flat: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray | LazyLeaf]:
    """Base leaves with a plain LoRA folded in: kernel + routed(layer) * A diag(s) B; LoRA leaves dropped.  A
    folded kernel is a `LazyLeaf` computed one layer slice at a time as it is read (an export writes it layer by
    layer), so only one layer's fp32 temporaries and no second copy of the kernels are ever held."""
    spec = config.adapter
    if spec is None:
        return dict(flat)
    check_mergeable(config)
    routed = routed_layers(config)
    out = {k: v for k, v in flat.items() if not LORA_LEAF.fullmatch(k)}
    for target in spec.targets:
        prefix = f"layers/{param_paths.BLOCK_OF[_BLOCK[target]]}/{target}"
        kernel, a, b = (flat[f"{prefix}/{name}"] for name in ("kernel", "lora_a", "lora_b"))
        scale_R = expert_columns(spec, target)[1]

        def read(index, kernel=kernel, a=a, b=b, scale_R=scale_R):
            layers = index[0]
            whole = folded(np.asarray(kernel[layers]), np.asarray(a[layers]), np.asarray(b[layers]), scale_R,
                           routed[layers])
            return whole[(slice(None), *index[1:])]
        out[f"{prefix}/kernel"] = LazyLeaf(kernel.shape, kernel.dtype, read)
    return out


def folded(kernel, a, b, scale_R, routed, xp=np):
    """One kernel with its plain LoRA folded in, computed in fp32, in kernel's dtype: kernel + routed(layer) *
    A diag(s) B.  `xp`: the array module (numpy; jax.numpy inside a jit, for sharded leaves)."""
    a = a.astype(xp.float32) * (routed[:, None, None] * scale_R).astype(xp.float32)
    delta = xp.matmul(a, b.astype(xp.float32))     # one [in, r] @ [r, out] matmul per layer (BLAS on the host)
    return (kernel.astype(xp.float32) + delta).astype(kernel.dtype)
