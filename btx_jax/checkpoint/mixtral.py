"""Hugging Face Mixtral checkpoints (`MixtralForCausalLM`) <-> btx_jax FFN-MoE parameters.

A Mixtral is a Llama whose every FFN is a sparse mixture of SwiGLU experts: exactly what compose with FfnMoESpec
builds (btx_jax/mix/compose_ffn.py), so a Branch-Train-MiX model can be served by transformers, vLLM, ..., and an
existing Mixtral can be loaded to train its routers.  Per layer i and expert e the checkpoint holds

    model.layers.{i}.block_sparse_moe.gate.weight            [E, D]   the router
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  [M, D]   gate_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  [M, D]   up_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  [D, M]   down_proj

and Llama's attention, norm, embedding and lm_head tensors; the names come from btx_jax/param_paths.py like
every other format.  (transformers 5 fuses the experts in memory, gate_up_proj / down_proj, but reads and
writes this per-expert layout.)  config.json is Llama's plus `num_local_experts`, `num_experts_per_tok` and
`router_jitter_noise`; Mixtral's own defaults apply where a key is absent (rms_norm_eps 1e-5, rope_theta 1e6).

Routing: Mixtral takes softmax over all E router logits, keeps the top k and renormalises them; that equals
btx_jax's softmax over the k largest logits (both are exp(l_i) / sum_{j in top-k} exp(l_j)), the same rule as
the LoRA-MoE's routers.  Not representable in Mixtral: which expert was the seed's FFN (MoESpec.seed_expert;
the expert itself is written like the others).  Sliding-window attention is refused on load (btx_jax's
attention is full causal).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from btx_jax.checkpoint.hf import export_tensors, load_leaves
from btx_jax.checkpoint.tensor_files import CheckpointError, TensorReader, read_json, write_tensors
from btx_jax.config import ConfigError, LlamaConfig, MoESpec

_LLAMA_ONLY = ("attention_bias", "mlp_bias")


def config_from_hf(raw: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig with an FFN-MoE spec from a Mixtral config.json dict (ConfigError naming `source`)."""
    if raw.get("sliding_window") is not None:
        raise ConfigError(f"{source}: sliding_window={raw['sliding_window']} is not supported (btx_jax's "
                          "attention is full causal; Mixtral-8x7B has sliding_window null)")
    llama = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, **raw,
             "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if "rope_theta" not in raw and "rope_parameters" not in raw:
        llama["rope_theta"] = 1e6
    try:
        moe = MoESpec(num_experts=int(raw["num_local_experts"]), top_k=int(raw["num_experts_per_tok"]),
                      router_jitter=float(raw.get("router_jitter_noise") or 0.0))
        return LlamaConfig.from_hf(llama, source=source).replace(moe=moe)
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def config_to_hf(config: LlamaConfig) -> dict:
    """Mixtral config.json of an FFN-MoE LlamaConfig."""
    hf = {k: v for k, v in config.to_hf().items() if k not in _LLAMA_ONLY}
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=config.moe.num_experts,
              num_experts_per_tok=config.moe.top_k, router_jitter_noise=config.moe.router_jitter,
              sliding_window=None, output_router_logits=False)
    return hf


def load(directory: str | Path, dtype=None, allow_pickle: bool = False,
         progress: Callable[[int], None] | None = None) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(LlamaConfig with MoESpec, {path: array}) of a Mixtral directory; every tensor's name and shape checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    config = config_from_hf(read_json(directory / "config.json"), source=str(directory / "config.json"))
    reader = TensorReader(directory, allow_pickle=allow_pickle)
    return config, load_leaves(reader, config, lambda path: True, dtype=dtype, progress=progress)


def check_savable(config: LlamaConfig) -> None:
    """CheckpointError unless the model is an FFN-MoE (before anything is read)."""
    if config.moe is None:
        raise CheckpointError("the mixtral format holds an FFN-MoE model (compose(mode='ffn')); this model has a "
                              "dense FFN: use format='hf'")


def save(directory: Path, config: LlamaConfig, flat: dict[str, np.ndarray], max_shard_bytes: int = 5 * 2**30,
         progress: Callable[[int], None] | None = None) -> None:
    """Write an FFN-MoE model ({path: array}) as a Mixtral directory."""
    check_savable(config)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    write_tensors(directory, export_tensors(flat, config, lambda path: True), max_shard_bytes=max_shard_bytes,
                  progress=progress)
