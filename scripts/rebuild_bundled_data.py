"""Rebuild the small bundled corpora in `btx_jax/data/corpora/` from the full copies in a shared data folder.

    python scripts/rebuild_bundled_data.py --shared /work/shared/data --out btx_jax/data/corpora

(Tokenising a config's sources into stores ahead of training is `scripts/prepare_data.py`.)

Deterministic: the subsets are prefixes / fixed article splits, no randomness. Each domain gets a
train and a held-out valid split; SOURCE.md per folder says where every file came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from btx_jax.command_line import ArgumentParser


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _wikitext_articles(path: Path) -> list[dict]:
    """Split raw WikiText into articles at the ' = Title = ' lines; one record per article."""
    articles: list[dict] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title:
            articles.append({"title": stripped.strip("= ").strip(), "lines": []})
        elif articles and stripped:
            articles[-1]["lines"].append(stripped)
    return [{"title": a["title"], "text": "\n".join(a["lines"]), "lang": "en"} for a in articles if a["lines"]]


def _split_by_title(records: list[dict], n_valid_titles: int) -> tuple[list[dict], list[dict]]:
    titles = list(dict.fromkeys(r["title"] for r in records))
    valid_titles = set(titles[-n_valid_titles:])
    return ([r for r in records if r["title"] not in valid_titles], [r for r in records if r["title"] in valid_titles])


def prepare_wiki(shared: Path, out: Path) -> None:
    en = _wikitext_articles(shared / "wiki/wikitext-2-raw/wiki.test.raw")
    en_train, en_valid = en[:22], en[22:26]
    ja = [
        {"title": r["title"], "text": r["text"], "lang": "ja"}
        for r in _read_jsonl(shared / "wiki/ja_wikipedia_jsquad/paragraphs_from_jsquad_test.jsonl")
    ]
    ja_train, ja_valid = _split_by_title(ja, n_valid_titles=8)
    _write_jsonl(out / "wiki/train.jsonl", en_train + ja_train)
    _write_jsonl(out / "wiki/valid.jsonl", en_valid + ja_valid)
    shutil.copy(shared / "sft/jglue/LICENSE", out / "wiki/LICENSE.CC-BY-SA-4.0")


def prepare_math(shared: Path, out: Path) -> None:
    _write_jsonl(out / "math/train.jsonl", _read_jsonl(shared / "math/gsm8k/train.jsonl")[:1500])
    _write_jsonl(out / "math/valid.jsonl", _read_jsonl(shared / "math/gsm8k/test.jsonl")[:250])
    shutil.copy(shared / "math/gsm8k/LICENSE", out / "math/LICENSE")


def prepare_novel(shared: Path, out: Path) -> None:
    aozora = shared / "novel/aozora_ja"
    shakespeare = (shared / "novel/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    # Cut Shakespeare at blank lines (speech boundaries) near 250k and 300k characters.
    cut_train = shakespeare.index("\n\n", 250_000) + 2
    cut_valid = shakespeare.index("\n\n", 300_000) + 2
    files = {
        "train/natsume_soseki_botchan.txt": (aozora / "natsume_soseki_botchan.txt").read_text(encoding="utf-8"),
        "train/akutagawa_rashomon.txt": (aozora / "akutagawa_rashomon.txt").read_text(encoding="utf-8"),
        "train/akutagawa_momotaro.txt": (aozora / "akutagawa_momotaro.txt").read_text(encoding="utf-8"),
        "train/tinyshakespeare_part1.txt": shakespeare[:cut_train],
        "valid/akutagawa_kumo_no_ito.txt": (aozora / "akutagawa_kumo_no_ito.txt").read_text(encoding="utf-8"),
        "valid/tinyshakespeare_part2.txt": shakespeare[cut_train:cut_valid],
    }
    for name, text in files.items():
        path = out / "novel" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def prepare_sft(shared: Path, out: Path) -> None:
    keep = ("id", "instruction", "input", "output")
    jcqa = [
        {k: r[k] for k in keep} | {"source": "jcommonsenseqa"}
        for r in _read_jsonl(shared / "sft/jglue/sft_jcommonsenseqa_train.jsonl")
    ]
    jsquad = [
        {k: r[k] for k in keep} | {"source": "jsquad", "title": r["title"]}
        for r in _read_jsonl(shared / "sft/jglue/sft_jsquad_valid.jsonl")
    ]
    sq_train, sq_valid = _split_by_title(jsquad, n_valid_titles=6)
    train = jcqa[:2000] + sq_train[:800]
    valid = jcqa[2000:2200] + sq_valid[:150]
    for r in train + valid:
        r.pop("title", None)
    _write_jsonl(out / "sft/train.jsonl", train)
    _write_jsonl(out / "sft/valid.jsonl", valid)
    shutil.copy(shared / "sft/jglue/LICENSE", out / "sft/LICENSE.CC-BY-SA-4.0")


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "btx_jax/data/corpora")
    args = parser.parse_args()
    for prepare in (prepare_wiki, prepare_math, prepare_novel, prepare_sft):
        prepare(args.shared, args.out)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>10,d}  {path.relative_to(args.out)}")


if __name__ == "__main__":
    main()
