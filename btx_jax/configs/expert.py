"""Phase 1: one LoRA domain expert on the seed model; only LoRA A/B train.

Presets (`--config=expert:DOMAIN[,tiny]`), DOMAIN in wiki | math | novel:
  DOMAIN        the seed recipe: Llama-2-7B, LoRA r=640 alpha=32 dropout 0.1 on gate/up/down_proj, the seed's
                data mixture for the domain (common.py SEED_SOURCES: hub datasets read through their own
                columns; news_ja / novels_ja are placeholders for your jsonl copies) and token budget (wiki 5B,
                math 1.6B, novel 9B tokens: train.steps = tokens // (global_batch_size * seq_len), recomputed
                when either changes); tokenise ahead with
                `btx prepare-data --config=expert:DOMAIN`
  DOMAIN,tiny   the CPU demo: the tiny seed from pretrain.py, the bundled domain corpus
  DOMAIN,tiny,ffn   a full-FFN expert instead (phase `ffn`: the MLP kernels train, no LoRA) for the paper's BTX
  synthetic     engine tests: a random tiny model, LoRA r=8, random tokens
"""
from btx_jax.configs.common import (BUNDLED_TOKENIZER, DEMO_DIR, SEED_LORA, base_config, bundled, parse_preset,
                            seed_scale, seed_sources, tiny_scale, token_budget)

DOMAINS = ("wiki", "math", "novel")
# The seed's expert mixtures: {source (common.py SEED_SOURCES): share of tokens}, and token budgets.
SEED_MIXTURES = {
    "wiki": {"wikipedia_ja": 0.36, "wikipedia_en": 0.20, "news_ja": 0.43},
    "math": {"atlas_math_sets": 0.43, "open_math_instruct": 0.37, "basic_math": 0.17, "gsm8k": 0.01},
    "novel": {"aozora_bunko": 0.10, "novels_ja": 0.90},
}
SEED_TOKENS = {"wiki": 5_000_000_000, "math": 1_600_000_000, "novel": 9_000_000_000}


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
    c.train.update(lr=1e-4, warmup_steps=100)
    token_budget(c, SEED_TOKENS[domain])
    c.data.sources = seed_sources(SEED_MIXTURES[domain])
    return c
