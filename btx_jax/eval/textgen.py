"""Text in, text out: the tokenizer that goes with a model (`model_tokenizer`), tokenise a prompt (optionally in
the SFT instruction template), generate with the KV cache, decode the continuation up to the first EOS."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from btx_jax.checkpoint import btx
from btx_jax.data import BUNDLED_TOKENIZER, DataError, Tokenizer, load_tokenizer
from btx_jax.data.sft import instruction_prompt
from btx_jax.data.tokenizer import TOKENIZER_FILES
from btx_jax.pretrained import Pretrained

VOCAB_PADDING = 128             # embedding tables may be padded up to a multiple of this beyond the tokenizer


def model_tokenizer(model: str | Path, vocab_size: int, *, adapter: str | Path | None = None,
                    tokenizer: str | Path | Tokenizer | None = None, option: str = "--tokenizer") -> Tokenizer:
    """The tokenizer to read and write a model's text with: `tokenizer` if given; else one saved in the adapter or
    model directory or in a directory its lean chain is built on (btx `frozen_from`); else the one the training
    run of a final recorded (`data.tokenizer` in <run>/run_info.json); else the bundled tokenizer, but only for a
    model whose vocabulary is exactly its size (the demo's architecture).  Checked against `vocab_size`
    (`check_matches`); DataError (one line) when none is found or it does not match, telling the user to pass
    `option` (how the caller's command line names the tokenizer)."""
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        return check_matches(tok, vocab_size, model, option=option)
    dirs = ([btx.resolve(adapter)] if adapter is not None else []) + btx.links(model)
    for d in dirs:
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            return check_matches(load_tokenizer(d), vocab_size, model, f"saved in {d}", option)
        info = d.parent.parent / btx.RUN_INFO
        if d.parent.name == btx.FINALS and info.is_file():
            recorded = json.loads(info.read_text()).get("config", {}).get("data", {}).get("tokenizer")
            if recorded:
                try:
                    tok = load_tokenizer(recorded)
                except DataError as e:
                    raise DataError(f"{model}: its training run ({info}) used tokenizer {recorded!r}, which cannot "
                                    f"be loaded ({e}); pass {option}") from None
                return check_matches(tok, vocab_size, model, f"recorded in {info}", option)
    bundled = load_tokenizer(BUNDLED_TOKENIZER)
    if bundled.vocab_size == vocab_size:
        return bundled
    raise DataError(f"{model}: no tokenizer saved with the model or recorded by its training run "
                    f"({', '.join(TOKENIZER_FILES[:3])} or {btx.RUN_INFO}), and the bundled one ({bundled.vocab_size} "
                    f"pieces) does not match its vocabulary ({vocab_size}); pass {option}")


def check_matches(tok: Tokenizer, vocab_size: int, model: str | Path = "the model", where: str = "",
                  option: str = "--tokenizer") -> Tokenizer:
    """`tok`, or DataError unless it has the model's vocabulary: no more ids than the embedding has rows, and
    not so few that the model could produce ids it cannot decode (beyond padding to a multiple of
    VOCAB_PADDING, as embedding tables often are)."""
    padded = -(-tok.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    if not tok.vocab_size <= vocab_size <= padded:
        raise DataError(f"tokenizer {tok.path}{f' ({where})' if where else ''} has {tok.vocab_size} tokens but "
                        f"{model} has a vocabulary of {vocab_size}: they do not belong together; pass the "
                        f"model's own tokenizer with {option}")
    return tok


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
