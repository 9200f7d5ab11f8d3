"""Defaults shared by every phase config (read top to bottom; phase files override what differs).

Presets are comma-separated words after the config file: `configs/expert.py:wiki` is the seed recipe at
Llama-2-7B scale, `configs/expert.py:wiki,tiny` the same phase on a CPU-sized model with the bundled data.
"""
from __future__ import annotations

import ml_collections

# Architectures by name: the seed's Llama-2-7B and CPU-sized ones for the demo, tests and benchmarks.
ARCHS = {
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=1024,
                 tie_word_embeddings=False),
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                  num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "tinyllama_1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                         num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=4096),   # gpu_check
}
DEMO_DIR = "runs/demo"            # where the tiny presets read and write each phase's result
BUNDLED_TOKENIZER = "bundled:tokenizer/tokenizer.model"   # "bundled:" = btx_jax/data/corpora/ (installed)
SEED_LORA = dict(targets=("gate_proj", "up_proj", "down_proj"), rank=640, alpha=32.0, dropout=0.1)


SCALES = ("tiny", "synthetic")
VARIANTS = ("ffn",)                # full-FFN experts / FFN-MoE instead of LoRA (the BTX paper's variant)


def parse_preset(preset: str, choices: tuple[str, ...] = ()) -> tuple[set[str], str]:
    """({words}, the one word out of `choices`) of a preset string like 'wiki,tiny'.

    'synthetic' (engine tests, benchmarks: random tiny model, random tokens) needs no choice."""
    words = {w.strip() for w in (preset or "").split(",") if w.strip()}
    picked = words & set(choices)
    unknown = words - set(choices) - set(SCALES) - set(VARIANTS)
    if unknown or len(picked) > 1 or (choices and not picked and "synthetic" not in words):
        raise ValueError(f"preset {preset!r}: expected one of {list(choices)} plus optionally one of "
                         f"{list(SCALES)}" if choices else f"preset {preset!r}: expected '' or one of {list(SCALES)}")
    return words, (picked.pop() if picked else "")


def bundled(domain: str, ratio: float = 1.0) -> dict:
    """A data source: one of the corpora bundled with the package (btx_jax/data/bundled.py)."""
    return dict(bundled=domain, ratio=ratio)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.phase = "full"                      # expert | router | sft | full  (btx_jax/train/phases.py)
    c.trainable = ()                      # regexes over parameter paths; empty = the phase's table

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"               # "random" or a model directory (HF, mergoo, btx)
    c.model.arch = ml_collections.ConfigDict(ARCHS["tiny"])   # used when init="random"
    c.model.lora = ml_collections.ConfigDict({})             # phase 1: fresh LoRA (targets, rank, alpha, ...)
    c.model.compose = ml_collections.ConfigDict({})          # phase 2: experts, top_k, seed_expert, router_init

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1, num_devices=0))  # 0 = all devices
    c.mesh_rules = ()                     # () = btx_jax.mesh.DEFAULT_RULES

    c.train = ml_collections.ConfigDict(dict(
        steps=100, global_batch_size=8, microbatches=1, seq_len=256,
        lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
        b1=0.9, b2=0.95, eps=1e-8,
        lb_alpha=0.01, z_alpha=0.0,      # router aux losses (BTX: load balancing 0.01)
        dtype="float32", frozen_dtype="float32", remat="none",
        attention="auto", attention_block=64,   # btx_jax/model/attention.py; "xla" = reference
        loss_chunk=512,                  # lm_head + cross-entropy 512 positions at a time; 0 = full logits
        loss_layout="auto",              # chunked loss sharding: batch | vocab (parallel) | auto (fewer bytes)
        skip_nonfinite=False, max_consecutive_nonfinite=5,
        seed=0, log_every=10, ckpt_every=50, keep_checkpoints=2,
    ))
    c.data = ml_collections.ConfigDict(dict(kind="synthetic"))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=1, process_id=0, cpu_collectives=""))
    return c


def seed_scale(c: ml_collections.ConfigDict) -> None:
    """The seed recipe's scale: Llama-2-7B in bf16 with remat on an fsdp mesh, seq 4096."""
    c.model.init = "checkpoints/Llama-2-7b-hf"        # an HF Llama directory (convert or download it)
    c.model.arch = ARCHS["llama2_7b"]
    c.train.update(seq_len=4096, global_batch_size=32, dtype="bfloat16", frozen_dtype="bfloat16",
                   remat="full", log_every=10, ckpt_every=500)
    c.data = ml_collections.ConfigDict(dict(kind="pretrain", tokenizer=c.model.init))


def tiny_scale(c: ml_collections.ConfigDict) -> None:
    """CPU-sized: the tiny architecture, the bundled data and tokenizer, short runs."""
    c.model.arch = ARCHS["tiny"]
    c.train.update(seq_len=128, global_batch_size=16, log_every=10, ckpt_every=100)
