"""The seed-scale presets read their datasets' real columns: every source of expert.py:wiki/math/novel, router.py
and sft.py, pointed (only `path` changed, as a user would) at tiny local copies with each dataset's schema
(btx_jax/data/README.md, "The seed's datasets"), tokenises the columns it should and nothing else; train.steps
follows the token budget."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from btx_jax.data import BUNDLED_TOKENIZER, DataError, load_tokenizer, prepare
from btx_jax.data.sources import Source, load_records
from configs import expert, router, sft

TOK = load_tokenizer(BUNDLED_TOKENIZER)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hub_folder(root, subset, rows):
    """A local copy laid out like the hub: README.md `configs:` + the subset's parquet shard."""
    write_parquet(root / subset / "train-00000-of-00001.parquet", rows)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {subset}\n  data_files:\n  - split: train\n"
                                    f"    path: {subset}/train-*\n---\n", encoding="utf-8")
    return root


def wiki_rows(lang):
    return [{"id": str(i), "url": f"https://{lang}.wikipedia.org/wiki?curid={i}", "title": f"DECOY title {i}",
             "text": f"{lang} article {i} 東京は日本の首都です。"} for i in range(3)]


# Each source's local copy: (path, expected) where expected is the document texts (pretraining) or the
# (instruction, input, output) of each example (SFT), in order.
def _wikipedia_ja(tmp):
    rows = wiki_rows("ja")
    return str(hub_folder(tmp / "wikipedia", "20231101.ja", rows)), [r["text"] for r in rows]


def _wikipedia_en(tmp):
    rows = wiki_rows("en")
    return str(write_parquet(tmp / "wikipedia_en.parquet", rows)), [r["text"] for r in rows]


def _text_files(tmp, name):
    rows = [{"text": f"{name} document {i} 吾輩は猫である。"} for i in range(4)]
    write_jsonl(tmp / name / "part-0.jsonl", rows[:2])
    write_jsonl(tmp / name / "part-1.jsonl", rows[2:])
    return str(tmp / name / "*.jsonl"), [r["text"] for r in rows]


def _atlas_math_sets(tmp):
    rows = [{"instruction": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}"} for i in range(3)]
    return str(write_jsonl(tmp / "atlas.jsonl", rows)), [f"{r['instruction']}\n{r['output']}" for r in rows]


def _open_math_instruct(tmp):
    """nvidia/OpenMathInstruct-1's layout: correct_solutions/ and incorrect_solutions/; only correct ones read."""
    def rows(correct):
        return [{"question": f"Q{i} {correct}", "generated_solution": f"Solve {i}. <llm-code>print({i})</llm-code>",
                 "expected_answer": str(i), "predicted_answer": str(i if correct else -i), "error_message": "",
                 "is_correct": correct, "dataset": "gsm8k"} for i in range(3)]
    root = tmp / "OpenMathInstruct-1"
    write_jsonl(root / "correct_solutions" / "train.jsonl", rows(True))
    write_jsonl(root / "incorrect_solutions" / "train.jsonl", rows(False))
    return str(root), [f"{r['question']}\n{r['generated_solution']}" for r in rows(True)]


def _basic_math(tmp):
    rows = [{"instruction": f"{i} * 3", "answer": str(i * 3)} for i in range(3)]
    path = tmp / "basic-math-10m.json"
    path.write_text(json.dumps(rows), encoding="utf-8")   # one JSON array, as the hub's basic-math-10m.json
    return str(path), [f"{r['instruction']}\n{r['answer']}" for r in rows]


def _gsm8k(tmp):
    rows = [{"question": f"Natalia sold {i} clips.", "answer": f"She sold {i} clips.\n#### {i}"} for i in range(3)]
    return str(hub_folder(tmp / "gsm8k", "main", rows)), [f"{r['question']}\n{r['answer']}" for r in rows]


def _aozora_bunko(tmp):
    rows = [{"text": f"作品 {i} 本文", "footnote": "DECOY 底本", "meta": {"作品ID": str(i), "作品名": "DECOY"}}
            for i in range(3)]
    return str(write_jsonl(tmp / "aozora.jsonl", rows)), [r["text"] for r in rows]


def _mc4_ja(tmp):
    rows = [{"text": f"ウェブ文書 {i}", "timestamp": "2020-01-01T00:00:00Z", "url": f"https://example.jp/{i}"}
            for i in range(3)]
    return str(write_jsonl(tmp / "c4-ja.jsonl", rows)), [r["text"] for r in rows]


def _llm_japanese(tmp):
    rows = [{"instruction": "次の質問に答えてください。", "input": "日本の首都は？", "output": "東京です。"},
            {"instruction": "挨拶をしてください。", "input": "", "output": "こんにちは。"}]
    return str(write_jsonl(tmp / "llm.jsonl", rows)), [(r["instruction"], r["input"], r["output"]) for r in rows]


def _cotangent(tmp):
    rows = [{"instruction": f"問題 {i}", "input": "", "output": f"考え方 {i}。したがって、答えは {i} です。"} for i in range(2)]
    path = tmp / "CoTangent" / "CoTangent_ja.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path.parent), [(r["instruction"], "", r["output"]) for r in rows]


def _auto_wiki_qa(tmp):
    rows = [{"query": f"質問 {i}？", "answer": f"答え {i}", "text": f"本文 {i}", "title": "DECOY"}
            for i in range(3)]
    return str(write_parquet(tmp / "auto_wiki_qa.parquet", rows)), [(r["query"], r["text"], r["answer"]) for r in rows]


def _question_answer(tmp, name):
    rows = [{"question": f"{name} の質問 {i}", "answer": f"{name} の回答 {i}", "score": 5} for i in range(3)]
    return str(write_parquet(tmp / f"{name}.parquet", rows)), [(r["question"], "", r["answer"]) for r in rows]


FIXTURES = {
    "wikipedia_ja": _wikipedia_ja, "wikipedia_en": _wikipedia_en,
    "news_ja": lambda tmp: _text_files(tmp, "news_ja"), "novels_ja": lambda tmp: _text_files(tmp, "novels_ja"),
    "atlas_math_sets": _atlas_math_sets, "open_math_instruct": _open_math_instruct, "basic_math": _basic_math,
    "gsm8k": _gsm8k, "aozora_bunko": _aozora_bunko, "mc4_ja": _mc4_ja,
    "llm_japanese": _llm_japanese, "cotangent": _cotangent, "auto_wiki_qa": _auto_wiki_qa,
    **{name: (lambda tmp, name=name: _question_answer(tmp, name))
       for name in ("auto_qa", "auto_qa_cc", "auto_qa_other", "logical_datasets")},
}

PRESETS = {"expert:wiki": (expert, "wiki"), "expert:math": (expert, "math"), "expert:novel": (expert, "novel"),
           "router": (router, ""), "sft": (sft, "")}
BUDGETS = {"expert:wiki": 5_000_000_000, "expert:math": 1_600_000_000, "expert:novel": 9_000_000_000,
           "router": 1_000_000_000, "sft": 1_000_000_000}


def stored_documents(store):
    meta = json.loads((store / "meta.json").read_text())
    tokens = np.fromfile(store / "tokens.bin", meta["dtype"])
    cuts = np.cumsum(np.fromfile(store / "lengths.bin", np.int32))[:-1]
    return [doc.tolist() for doc in np.split(tokens, cuts)]


def expected_documents(kind, expected):
    if kind == "pretrain":
        return [[TOK.bos_id] + ids + [TOK.eos_id] for ids in TOK.encode_batch(expected)]
    docs = []
    for instruction, input_text, output in expected:   # btx_jax/data/sft.py's default template
        prompt = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{input_text}\n\n" if input_text else "")
        prompt_ids, output_ids = TOK.encode_batch([prompt + "### Response:\n", output])
        docs.append([TOK.bos_id] + prompt_ids + output_ids + [TOK.eos_id])
    return docs


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sources_read_their_datasets_columns(preset, tmp_path):
    module, words = PRESETS[preset]
    c = module.get_config(words)
    assert TOK.chat_template is None   # the default template below
    expected = {}
    for source in c.data.sources:
        (tmp_path / source["name"]).mkdir()
        source["path"], expected[source["name"]] = FIXTURES[source["name"]](tmp_path / source["name"])
    c.data.cache_dir = str(tmp_path / "cache")
    results = prepare(c.data, TOK, held_out=False, progress=False)
    assert len(results) == len(c.data.sources)
    for source, (_, info) in zip(c.data.sources, results):
        got = stored_documents(tmp_path / "cache" / info["store"])
        assert got == expected_documents(c.data.kind, expected[source["name"]]), source["name"]


@pytest.mark.parametrize("preset", PRESETS)
def test_steps_follow_the_token_budget(preset):
    module, words = PRESETS[preset]
    c = module.get_config(words)
    assert (c.train.global_batch_size, c.train.seq_len) == (32, 4096)
    assert c.train.steps == BUDGETS[preset] // (32 * 4096)
    c.train.update(global_batch_size=8, seq_len=256)      # as --config.train.global_batch_size=8 etc. do
    assert c.train.steps == BUDGETS[preset] // (8 * 256)
    c.train.steps = 3                                    # an explicit step count replaces the budget
    c.train.global_batch_size = 4
    assert c.train.steps == 3


def test_where_keeps_matching_records_stored_and_streaming(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"q": f"q{i}", "is_correct": i % 2 == 0} for i in range(5)])
    source = Source.from_dict({"path": str(path), "where": {"is_correct": True}})
    assert list(load_records(source, cache_dir=str(tmp_path / "arrow"))["q"]) == ["q0", "q2", "q4"]
    assert [r["q"] for r in load_records(source, streaming=True)] == ["q0", "q2", "q4"]


def test_where_is_validated_and_names_a_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"question": "q", "is_correct": True}])
    for bad in ({}, {"is_correct": [True]}, "is_correct"):
        with pytest.raises(DataError, match=r"source 'm': where must map column names"):
            prepare({"sources": [{"name": "m", "path": str(path), "where": bad}]}, TOK, held_out=False)
    with pytest.raises(DataError, match=r"^source 'm': field 'correct' not in .*math.jsonl \(columns: question, "
                                        r"is_correct\)$"):
        prepare({"sources": [{"name": "m", "path": str(path), "text_field": "question", "where": {"correct": True}}],
                 "cache_dir": str(tmp_path / "cache")}, TOK, held_out=False, progress=False)
