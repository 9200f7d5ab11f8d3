"""btx-jax: Branch-Train-MiX post-training of Llama models with LoRA experts, in JAX/Flax."""
from btx_jax import mesh
from btx_jax.config import AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.pretrained import Pretrained, load_pretrained
from btx_jax.counting import count_params
from btx_jax.mix.compose_ffn import FfnMoESpec
from btx_jax.mix.compose import LoraMoESpec, compose

__all__ = ["AdapterSpec", "CheckpointError", "ConfigError", "ExpertSpec", "FfnMoESpec", "LlamaConfig",
           "LoraMoESpec", "Pretrained", "compose", "count_params", "load_pretrained", "mesh"]
