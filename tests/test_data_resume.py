"""Resume from saved state, multi-process sharding, epochs, evaluation batches."""

import json

import numpy as np
import pytest
from data_checks import check_resume

from btx_jax.data import (
    BUNDLED_TOKENIZER,
    DataError,
    bundled_source,
    eval_batches,
    load_tokenizer,
    make_pipeline,
    measure_throughput,
    mixture_config,
)

TOK = load_tokenizer(BUNDLED_TOKENIZER)
CONFIGS = {
    # small novel valid split so the stream crosses several epochs within the test
    "pretrain": mixture_config({"math": 0.6, "novel": 0.4})
    | {
        "sources": [
            bundled_source("math", 0.6),
            dict(bundled_source("novel", 0.4), path=bundled_source("novel")["eval_path"]),
        ]
    },
    "sft": {"kind": "sft", "sources": [dict(bundled_source("sft"), path=bundled_source("sft")["eval_path"])]},
}


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resume_continues_exactly(kind):
    make = lambda: make_pipeline(CONFIGS[kind], TOK, seq_len=128, global_batch_size=16, seed=7)
    straight, _, _ = check_resume(make, total=40, at=25)
    assert max(straight.stats()["epochs"].values()) > 1  # the test crossed an epoch boundary


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_two_processes_make_the_global_batch(kind):
    single = make_pipeline(CONFIGS[kind], TOK, seq_len=64, global_batch_size=8, seed=1)
    procs = [
        make_pipeline(CONFIGS[kind], TOK, seq_len=64, global_batch_size=8, seed=1, process_index=i, process_count=2)
        for i in range(2)
    ]
    for _ in range(6):
        full = next(single)
        parts = [next(p) for p in procs]
        assert all(p["inputs"].shape == (4, 64) for p in parts)
        assert same(full, {k: np.concatenate([parts[0][k], parts[1][k]]) for k in full})
    assert procs[0].get_state() == procs[1].get_state() == single.get_state()


def test_state_mismatch_rejected():
    p = make_pipeline(CONFIGS["pretrain"], TOK, seq_len=64, global_batch_size=8)
    state = p.get_state()
    other = make_pipeline(CONFIGS["pretrain"], TOK, seq_len=64, global_batch_size=8, seed=1)
    with pytest.raises(DataError, match="seed"):
        other.set_state(state)


def test_eval_batches_deterministic_and_complete():
    src = bundled_source("math")
    a = list(eval_batches(src, TOK, seq_len=128, batch_size=8, max_batches=100))
    b = list(eval_batches(src, TOK, seq_len=128, batch_size=8, max_batches=100))
    assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    with open(src["eval_path"], encoding="utf-8") as f:
        n_tokens = sum(len(TOK.encode(src["template"].format(**json.loads(line)))) + 2 for line in f)
    real = sum(int((x["segment_ids"] > 0).sum()) for x in a)
    rows = sum(int((x["segment_ids"] > 0).any(axis=1).sum()) for x in a)
    # rows hold seq_len + 1 consecutive tokens; the last one of every full row is only a target
    assert real == n_tokens - (rows - 1)
    assert a[-1]["segment_ids"][-1].max() == 0  # padded tail
    assert len(list(eval_batches(src, TOK, 128, 8, max_batches=3))) == 3


def test_measure_throughput():
    p = make_pipeline(CONFIGS["pretrain"], TOK, seq_len=128, global_batch_size=16)
    result = measure_throughput(p, num_batches=5)
    assert result["tokens"] == 5 * 16 * 128 and result["tokens_per_s"] > 0
    assert p.get_state()["batch_index"] == 7
