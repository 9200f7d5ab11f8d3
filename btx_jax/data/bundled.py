"""Specs of the small real corpora bundled inside the package, in `btx_jax/data/corpora/` (see its
SOURCE.md files; installed with the package, so `pip install .` runs the demo). Mixtures are not files:
they are configs built here or in configs/.

  wiki   pretrain  corpora/wiki/{train,valid}.jsonl    WikiText-2 articles (en) + Wikipedia paragraphs (ja)
  math   pretrain  corpora/math/{train,valid}.jsonl    GSM8K, as "Question: ...\\nAnswer: ..."
  novel  pretrain  corpora/novel/{train,valid}/*.txt   Aozora Bunko novels (ja) + Tiny Shakespeare, one doc per file
  sft    sft       corpora/sft/{train,valid}.jsonl     JCommonsenseQA + JSQuAD instruction records (ja)
"""

from __future__ import annotations

from pathlib import Path

from btx_jax.data.errors import DataError

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "corpora"
BUNDLED_TOKENIZER = BUNDLED_DATA_DIR / "tokenizer" / "tokenizer.model"
PREFIX = "bundled:"          # configs name bundled files as "bundled:tokenizer/tokenizer.model" (literals)


def resolve(path: str | Path) -> str:
    """`path`, with a leading "bundled:" replaced by the bundled corpora directory."""
    path = str(path)
    return str(BUNDLED_DATA_DIR / path[len(PREFIX):]) if path.startswith(PREFIX) else path

_DOMAINS = {
    "wiki": {"path": "wiki/train.jsonl", "eval_path": "wiki/valid.jsonl", "text_field": "text"},
    "math": {
        "path": "math/train.jsonl",
        "eval_path": "math/valid.jsonl",
        "template": "Question: {question}\nAnswer: {answer}",
    },
    "novel": {"path": "novel/train/*.txt", "eval_path": "novel/valid/*.txt", "sample_by": "document"},
    "sft": {"path": "sft/train.jsonl", "eval_path": "sft/valid.jsonl"},
}
DOMAINS = tuple(_DOMAINS)


def bundled_source(domain: str, ratio: float = 1.0) -> dict:
    """Source dict of one bundled domain (absolute paths), usable in any pipeline config."""
    if domain not in _DOMAINS:
        raise DataError(f"unknown bundled domain {domain!r}; choose from {DOMAINS}")
    spec = dict(_DOMAINS[domain], name=domain, ratio=ratio)
    for key in ("path", "eval_path"):
        spec[key] = str(BUNDLED_DATA_DIR / spec[key])
    return spec


def mixture_config(ratios: dict[str, float], kind: str = "pretrain", **options) -> dict:
    """A pipeline config mixing bundled domains, e.g. mixture_config({"wiki": 0.5, "math": 0.5})."""
    return {"kind": kind, "sources": [bundled_source(d, r) for d, r in ratios.items()], **options}
