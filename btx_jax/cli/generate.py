"""Generate text from a checkpoint (KV-cached; greedy unless --temperature > 0).

    btx generate --model=runs/demo/sft/final --chat --prompt="日本の首都はどこですか？"

The tokenizer defaults to the model's own: saved with it (or with a checkpoint its chain is built on), else the
one its training run recorded, else the bundled one for the demo's 4,096-token models; a tokenizer whose
vocabulary does not match the model's is refused (exit 2) before anything is loaded.
A prompt whose tokens plus --max-new-tokens exceed the model's max_position_embeddings is refused (exit 2), not
truncated; --temperature must be >= 0 and --top-p in (0, 1].
"""
from __future__ import annotations

import argparse
from typing import Sequence

from btx_jax.command_line import ArgumentParser, positive_int, run_cli


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="btx generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF, mergoo or btx checkpoint directory")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory applied on --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own, see above)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the SFT instruction template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def run():
        from btx_jax.pretrained import open_model
        from btx_jax.eval.textgen import complete, model_tokenizer
        src = open_model(args.model, adapter=args.adapter)          # configs and tensor headers only
        tok = model_tokenizer(args.model, src.config.vocab_size, adapter=args.adapter, tokenizer=args.tokenizer)
        pre = src.load()
        for prompt, text in zip(args.prompt, complete(pre, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                                                      chat=args.chat, temperature=args.temperature,
                                                      top_p=args.top_p, seed=args.seed)):
            print(f"> {prompt}\n{text if text else '(the model ended its answer at once: EOS first)'}\n")

    run_cli(run)
    return 0
