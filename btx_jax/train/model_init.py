"""The model a training run starts from, described by `config.model`, as a `ModelSource` (nothing is read
until the trainer fills its sharded target):

    init      "random" (pretraining a seed model from `arch`) or a directory: HF Llama, mergoo LoRA-MoE,
              or a btx_jax checkpoint (e.g. the previous phase's `final/`)
    arch      LlamaConfig fields for init="random"
    lora      fresh LoRA expert to add (phase 1): targets, rank, alpha, rslora, dropout, init
    compose   MoE composition (phase 2): experts (dirs), mode ("lora": LoRA-MoE | "ffn": FFN-MoE) and the
              fields of that mode's spec (btx_jax/mix/compose.py LoraMoESpec / FfnMoESpec: top_k, seed_expert,
              router_init, ...; router_seed defaults to the run's seed); another key is an error
"""
from __future__ import annotations

from btx_jax.mix.compose import compose_source, make_spec
from btx_jax.config import AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.pretrained import ModelSource, open_model, random_source


def _plain(d) -> dict:
    return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def lora_spec(lora) -> AdapterSpec:
    lora = _plain(lora)
    return AdapterSpec(targets=tuple(lora.get("targets", ("gate_proj", "up_proj", "down_proj"))),
                       experts=(ExpertSpec(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                           rslora=bool(lora.get("rslora", False))),),
                       dropout=float(lora.get("dropout", 0.0)), init=lora.get("init", "kaiming"))


def with_fresh_lora(src: ModelSource, spec: AdapterSpec, seed: int) -> ModelSource:
    """`src` plus newly initialised LoRA leaves (A kaiming/gaussian, B zero): logits unchanged."""
    if src.config.adapter is not None:
        raise ConfigError("model.lora: the starting model already has adapters")
    return src.with_fresh(src.config.replace(adapter=spec), seed)


def initial_source(model_cfg, seed: int) -> ModelSource:
    m = _plain(model_cfg)
    if m.get("compose"):
        options = {"router_seed": seed, **_plain(m["compose"])}
        mode, experts = options.pop("mode", "lora"), options.pop("experts", None)
        if not experts:
            raise ConfigError("model.compose.experts: needs at least one expert directory")
        return compose_source(m["init"], list(experts), make_spec(mode, options, lambda k: f"model.compose.{k}"))
    if m.get("init", "random") == "random":
        if not m.get("arch"):
            raise ConfigError("model.init='random' needs model.arch (LlamaConfig fields)")
        src = random_source(LlamaConfig(**_plain(m["arch"])), seed)
    else:
        src = open_model(m["init"])
    if m.get("lora"):
        src = with_fresh_lora(src, lora_spec(m["lora"]), seed)
    return src
