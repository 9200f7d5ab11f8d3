"""Text in, text out: tokenise a prompt (optionally in the SFT instruction template), generate with the KV
cache, decode the continuation up to the first EOS."""
from __future__ import annotations

import numpy as np

from btx_jax.data.sft import instruction_prompt
from btx_jax.pretrained import Pretrained


def complete(pre: Pretrained, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, chat: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """One completion per prompt (each generated on its own: prompts have different lengths)."""
    outs = []
    for prompt in prompts:
        text = instruction_prompt(prompt) if chat else prompt
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []) + \
            tokenizer.encode(text)
        tokens = pre.generate(np.asarray([ids]), max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        new = [int(t) for t in tokens[0, len(ids):]]
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        outs.append(tokenizer.decode(new))
    return outs
