"""The one parameter-path naming scheme.

Every parameter leaf has a path like `layers/mlp/down_proj/lora_a` (see btx_jax/model/llama.py).  This file
holds the single table that says, for each path, its logical axes (mapped to mesh axes by the sharding rules
in btx_jax/mesh.py) and its Hugging Face tensor name (used by the HF, PEFT and mergoo converters).
Phase masks (configs/) are regexes over the same paths.  `rule_for(path)` insists that exactly one rule
matches, and a test checks this for every leaf of every model variant.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import jax
from flax import traverse_util

# (input logical axis, output logical axis, HF block) of each projection.
PROJECTIONS = {
    "q_proj": ("embed", "q_heads", "self_attn"),
    "k_proj": ("embed", "kv_heads", "self_attn"),
    "v_proj": ("embed", "kv_heads", "self_attn"),
    "o_proj": ("q_heads", "embed", "self_attn"),
    "gate_proj": ("embed", "mlp", "mlp"),
    "up_proj": ("embed", "mlp", "mlp"),
    "down_proj": ("mlp", "embed", "mlp"),
}
BLOCK_OF = {"self_attn": "attn", "mlp": "mlp"}


@dataclasses.dataclass(frozen=True)
class ParamRule:
    pattern: str                  # full-match regex over the '/'-joined path
    axes: tuple[str, ...]         # logical axis names, one per dimension
    hf_key: str                   # HF tensor name; {i} = layer index; LoRA keys are PEFT's, router mergoo's
    transpose: bool               # HF stores [out, in]; btx_jax stores [in, out]


def _table() -> tuple[ParamRule, ...]:
    rules = [
        ParamRule("embed_tokens", ("vocab", "embed"), "model.embed_tokens.weight", False),
        ParamRule("lm_head", ("embed", "vocab"), "lm_head.weight", True),
        ParamRule("final_norm/scale", ("norm",), "model.norm.weight", False),
        ParamRule("layers/input_norm/scale", ("layers", "norm"), "model.layers.{i}.input_layernorm.weight", False),
        ParamRule("layers/post_norm/scale", ("layers", "norm"),
                  "model.layers.{i}.post_attention_layernorm.weight", False),
    ]
    for proj, (ax_in, ax_out, hf_block) in PROJECTIONS.items():
        path, hf = f"layers/{BLOCK_OF[hf_block]}/{proj}", f"model.layers.{{i}}.{hf_block}.{proj}"
        rules += [
            ParamRule(f"{path}/kernel", ("layers", ax_in, ax_out), f"{hf}.weight", True),
            ParamRule(f"{path}/lora_a", ("layers", ax_in, "lora_rank"), f"{hf}.lora_A.weight", True),
            ParamRule(f"{path}/lora_b", ("layers", "lora_rank", ax_out), f"{hf}.lora_B.weight", True),
            ParamRule(f"{path}/router", ("layers", ax_in, "experts"), f"{hf}.gate.weight", True),
        ]
    # FFN-MoE (btx_jax/model/moe_ffn.py): experts stacked on the `expert` axis; HF keys are Mixtral's ({e} = expert)
    moe = "model.layers.{i}.block_sparse_moe"
    rules += [
        ParamRule("layers/moe/router/kernel", ("layers", "embed", "experts"), f"{moe}.gate.weight", True),
        ParamRule("layers/moe/gate_proj", ("layers", "expert", "embed", "mlp"), f"{moe}.experts.{{e}}.w1.weight", True),
        ParamRule("layers/moe/up_proj", ("layers", "expert", "embed", "mlp"), f"{moe}.experts.{{e}}.w3.weight", True),
        ParamRule("layers/moe/down_proj", ("layers", "expert", "mlp", "embed"), f"{moe}.experts.{{e}}.w2.weight",
                  True),
    ]
    return tuple(rules)


PARAM_TABLE = _table()


def path_str(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def flatten(tree: Any) -> dict[str, Any]:
    """{path: leaf} for a params tree (nested dicts)."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def matches(path: str, patterns) -> bool:
    """Whether `path` full-matches any of the regexes `patterns` (the phase tables' semantics)."""
    return any(re.fullmatch(p, path) for p in patterns)


def matching_rules(path: str) -> list[ParamRule]:
    return [r for r in PARAM_TABLE if re.fullmatch(r.pattern, path)]


def rule_for(path: str) -> ParamRule:
    found = matching_rules(path)
    if len(found) != 1:
        raise KeyError(f"parameter {path!r} matches {len(found)} rules of PARAM_TABLE (expected exactly 1)")
    return found[0]


def logical_axes(tree: Any) -> Any:
    """Tree of logical-axis tuples with the structure of `tree`."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: rule_for(path_str(kp)).axes, tree)


def hf_keys(path: str, num_layers: int, num_experts: int = 0) -> Iterator[tuple[int | tuple | None, str]]:
    """(index into the leaf, HF key) for every HF tensor stored in btx_jax leaf `path`: None (the whole leaf),
    a layer index, or (layer, expert) for the FFN-MoE's stacked experts."""
    rule = rule_for(path)
    if "{i}" not in rule.hf_key:
        yield None, rule.hf_key
        return
    for i in range(num_layers):
        if "{e}" in rule.hf_key:
            for e in range(num_experts):
                yield (i, e), rule.hf_key.format(i=i, e=e)
        else:
            yield i, rule.hf_key.format(i=i)


def index_rank(index: int | tuple | None) -> int:
    """Leading dimensions of a leaf consumed by an `hf_keys` index."""
    return 0 if index is None else len(index) if isinstance(index, tuple) else 1
