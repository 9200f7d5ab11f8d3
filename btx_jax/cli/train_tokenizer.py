"""Train the bundled sentencepiece tokenizer on the bundled train splits.

    btx train-tokenizer                              # writes btx_jax/data/corpora/tokenizer/tokenizer.model
    btx train-tokenizer --vocab-size=8000 --out=/tmp/tok.model

BPE, byte fallback (no <unk> on unseen characters), identity normalisation and kept whitespace so
that decode(encode(text)) == text, digits split one per piece (for math).
Ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3.
Only the train splits are read (never valid), so held-out perplexity is honest.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Sequence

from btx_jax.command_line import ArgumentParser, positive_int, run_cli

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"


def train_texts(data_dir: Path) -> list[str]:
    """One string per document/paragraph of every domain's train split."""
    texts: list[str] = []
    for path in sorted((data_dir / "novel/train").glob("*.txt")):
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in (data_dir / "wiki/train.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [p for p in json.loads(line)["text"].split("\n") if p.strip()]
    for line in (data_dir / "math/train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        texts += [r["question"], r["answer"]]
    for line in (data_dir / "sft/train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        texts += [r["instruction"], r["input"], r["output"]]
    return texts


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="btx train-tokenizer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CORPORA, help="the bundled corpora directory")
    parser.add_argument("--out", type=Path, default=CORPORA / "tokenizer" / "tokenizer.model")
    parser.add_argument("--vocab-size", type=positive_int, default=4096)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    args = parser.parse_args(argv)
    run_cli(lambda: train(args))
    return 0


def train(args: argparse.Namespace) -> None:
    import sentencepiece as spm
    texts = train_texts(args.data)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    print(f"{args.out}: {sp.get_piece_size()} pieces from {len(texts):,d} texts, {len(model.getvalue()):,d} bytes")
