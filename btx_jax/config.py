"""Model configuration: Llama architecture plus the optional LoRA / LoRA-MoE adapter spec or FFN-MoE spec.

`LlamaConfig.from_hf(dict)` reads a Hugging Face `config.json` (Llama 2, Llama 3.x, and transformers 5's
`rope_parameters` layout); `to_hf()` writes one back.  `AdapterSpec` describes the LoRA experts on the
linears (one expert = plain LoRA; several experts + router = mergoo-style LoRA-MoE).  `MoESpec` describes a
mixture of full FFN experts per layer (Branch-Train-MiX as in the paper; the Mixtral architecture).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from btx_jax.errors import UserError

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


DTYPES = ("float32", "bfloat16", "float16")     # parameter / compute dtypes a config or command may name
# Choice lists the config schema (btx_jax/schema.py) names; the code that implements them imports them from here.
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch")         # btx_jax/model/llama.py REMAT_POLICIES
ATTENTION_IMPLS = ("auto", "blocked", "xla", "splash", "triton", "cudnn")   # btx_jax/model/attention.py
LOSS_LAYOUTS = ("auto", "batch", "vocab")                         # btx_jax/train/step.py resolve_layout
MESH_AXES = ("data", "fsdp", "tensor", "expert")                  # btx_jax/mesh.py


class ConfigError(UserError, ValueError):
    """A configuration (config.json, adapter_config.json, btx config) that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """One LoRA expert. `rank_pattern`/`alpha_pattern` override rank/alpha per target (PEFT semantics)."""
    rank: int
    alpha: float
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def rank_for(self, target: str) -> int:
        return dict(self.rank_pattern).get(target, self.rank)

    def scale_for(self, target: str) -> float:
        r, a = self.rank_for(target), dict(self.alpha_pattern).get(target, self.alpha)
        return a / math.sqrt(r) if self.rslora else a / r


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """LoRA experts on `targets`. With `router=False` there must be exactly one expert (plain LoRA);
    with `router=True` every target linear gets a router on its own input width (mergoo LoRA-MoE)."""
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    experts: tuple[ExpertSpec, ...] = (ExpertSpec(rank=8, alpha=16.0),)
    dropout: float = 0.0
    router: bool = False
    top_k: int = 2
    seed_expert: bool = False          # a LoRA-free expert the router may pick (BTX keeps the seed FFN)
    router_jitter: float = 0.0         # multiplicative input jitter during training (Switch)
    router_layers: tuple[int, ...] | None = None   # mergoo's router_layers_index; None = every layer
    init: str = "kaiming"              # LoRA A init: "kaiming" (PEFT default) or "gaussian"

    @property
    def num_choices(self) -> int:
        """Router outputs: one per LoRA expert, plus the seed expert when enabled."""
        return len(self.experts) + int(self.seed_expert)

    def validate(self, num_layers: int) -> None:
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad:
            raise ConfigError(f"LoRA target module {bad[0]!r} does not exist in a Llama layer "
                              f"(valid: {', '.join(ALL_TARGETS)})")
        if not self.experts:
            raise ConfigError("adapter spec has no experts")
        if not self.router and len(self.experts) != 1:
            raise ConfigError(f"{len(self.experts)} LoRA experts need a router (router=True)")
        if self.router and not 1 <= self.top_k <= self.num_choices:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and the number of experts "
                              f"({self.num_choices})")
        if self.router_layers is not None and any(not 0 <= i < num_layers for i in self.router_layers):
            raise ConfigError(f"router_layers {list(self.router_layers)} out of range for {num_layers} layers")

    def ranks(self, target: str) -> tuple[int, ...]:
        return tuple(e.rank_for(target) for e in self.experts)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Every layer's FFN is a mixture of `num_experts` SwiGLU FFNs (each of the model's intermediate_size) with a
    router on the hidden state; each token runs its `top_k` experts (Mixtral semantics, btx_jax/model/moe_ffn.py).
    `seed_expert`: the last expert is the seed model's own FFN (informational: set by composing with FfnMoESpec).
    `impl`: "auto" (ragged_dot on TPU; sort-and-segment tiles on CPU and GPU, whose XLA expands ragged_dot densely;
    chosen for the platform of the mesh's devices), "ragged", "segment" or "dense" (every expert on every token,
    masked: the reference)."""
    num_experts: int
    top_k: int = 2
    seed_expert: bool = False
    router_jitter: float = 0.0
    impl: str = "auto"

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"FFN-MoE needs at least one expert (num_experts={self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and the number of experts ({self.num_experts})")
        if self.impl not in MOE_IMPLS:
            raise ConfigError(f"FFN-MoE impl {self.impl!r} is not one of {', '.join(MOE_IMPLS)}")


MOE_IMPLS = ("auto", "ragged", "segment", "dense")


def _arch(doc: str, default=dataclasses.MISSING):
    """A LlamaConfig field with its one-line doc."""
    return dataclasses.field(default=default, metadata={"doc": doc})


# LlamaConfig's integer sizes and the Hugging Face config.json keys they come from.
HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
           "max_position_embeddings": "max_position_embeddings"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama architecture (config.json's fields; `doc` of each field: the configuration reference's
    `model.arch` table), plus the LoRA adapter or the FFN-MoE on it."""
    vocab_size: int = _arch("tokens in the vocabulary (embedding and lm_head rows)")
    hidden_size: int = _arch("model width")
    intermediate_size: int = _arch("FFN width (gate/up_proj outputs)")
    num_layers: int = _arch("decoder layers (HF num_hidden_layers)")
    num_heads: int = _arch("query heads (HF num_attention_heads)")
    num_kv_heads: int = _arch("key/value heads, a divisor of num_heads (HF num_key_value_heads; GQA)")
    head_dim: int = _arch("width of one attention head (usually hidden_size / num_heads)")
    rms_norm_eps: float = _arch("RMSNorm epsilon", 1e-5)
    rope_theta: float = _arch("RoPE base frequency", 10000.0)
    rope_scaling: tuple[tuple[str, Any], ...] | None = _arch("RoPE scaling: HF rope_scaling's items (rope_type "
                                                             "llama3 or linear)", None)
    max_position_embeddings: int = _arch("longest sequence the model is used at", 4096)
    tie_word_embeddings: bool = _arch("lm_head shares the embedding matrix", False)
    bos_token_id: int | None = _arch("beginning-of-sequence token id", 1)
    eos_token_id: int | tuple[int, ...] | None = _arch("end-of-sequence token id(s)", 2)
    adapter: AdapterSpec | None = None
    moe: MoESpec | None = None

    def __post_init__(self):
        for field, key in HF_KEYS.items():      # before any arithmetic on them (a 0 would divide by zero)
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                name = key if key == field else f"{key} ({field})"
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for field in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{field}={value!r} must be a positive number")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.adapter is not None:
            self.adapter.validate(self.num_layers)
        if self.moe is not None:
            self.moe.validate()
            if self.adapter is not None:
                raise ConfigError("a model has either LoRA adapters or an FFN-MoE, not both")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def in_out(self, target: str) -> tuple[int, int]:
        """(input width, output width) of a target linear."""
        h, q, kv, m = (self.hidden_size, self.num_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim, self.intermediate_size)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}[target]

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type != "llama" or (archs and not any(a.startswith("Llama") for a in archs)):
            name = archs[0] if archs else model_type
            raise ConfigError(f"{source}: architecture {name!r} is not Llama (model_type={model_type!r}); "
                              "btx_jax only supports LlamaForCausalLM")
        for key, ok in (("attention_bias", (False,)), ("mlp_bias", (False,)), ("hidden_act", ("silu", "swish"))):
            if hf.get(key, ok[0]) not in ok:   # parameters / math this model does not have: refuse, not ignore
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (btx_jax's Llama has "
                                  f"{key}={ok[0]!r})")
        try:
            heads, hidden = _hf_int(hf, "num_attention_heads"), _hf_int(hf, "hidden_size")
            rope_theta, rope_scaling = _rope_from_hf(hf)
            return cls(
                vocab_size=_hf_int(hf, "vocab_size"), hidden_size=hidden,
                intermediate_size=_hf_int(hf, "intermediate_size"), num_layers=_hf_int(hf, "num_hidden_layers"),
                num_heads=heads, num_kv_heads=_hf_int(hf, "num_key_value_heads", heads),
                head_dim=_hf_int(hf, "head_dim", hidden // heads if heads > 0 else heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=_hf_int(hf, "max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=_hashable(hf.get("eos_token_id")))
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: bad value ({e})") from None

    def to_hf(self) -> dict:
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        return hf


def _hf_int(hf: dict, key: str, default: int | None = None) -> int:
    """config.json's integer `key` (`default` when it is missing or null; KeyError when there is no default)."""
    value = hf[key] if default is None else hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (isinstance(value, float)
                                                                              and not value.is_integer()):
        raise ConfigError(f"{key}={value!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not an integer") from None


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _rope_from_hf(hf: dict) -> tuple[float, tuple | None]:
    """rope_theta and rope_scaling from either the classic top-level keys (Llama 2 / 3.x hub configs)
    or transformers 5's `rope_parameters` dict."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return theta, tuple(sorted((k, _hashable(v)) for k, v in scaling.items()))


def config_to_dict(config: LlamaConfig) -> dict:
    """JSON-able dict of a LlamaConfig (adapter included); inverse of `config_from_dict`."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> LlamaConfig:
    d = dict(d)
    moe = d.pop("moe", None)
    adapter = d.pop("adapter", None)
    if adapter is not None:
        adapter = dict(adapter)
        adapter["experts"] = tuple(
            ExpertSpec(**{**e, "rank_pattern": tuple(map(tuple, e.get("rank_pattern", ()))),
                          "alpha_pattern": tuple(map(tuple, e.get("alpha_pattern", ())))})
            for e in adapter["experts"])
        adapter["targets"] = tuple(adapter["targets"])
        if adapter.get("router_layers") is not None:
            adapter["router_layers"] = tuple(adapter["router_layers"])
        adapter = AdapterSpec(**adapter)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple((k, _hashable(v)) for k, v in d["rope_scaling"])
    d["eos_token_id"] = _hashable(d.get("eos_token_id"))
    try:
        return LlamaConfig(**d, adapter=adapter, moe=None if moe is None else MoESpec(**moe))
    except TypeError as e:
        raise ConfigError(f"btx config: {e}") from None
