"""Local copies of the seed's datasets, laid out as the hub has them (each dataset's real columns and files:
docs/data.md, "The seed's datasets"), for the seed-scale presets to read with only `path` changed:
tests/test_seed_presets.py checks what each preset tokenises from them, scripts/rehearse.py trains on them.

    path, expected = FIXTURES["gsm8k"](directory, rows=3)

`path` is what a source's `path` should be set to; `expected` the document texts each row should become
(pretraining) or each example's (instruction, input, output) (SFT), in order.  `rows` sets the number of
records of each copy (the content repeats with the row index, long enough to fill several packed rows when
`rows` is a few hundred).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hub_folder(root: Path, subset: str, rows: list[dict]) -> Path:
    """A local copy laid out like the hub: README.md `configs:` + the subset's parquet shard."""
    write_parquet(root / subset / "train-00000-of-00001.parquet", rows)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {subset}\n  data_files:\n  - split: train\n"
                                    f"    path: {subset}/train-*\n---\n", encoding="utf-8")
    return root


def wiki_rows(lang: str, rows: int = 3) -> list[dict]:
    return [{"id": str(i), "url": f"https://{lang}.wikipedia.org/wiki?curid={i}", "title": f"DECOY title {i}",
             "text": f"{lang} article {i} 東京は日本の首都です。"} for i in range(rows)]


def _wikipedia_ja(tmp: Path, rows: int = 3):
    records = wiki_rows("ja", rows)
    return str(hub_folder(tmp / "wikipedia", "20231101.ja", records)), [r["text"] for r in records]


def _wikipedia_en(tmp: Path, rows: int = 3):
    records = wiki_rows("en", rows)
    return str(write_parquet(tmp / "wikipedia_en.parquet", records)), [r["text"] for r in records]


def _text_files(tmp: Path, name: str, rows: int = 4):
    records = [{"text": f"{name} document {i} 吾輩は猫である。"} for i in range(rows)]
    write_jsonl(tmp / name / "part-0.jsonl", records[:rows // 2])
    write_jsonl(tmp / name / "part-1.jsonl", records[rows // 2:])
    return str(tmp / name / "*.jsonl"), [r["text"] for r in records]


def _atlas_math_sets(tmp: Path, rows: int = 3):
    records = [{"instruction": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}"} for i in range(rows)]
    return str(write_jsonl(tmp / "atlas.jsonl", records)), [f"{r['instruction']}\n{r['output']}" for r in records]


def _open_math_instruct(tmp: Path, rows: int = 3):
    """nvidia/OpenMathInstruct-1's layout: correct_solutions/ and incorrect_solutions/; only correct ones read."""
    def records(correct):
        return [{"question": f"Q{i} {correct}", "generated_solution": f"Solve {i}. <llm-code>print({i})</llm-code>",
                 "expected_answer": str(i), "predicted_answer": str(i if correct else -i), "error_message": "",
                 "is_correct": correct, "dataset": "gsm8k"} for i in range(rows)]
    root = tmp / "OpenMathInstruct-1"
    write_jsonl(root / "correct_solutions" / "train.jsonl", records(True))
    write_jsonl(root / "incorrect_solutions" / "train.jsonl", records(False))
    return str(root), [f"{r['question']}\n{r['generated_solution']}" for r in records(True)]


def _basic_math(tmp: Path, rows: int = 3):
    records = [{"instruction": f"{i} * 3", "answer": str(i * 3)} for i in range(rows)]
    path = tmp / "basic-math-10m.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")   # one JSON array, as the hub's basic-math-10m.json
    return str(path), [f"{r['instruction']}\n{r['answer']}" for r in records]


def _gsm8k(tmp: Path, rows: int = 3):
    records = [{"question": f"Natalia sold {i} clips.", "answer": f"She sold {i} clips.\n#### {i}"}
               for i in range(rows)]
    return str(hub_folder(tmp / "gsm8k", "main", records)), [f"{r['question']}\n{r['answer']}" for r in records]


def _aozora_bunko(tmp: Path, rows: int = 3):
    records = [{"text": f"作品 {i} 本文", "footnote": "DECOY 底本", "meta": {"作品ID": str(i), "作品名": "DECOY"}}
               for i in range(rows)]
    return str(write_jsonl(tmp / "aozora.jsonl", records)), [r["text"] for r in records]


def _mc4_ja(tmp: Path, rows: int = 3):
    records = [{"text": f"ウェブ文書 {i}", "timestamp": "2020-01-01T00:00:00Z", "url": f"https://example.jp/{i}"}
               for i in range(rows)]
    return str(write_jsonl(tmp / "c4-ja.jsonl", records)), [r["text"] for r in records]


def _llm_japanese(tmp: Path, rows: int = 2):
    records = [{"instruction": "次の質問に答えてください。", "input": f"日本の首都は？ ({i})", "output": "東京です。"}
               if i % 2 == 0 else {"instruction": f"挨拶をしてください。 ({i})", "input": "", "output": "こんにちは。"}
               for i in range(rows)]
    return (str(write_jsonl(tmp / "llm.jsonl", records)),
            [(r["instruction"], r["input"], r["output"]) for r in records])


def _cotangent(tmp: Path, rows: int = 2):
    records = [{"instruction": f"問題 {i}", "input": "", "output": f"考え方 {i}。したがって、答えは {i} です。"}
               for i in range(rows)]
    path = tmp / "CoTangent" / "CoTangent_ja.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path.parent), [(r["instruction"], "", r["output"]) for r in records]


def _auto_wiki_qa(tmp: Path, rows: int = 3):
    records = [{"query": f"質問 {i}？", "answer": f"答え {i}", "text": f"本文 {i}", "title": "DECOY"}
               for i in range(rows)]
    return (str(write_parquet(tmp / "auto_wiki_qa.parquet", records)),
            [(r["query"], r["text"], r["answer"]) for r in records])


def _question_answer(tmp: Path, name: str, rows: int = 3):
    records = [{"question": f"{name} の質問 {i}", "answer": f"{name} の回答 {i}", "score": 5} for i in range(rows)]
    return str(write_parquet(tmp / f"{name}.parquet", records)), [(r["question"], "", r["answer"]) for r in records]


FIXTURES = {
    "wikipedia_ja": _wikipedia_ja, "wikipedia_en": _wikipedia_en,
    "news_ja": lambda tmp, **kw: _text_files(tmp, "news_ja", **kw),
    "novels_ja": lambda tmp, **kw: _text_files(tmp, "novels_ja", **kw),
    "atlas_math_sets": _atlas_math_sets, "open_math_instruct": _open_math_instruct, "basic_math": _basic_math,
    "gsm8k": _gsm8k, "aozora_bunko": _aozora_bunko, "mc4_ja": _mc4_ja,
    "llm_japanese": _llm_japanese, "cotangent": _cotangent, "auto_wiki_qa": _auto_wiki_qa,
    **{name: (lambda tmp, name=name, **kw: _question_answer(tmp, name, **kw))
       for name in ("auto_qa", "auto_qa_cc", "auto_qa_other", "logical_datasets")},
}
