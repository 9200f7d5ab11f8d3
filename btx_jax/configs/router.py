"""Phase 2: compose the seed + three LoRA experts into a LoRA-MoE (top-2 of 3 on gate/up/down_proj, base
always on) and train only the routers and lm_head on the mixed corpus.

Presets: `` (seed scale, expert dirs under runs/btx/: the seed's router data, mC4 ja, Wikipedia ja, Aozora Bunko
and OpenMathInstruct (common.py SEED_SOURCES), 1B tokens: train.steps = tokens // (global_batch_size *
seq_len), recomputed when either changes) | `tiny` (the CPU demo, runs/demo/) | `tiny,ffn` (the paper's BTX: the
demo's full-FFN experts mixed into an FFN-MoE, top-2 of 3, routers + lm_head train)."""
from btx_jax.configs.common import (BUNDLED_TOKENIZER, DEMO_DIR, base_config, bundled, parse_preset, seed_scale,
                            seed_sources, tiny_scale, token_budget)
from btx_jax.configs.expert import DOMAINS

# The seed's router data. Its shares are not known: equal shares of tokens, one per source.
SEED_ROUTER_MIXTURE = {"mc4_ja": 0.25, "wikipedia_ja": 0.25, "aozora_bunko": 0.25, "open_math_instruct": 0.25}
SEED_ROUTER_TOKENS = 1_000_000_000


def get_config(preset: str = "tiny"):
    words, _ = parse_preset(preset)
    c = base_config()
    c.phase = "router"
    if "tiny" in words:
        tiny_scale(c)
        c.model.init = f"{DEMO_DIR}/seed/final"
        c.model.compose = dict(experts=[f"{DEMO_DIR}/expert_{d}/final" for d in DOMAINS], top_k=2,
                               seed_expert=False, router_init="normal")
        c.train.update(steps=200, lr=3e-3, warmup_steps=10, lb_alpha=0.01)
        c.data = dict(kind="pretrain", tokenizer=BUNDLED_TOKENIZER,
                      sources=[bundled(d, 1 / 3) for d in DOMAINS])
        if "ffn" in words:
            c.model.compose = dict(experts=[f"{DEMO_DIR}/ffn_expert_{d}/final" for d in DOMAINS], mode="ffn",
                                   top_k=2, seed_expert=False, router_init="normal")
        return c
    seed_scale(c)
    c.model.compose = dict(experts=[f"runs/btx/expert_{d}/final" for d in DOMAINS], top_k=2,
                           seed_expert=False, router_init="normal")
    c.train.update(lr=1e-4, warmup_steps=50)
    token_budget(c, SEED_ROUTER_TOKENS)
    c.data.sources = seed_sources(SEED_ROUTER_MIXTURE)
    return c
