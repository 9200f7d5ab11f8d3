"""btx-jax: Branch-Train-MiX post-training of Llama models with LoRA experts, in JAX/Flax."""
from btx_jax.config import AdapterSpec, ConfigError, ExpertSpec, LlamaConfig
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.pretrained import Pretrained, load_pretrained

__all__ = ["AdapterSpec", "CheckpointError", "ConfigError", "ExpertSpec", "LlamaConfig", "Pretrained",
           "load_pretrained"]
