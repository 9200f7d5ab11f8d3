"""The model a training run starts from, described by `config.model`:

    init      "random" (pretraining a seed model from `arch`) or a directory: HF Llama, mergoo LoRA-MoE,
              or a btx_jax checkpoint (e.g. the previous phase's `final/`)
    arch      LlamaConfig fields for init="random"
    lora      fresh LoRA expert to add (phase 1): targets, rank, alpha, rslora, dropout, init
    compose   MoE composition (phase 2): experts (dirs), mode ("lora": LoRA-MoE | "ffn": FFN-MoE), top_k,
              seed_expert, router_init, router_layers
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from btx_jax import param_paths
from btx_jax.config import AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.model import init_params
from btx_jax.pretrained import Pretrained, load_pretrained


def _plain(d) -> dict:
    return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def lora_spec(lora) -> AdapterSpec:
    lora = _plain(lora)
    return AdapterSpec(targets=tuple(lora.get("targets", ("gate_proj", "up_proj", "down_proj"))),
                       experts=(ExpertSpec(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                           rslora=bool(lora.get("rslora", False))),),
                       dropout=float(lora.get("dropout", 0.0)), init=lora.get("init", "kaiming"))


def with_fresh_lora(pre: Pretrained, spec: AdapterSpec, seed: int) -> Pretrained:
    """`pre` plus newly initialised LoRA leaves (A kaiming/gaussian, B zero): logits unchanged."""
    if pre.config.adapter is not None:
        raise ConfigError("model.lora: the starting model already has adapters")
    config = pre.config.replace(adapter=spec)
    fresh = param_paths.flatten(init_params(config, jax.random.PRNGKey(seed)))
    flat = param_paths.flatten(pre.params)
    flat.update({k: v for k, v in fresh.items() if k not in flat})
    return Pretrained(config, param_paths.unflatten(flat), pre.dtype)


def initial_model(model_cfg, seed: int) -> Pretrained:
    m = _plain(model_cfg)
    if m.get("compose"):
        from btx_jax.compose import compose
        c = _plain(m["compose"])
        return compose(m["init"], list(c["experts"]), mode=c.get("mode", "lora"), top_k=int(c.get("top_k", 2)),
                       seed_expert=bool(c.get("seed_expert", False)),
                       router_init=c.get("router_init", "normal"),
                       router_layers=c.get("router_layers"), seed=seed)
    if m.get("init", "random") == "random":
        if not m.get("arch"):
            raise ConfigError("model.init='random' needs model.arch (LlamaConfig fields)")
        config = LlamaConfig(**_plain(m["arch"]))
        pre = Pretrained(config, init_params(config, jax.random.PRNGKey(seed)), jnp.float32)
    else:
        pre = load_pretrained(m["init"])
    if m.get("lora"):
        pre = with_fresh_lora(pre, lora_spec(m["lora"]), seed)
    return pre
