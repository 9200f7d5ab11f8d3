"""Grain loader: worker processes give the same stream; state resumes across worker and process counts."""

import json

import numpy as np

from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, load_tokenizer, make_pipeline

TOK = load_tokenizer(BUNDLED_TOKENIZER)
WIKI_VALID = dict(bundled_source("wiki", 0.3), path=bundled_source("wiki")["eval_path"])
CFG = {"sources": [bundled_source("math", 0.7), WIKI_VALID]}


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def make(process_index=0, process_count=1, **options):
    return make_pipeline(CFG | options, TOK, seq_len=64, global_batch_size=8, seed=5, process_index=process_index,
                         process_count=process_count)


def test_worker_process_gives_the_same_stream_and_state():
    threads, workers = make(), make(workers=1, read_ahead=1)
    expected = [next(threads) for _ in range(6)]
    got = [next(workers) for _ in range(3)]
    state = json.loads(json.dumps(workers.get_state()))
    assert state["workers"] == 1 and state["grain"] != make().get_state()["grain"]  # grain's own worker state
    got += [next(workers) for _ in range(3)]
    assert all(same(a, b) for a, b in zip(expected, got))
    resumed = make()  # another worker layout: continues from the global batch index
    resumed.set_state(state)
    assert all(same(next(resumed), b) for b in expected[3:])
    assert resumed.stats() == threads.stats()


def test_state_continues_with_another_process_count():
    single = make()
    for _ in range(4):
        next(single)
    state = json.loads(json.dumps(single.get_state()))
    procs = [make(process_index=i, process_count=2) for i in range(2)]
    for p in procs:
        p.set_state(state)
    for _ in range(3):
        full, parts = next(single), [next(p) for p in procs]
        assert same(full, {k: np.concatenate([parts[0][k], parts[1][k]]) for k in full})
    assert procs[0].stats() == procs[1].stats() == single.stats()
