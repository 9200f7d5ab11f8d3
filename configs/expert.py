"""Phase 1: one LoRA domain expert on the seed model (only LoRA A/B train).

Presets (`--config=configs/expert.py:PRESET`):
  wiki | math | novel   the seed's data mixture for that domain, Llama-2-7B shapes (r=640, alpha=32)
  tiny                  CPU-sized synthetic run (engine tests)
"""
from configs.common import ARCHS, base_config


def get_config(preset: str = "tiny"):
    c = base_config()
    c.phase = "expert"
    c.model.lora = dict(targets=("gate_proj", "up_proj", "down_proj"), rank=640, alpha=32.0, dropout=0.1)
    if preset == "tiny":
        c.model.lora = dict(targets=("gate_proj", "up_proj", "down_proj"), rank=8, alpha=16.0, dropout=0.0)
        c.train.update(steps=20, global_batch_size=8, seq_len=64, log_every=5, ckpt_every=10)
        return c
    c.model.arch = ARCHS["llama2_7b"]
    c.train.update(seq_len=4096, global_batch_size=32, dtype="bfloat16", frozen_dtype="bfloat16",
                   remat="full", lr=1e-4)
    return c
