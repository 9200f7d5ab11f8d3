"""Phase 0 (demo only): pretrain a small seed model from scratch on the mixed bundled corpus.

Presets: `tiny` (default; the seed of the CPU demo).  At 7B scale the seed is Llama-2-7B itself."""
from btx_jax.configs.common import BUNDLED_TOKENIZER, base_config, bundled, parse_preset, tiny_scale


def get_config(preset: str = "tiny"):
    parse_preset(preset)
    c = base_config()
    c.phase = "full"
    tiny_scale(c)
    c.train.update(steps=800, lr=3e-3, warmup_steps=20, weight_decay=0.01)
    c.data = dict(kind="pretrain", tokenizer=BUNDLED_TOKENIZER,
                  sources=[bundled("wiki", 1 / 3), bundled("math", 1 / 3), bundled("novel", 1 / 3)])
    return c
