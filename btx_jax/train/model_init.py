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

from btx_jax import schema
from btx_jax.mix.compose import compose_source, make_spec
from btx_jax.config import AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.pretrained import ModelSource, open_model, random_source


def lora_spec(lora: schema.Lora | dict) -> AdapterSpec:
    """The plain-LoRA AdapterSpec of `model.lora` (a schema.Lora, or its dict: checked like the config's)."""
    lora = lora if isinstance(lora, schema.Lora) else schema.parse_lora(lora)
    return AdapterSpec(targets=tuple(lora.targets), experts=(ExpertSpec(rank=lora.rank, alpha=lora.alpha,
                                                                        rslora=lora.rslora),),
                       dropout=lora.dropout, init=lora.init)


def with_fresh_lora(src: ModelSource, spec: AdapterSpec, seed: int) -> ModelSource:
    """`src` plus newly initialised LoRA leaves (A kaiming/gaussian, B zero): logits unchanged."""
    if src.config.adapter is not None:
        raise ConfigError("model.lora: the starting model already has adapters")
    return src.with_fresh(src.config.replace(adapter=spec), seed)


def initial_source(model_cfg, seed: int) -> ModelSource:
    """The starting model of config section `model_cfg`: a schema.Model, or its dict or ConfigDict (checked like
    the config's)."""
    m = model_cfg if isinstance(model_cfg, schema.Model) else schema.parse({"model": model_cfg}).model
    if m.compose:
        options = {"router_seed": seed, **m.compose}
        mode, experts = options.pop("mode", "lora"), options.pop("experts", None)
        if not experts:
            raise ConfigError("model.compose.experts: needs at least one expert directory")
        return compose_source(m.init, list(experts), make_spec(mode, options, lambda k: f"model.compose.{k}"))
    if m.init == "random":
        if not m.arch:
            raise ConfigError("model.init='random' needs model.arch (LlamaConfig fields)")
        src = random_source(LlamaConfig(**m.arch), seed)
    else:
        src = open_model(m.init)
    if m.lora is not None:
        src = with_fresh_lora(src, lora_spec(m.lora), seed)
    return src
