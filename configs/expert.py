"""Phase 1: one LoRA domain expert on the seed model; only LoRA A/B train.

Presets (`--config=configs/expert.py:DOMAIN[,tiny]`), DOMAIN in wiki | math | novel:
  DOMAIN        the seed recipe: Llama-2-7B, LoRA r=640 alpha=32 dropout 0.1 on gate/up/down_proj, the seed's
                data mixture for the domain: hub datasets as (path, subset) (point non-hub names at your copies;
                tokenise ahead with `python scripts/prepare_data.py --config=configs/expert.py:DOMAIN`)
  DOMAIN,tiny   the CPU demo: the tiny seed from configs/pretrain.py, the bundled domain corpus
  DOMAIN,tiny,ffn   a full-FFN expert instead (phase `ffn`: the MLP kernels train, no LoRA) for the paper's BTX
  synthetic     engine tests: a random tiny model, LoRA r=8, random tokens
"""
from configs.common import (BUNDLED_TOKENIZER, DEMO_DIR, SEED_LORA, base_config, bundled, parse_preset,
                            seed_scale, tiny_scale)

DOMAINS = ("wiki", "math", "novel")
# The seed's expert mixtures (share of tokens): (name, hub path, subset, ratio).
SEED_MIXTURES = {
    "wiki": [("wikipedia_ja", "wikimedia/wikipedia", "20231101.ja", 0.36),
             ("wikipedia_en", "wikimedia/wikipedia", "20231101.en", 0.20),
             ("news_ja", "news_ja", None, 0.43)],
    "math": [("atlas_math_sets", "AtlasUnified/atlas-math-sets", None, 0.43),
             ("open_math_instruct", "nvidia/OpenMathInstruct-1", None, 0.37),
             ("basic_math", "basicMath", None, 0.17), ("gsm8k", "openai/gsm8k", "main", 0.01)],
    "novel": [("aozora_bunko", "globis-university/aozorabunko-clean", None, 0.10), ("novels", "novels_ja", None, 0.90)],
}


def get_config(preset: str = "wiki,tiny"):
    words, domain = parse_preset(preset, DOMAINS)
    c = base_config()
    c.phase = "expert"
    c.model.lora = dict(SEED_LORA)
    if "synthetic" in words:
        c.model.lora = dict(targets=SEED_LORA["targets"], rank=8, alpha=16.0, dropout=0.0)
        c.train.update(steps=20, global_batch_size=8, seq_len=64, log_every=5, ckpt_every=10)
        return c
    if "tiny" in words:
        tiny_scale(c)
        c.model.init = f"{DEMO_DIR}/seed/final"
        c.model.lora = dict(targets=SEED_LORA["targets"], rank=32, alpha=32.0, dropout=0.0)
        c.train.update(steps=150, lr=3e-3, warmup_steps=10)
        c.data = dict(kind="pretrain", tokenizer=BUNDLED_TOKENIZER, sources=[bundled(domain)])
        if "ffn" in words:
            c.phase = "ffn"
            c.model.lora = None
            c.train.update(steps=100, lr=1e-3)
        return c
    seed_scale(c)
    c.train.update(steps=10000, lr=1e-4, warmup_steps=100)
    c.data.sources = [dict(name=n, path=p, subset=s, format="hub", ratio=r) for n, p, s, r in SEED_MIXTURES[domain]]
    return c
