"""Phase 2: compose the seed + three LoRA experts into a LoRA-MoE (top-2 of 3 on gate/up/down_proj, base
always on) and train only the routers and lm_head on the mixed corpus.

Presets: `` (seed scale, expert dirs under runs/btx/) | `tiny` (the CPU demo, runs/demo/) | `tiny,ffn` (the
paper's BTX: the demo's full-FFN experts mixed into an FFN-MoE, top-2 of 3, routers + lm_head train)."""
from configs.common import BUNDLED_TOKENIZER, DEMO_DIR, base_config, bundled, parse_preset, seed_scale, tiny_scale
from configs.expert import DOMAINS, SEED_MIXTURES


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
    c.train.update(steps=2000, lr=1e-4, warmup_steps=50)
    c.data.sources = [dict(name=n, path=p, subset=s, format="hub", ratio=r / 3)
                      for d in DOMAINS for n, p, s, r in SEED_MIXTURES[d]]
    return c
