"""Train the bundled sentencepiece tokenizer on the bundled train splits.

    python scripts/train_tokenizer.py            # writes btx_jax/data/corpora/tokenizer/tokenizer.model

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

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "btx_jax/data/corpora")
    parser.add_argument("--out", type=Path, default=REPO / "btx_jax/data/corpora/tokenizer/tokenizer.model")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
