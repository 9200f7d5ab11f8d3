"""Shared test fixtures: tiny random Hugging Face Llama checkpoints built with transformers (no hub access).

    build_hf_llama(path, seed=0, **config_kwargs) -> Path     # writes config.json + model.safetensors
    hf_model(path) -> transformers LlamaForCausalLM (eval, fp32)
    hf_logits(model_or_path, ids) -> np.ndarray [B, T, V] fp32
    hf_llama (fixture): factory(**config_kwargs) -> Path, cached per kwargs for the whole session
                        (treat the directory as read-only; copy it before corrupting it)

Weights are re-drawn after transformers' init with a larger std and non-unit norm scales, so a wrong
mapping (swapped norms, a missing transpose, a wrong rope layout) shows up as a large logit difference.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# 8 virtual CPU devices for the mesh tests (must be set before JAX starts its backend).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# CPU only, also where libtpu is installed (the `tpu` extra): JAX would otherwise probe for TPU hardware first;
# TPU code is compiled for topology descriptions (btx_jax/train/aot.py), never run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough to build, load and compile in well under a second; GQA and head_dim != hidden/heads by default.
TINY_LLAMA = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_config_kwargs(**overrides) -> dict:
    """TINY_LLAMA with `overrides` applied (values of None delete the key)."""
    kw = {**TINY_LLAMA, **overrides}
    return {k: v for k, v in kw.items() if v is not None}


def _hf_config(**config_kwargs):
    import transformers
    kw = dict(config_kwargs)
    rope_theta = kw.pop("rope_theta", None)
    scaling = kw.pop("rope_scaling", None)
    if "rope_parameters" not in kw and (rope_theta is not None or scaling is not None):
        kw["rope_parameters"] = {"rope_type": "default", **(scaling or {}),
                                 "rope_theta": 10000.0 if rope_theta is None else rope_theta}
    return transformers.LlamaConfig(**kw)


def build_hf_llama(path, seed: int = 0, torch_dtype=None, weight_std: float = 0.15, **config_kwargs) -> Path:
    """Write a random tiny LlamaForCausalLM to `path` with transformers' save_pretrained.

    `config_kwargs` override TINY_LLAMA (transformers.LlamaConfig names; `rope_theta` / `rope_scaling`
    are accepted and turned into `rope_parameters`).  `torch_dtype` (e.g. torch.bfloat16) casts before saving."""
    import torch
    import transformers
    config = _hf_config(**tiny_config_kwargs(**config_kwargs))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=gen))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    path = Path(path)
    model.save_pretrained(path)
    return path


def hf_model(path):
    import torch
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model_or_path, ids) -> np.ndarray:
    import torch
    model = hf_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    return out.logits.float().numpy()


def random_ids(batch: int, seq: int, vocab: int = TINY_LLAMA["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq)).astype(np.int32)


def safetensors_dict(directory) -> dict[str, np.ndarray]:
    """Every tensor of a directory's *.safetensors files (single or sharded), by name."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_config(directory, config: dict) -> None:
    Path(directory, "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """factory(**config_kwargs) -> Path of a cached tiny HF Llama checkpoint (read-only: copy before editing)."""
    cache: dict[str, Path] = {}

    def make(seed: int = 0, **config_kwargs) -> Path:
        key = json.dumps({"seed": seed, **config_kwargs}, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = build_hf_llama(tmp_path_factory.mktemp("hf_llama"), seed=seed, **config_kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def convert_script():
    """The conversion CLI's entry point module (btx_jax/cli/convert.py: `main(argv) -> exit code`)."""
    from btx_jax.cli import convert
    return convert


needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="a real tmpfs needs root")


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A real tmpfs of `size` (e.g. "64k", "3m") mounted at `where` inside the block (tests marked `needs_mount`);
    skips the test where mounting is not permitted."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode:
        pytest.skip("mount not permitted here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)])


@pytest.fixture
def python_sigint():
    """SIGINT as Python installs it (KeyboardInterrupt) for the test: a process started in the background by a
    non-interactive shell (nohup, `&`) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
