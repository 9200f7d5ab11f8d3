"""Phase 3: supervised fine-tuning of the router-trained LoRA-MoE on Japanese instruction data, experts
frozen (trainable: embeddings, attention, norms, routers, lm_head), loss on the response tokens only.

Presets: `` (seed scale) | `tiny` (the CPU demo: bundled JCommonsenseQA + JSQuAD instructions)."""
from configs.common import BUNDLED_TOKENIZER, DEMO_DIR, base_config, bundled, parse_preset, seed_scale, tiny_scale


def get_config(preset: str = "tiny"):
    words, _ = parse_preset(preset)
    c = base_config()
    c.phase = "sft"
    if "tiny" in words:
        tiny_scale(c)
        c.model.init = f"{DEMO_DIR}/router/final"
        c.train.update(steps=100, lr=1e-3, warmup_steps=10)
        c.data = dict(kind="sft", tokenizer=BUNDLED_TOKENIZER, sources=[bundled("sft")])
        return c
    seed_scale(c)
    c.model.init = "runs/btx/router/final"
    c.train.update(steps=3000, lr=2e-5, warmup_steps=100)
    c.data = dict(kind="sft", tokenizer=c.data.tokenizer,
                  sources=[dict(bundled("sft"), name="ja_instructions")])
    return c
