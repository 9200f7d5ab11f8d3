"""`load_pretrained` / `Pretrained`: the public face of a model (config + params) and its formats.

Formats: `hf` (config.json + safetensors), `btx` (btx_config.json + an orbax checkpoint of the params),
`peft` (adapter_config.json + adapter_model.safetensors, LoRA only), `mergoo` (LoRA-MoE config.json +
safetensors), `mixtral` (an FFN-MoE as Hugging Face MixtralForCausalLM).  Loading detects the format from the
directory's files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax import param_paths
from btx_jax.checkpoint import hf as hf_format
from btx_jax.checkpoint.tensor_files import CheckpointError, atomic_directory, read_json, write_tensors
from btx_jax.config import LlamaConfig, config_from_dict, config_to_dict
from btx_jax.generate import generate as _generate
from btx_jax.model import Llama
from btx_jax.model.attention import DEFAULT_BLOCK, DEFAULT_IMPL

BTX_CONFIG = "btx_config.json"
FORMATS = ("hf", "btx", "peft", "mergoo", "mixtral")


@dataclasses.dataclass
class Pretrained:
    """A Llama (optionally with LoRA / LoRA-MoE) ready for inference, export or training."""
    config: LlamaConfig
    params: dict
    dtype: jnp.dtype = jnp.float32          # compute dtype

    def model(self, deterministic: bool = True, remat: str = "none", dtype=None, attention: str = DEFAULT_IMPL,
              attention_block: int = DEFAULT_BLOCK) -> Llama:
        """The Flax module (compute dtype `dtype`, default this model's; attention: btx_jax/model/attention.py)."""
        param_dtype = jax.tree_util.tree_leaves(self.params)[0].dtype
        return Llama(self.config, dtype=jnp.dtype(dtype or self.dtype), param_dtype=param_dtype, remat=remat,
                     deterministic=deterministic, attention=attention, attention_block=attention_block)

    def logits(self, input_ids) -> np.ndarray:
        """fp32 logits [batch, seq, vocab] for int token ids [batch, seq]."""
        ids = jnp.asarray(np.asarray(input_ids, dtype=np.int32))
        return np.asarray(_logits(self.model(), self.params, ids), dtype=np.float32)

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> np.ndarray:
        """Prompt + `max_new_tokens` generated tokens, [batch, seq + max_new_tokens] (KV-cached).

        Prompts are padded to a multiple of 32 tokens internally, so calls with nearby lengths reuse one
        compilation."""
        ids = np.asarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        if max_new_tokens <= 0:
            return ids
        T = ids.shape[1]
        padded = np.zeros((ids.shape[0], -(-T // 32) * 32), np.int32)
        padded[:, :T] = ids
        new = _generate(self.model(), self.params, jnp.asarray(padded), jnp.int32(T), jax.random.PRNGKey(seed),
                        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        return np.concatenate([ids, np.asarray(new)], axis=1)

    def flat_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in param_paths.flatten(self.params).items()}

    def save_pretrained(self, dst: str | Path, format: str = "hf", *, merge_lora: bool = False,
                        overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                        progress: Callable[[int], None] | None = None) -> Path:
        """Write the model as `format` into `dst` (atomically: nothing is left at dst on error).
        `progress(nbytes)` is called per tensor written (format 'hf')."""
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
        dst = Path(dst)
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            if format == "btx":
                save_btx(tmp, self)
            elif format == "hf":
                save_hf(tmp, self, merge_lora=merge_lora, max_shard_bytes=max_shard_bytes, progress=progress)
            elif format == "mixtral":
                from btx_jax.checkpoint import mixtral
                mixtral.save(tmp, self.config, self.flat_numpy(), max_shard_bytes=max_shard_bytes, progress=progress)
            elif format == "peft":
                from btx_jax.checkpoint import peft
                peft.save(tmp, self)
            else:
                from btx_jax.checkpoint import mergoo
                mergoo.save(tmp, self, max_shard_bytes=max_shard_bytes)
        return dst


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Llama, params, ids_BT):
    return model.apply({"params": params}, ids_BT)


def save_hf(directory: Path, pre: Pretrained, *, merge_lora: bool = False,
            max_shard_bytes: int = 5 * 2**30, progress: Callable[[int], None] | None = None) -> None:
    flat = pre.flat_numpy()
    config = pre.config
    if config.moe is not None:
        raise CheckpointError("this model is an FFN-MoE: save it with format='mixtral' (or 'btx')")
    if config.adapter is not None:
        if not merge_lora:
            raise CheckpointError("this model has LoRA adapters: save with merge_lora=True (fold them into the "
                                  "base weights), format='peft' (adapter only) or format='mergoo' (LoRA-MoE)")
        from btx_jax.checkpoint.peft import merged_kernels
        flat = merged_kernels(flat, config)
        config = config.replace(adapter=None)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    write_tensors(directory, hf_format.export_tensors(flat, config, lambda p: True),
                  max_shard_bytes=max_shard_bytes, progress=progress)


def save_btx(directory: Path, pre: Pretrained) -> None:
    import orbax.checkpoint as ocp
    if jax.process_index() == 0:
        (directory / BTX_CONFIG).write_text(json.dumps(config_to_dict(pre.config), indent=2))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((directory / "params").absolute(), pre.params)


def load_btx(directory: Path, dtype=None) -> Pretrained:
    import orbax.checkpoint as ocp
    config = config_from_dict(read_json(directory / BTX_CONFIG))
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory / 'params'}: orbax checkpoint directory not found")
    path = (directory / "params").absolute()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        # Restore onto one device whatever mesh wrote it (a training run shards over many).
        saved = ckpt.metadata(path).item_metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        params = ckpt.restore(path, target)
    return _finish(config, param_paths.flatten(params), dtype)


def _finish(config: LlamaConfig, flat: dict[str, np.ndarray], dtype) -> Pretrained:
    """Pretrained from {path: array}: params in `dtype` (default fp32), compute in the same dtype."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
    # pop as we go: the host copy of each tensor is released once it is on the device (one full copy at a time)
    params = param_paths.unflatten({k: jnp.asarray(flat.pop(k), dtype) for k in list(flat)})
    return Pretrained(config, params, dtype)


def detect_format(directory: Path) -> str:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    if (directory / BTX_CONFIG).is_file():
        return "btx"
    if (directory / "adapter_config.json").is_file():
        return "peft"
    if (directory / "config.json").is_file():
        raw = read_json(directory / "config.json")
        return "mergoo" if "adapter_configs" in raw else "mixtral" if raw.get("model_type") == "mixtral" else "hf"
    raise CheckpointError(f"{directory}: no config.json, btx_config.json or adapter_config.json found")


def load_pretrained(path: str | Path, *, dtype=None, adapter: str | Path | None = None,
                    allow_pickle: bool = False, progress: Callable[[int], None] | None = None) -> Pretrained:
    """Load an HF Llama or Mixtral directory, a mergoo LoRA-MoE directory or a btx_jax checkpoint.

    `adapter`: a PEFT LoRA directory (or btx LoRA checkpoint) applied on top of an HF base.
    `dtype`: parameter and compute dtype (default: fp32 params, fp32 compute)."""
    directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "peft":
        raise CheckpointError(f"{directory}: is a PEFT adapter; pass the base model as path and this "
                              "directory as adapter=")
    if fmt == "btx":
        pre = load_btx(directory, dtype)
    elif fmt == "mixtral":
        from btx_jax.checkpoint import mixtral
        pre = _finish(*mixtral.load(directory, allow_pickle=allow_pickle, progress=progress), dtype)
    elif fmt == "mergoo":
        from btx_jax.checkpoint import mergoo
        config, flat = mergoo.load(directory, dtype=None, allow_pickle=allow_pickle)
        pre = _finish(config, flat, dtype)
    else:
        config, _ = hf_format.read_config(directory)
        pre = _finish(config, hf_format.load_base(directory, config, allow_pickle=allow_pickle,
                                                  progress=progress), dtype)
    if adapter is not None:
        from btx_jax.checkpoint import peft
        pre = peft.attach(pre, Path(adapter))
    return pre
