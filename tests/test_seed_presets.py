"""The seed-scale presets read their datasets' real columns: every source of expert.py:wiki/math/novel, router.py
and sft.py, pointed (only `path` changed, as a user would) at tiny local copies with each dataset's schema
(docs/data.md, "The seed's datasets"), tokenises the columns it should and nothing else; train.steps
follows the token budget."""

import json

import numpy as np
import pytest

from btx_jax.data import BUNDLED_TOKENIZER, DataError, load_tokenizer, prepare
from btx_jax.data.sources import Source, load_records
from btx_jax.data.seed_corpora import FIXTURES, write_jsonl
from btx_jax.configs import expert, router, sft

TOK = load_tokenizer(BUNDLED_TOKENIZER)


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
