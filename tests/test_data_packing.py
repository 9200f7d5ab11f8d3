"""Packing: every token once and in order, segment ids, positions, EOS separators, loss mask."""

import json

import numpy as np
import pytest

from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, load_tokenizer, make_pipeline

TOK = load_tokenizer(BUNDLED_TOKENIZER)
SEQ = 64


def math_docs(add_bos=True):
    src = bundled_source("math")
    with open(src["eval_path"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    texts = [src["template"].format(**r) for r in records]
    return [([TOK.bos_id] if add_bos else []) + TOK.encode(t) + [TOK.eos_id] for t in texts]


def pipeline(**options):
    src = dict(bundled_source("math"), path=bundled_source("math")["eval_path"])
    cfg = {"kind": "pretrain", "sources": [src], **options}
    return make_pipeline(cfg, TOK, seq_len=SEQ, global_batch_size=8, seed=3)


def stream_rows(p, n_tokens):
    """Consecutive rows as one token stream (inputs + the last target of each row)."""
    rows = []
    while sum(len(r) for r in rows) < n_tokens:
        b = next(p)
        rows += [np.concatenate([i, t[-1:]]) for i, t in zip(b["inputs"], b["targets"])]
    return np.concatenate(rows)[:n_tokens], b


def test_every_token_once_in_order_without_shuffle():
    docs = math_docs()
    expected = np.concatenate(docs)
    stream, _ = stream_rows(pipeline(shuffle=False), len(expected) + 3 * (SEQ + 1))
    np.testing.assert_array_equal(stream[: len(expected)], expected)
    # the stream goes on into the next epoch: nothing dropped at the epoch boundary
    np.testing.assert_array_equal(stream[len(expected) :], expected[: len(stream) - len(expected)])


def test_shuffled_epoch_is_a_permutation_of_documents():
    docs = math_docs()
    stream, _ = stream_rows(pipeline(shuffle=True), sum(map(len, docs)))
    cuts = np.flatnonzero(stream == TOK.eos_id) + 1
    got = [tuple(x) for x in np.split(stream, cuts) if len(x)]
    assert sorted(got) == sorted(tuple(d) for d in docs)
    assert got != [tuple(d) for d in docs]  # really shuffled


@pytest.mark.parametrize("add_bos", [True, False])
def test_segment_ids_positions_and_loss_mask(add_bos):
    p = pipeline(add_bos=add_bos)
    for _ in range(5):
        b = next(p)
        assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
            "inputs": (np.int32, (8, SEQ)),
            "targets": (np.int32, (8, SEQ)),
            "loss_mask": (np.float32, (8, SEQ)),
            "segment_ids": (np.int32, (8, SEQ)),
            "positions": (np.int32, (8, SEQ)),
        }
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for inp, tgt, seg, pos, mask in zip(
            b["inputs"], b["targets"], b["segment_ids"], b["positions"], b["loss_mask"]
        ):
            # EOS is the last token of its document: a new segment starts right after each EOS
            is_eos = inp == TOK.eos_id
            expected_seg = 1 + np.concatenate([[0], np.cumsum(is_eos)[:-1]])
            np.testing.assert_array_equal(seg, expected_seg)
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])))
            expected_pos = np.arange(SEQ) - starts[np.searchsorted(starts, np.arange(SEQ), side="right") - 1]
            np.testing.assert_array_equal(pos, expected_pos)
            np.testing.assert_array_equal(mask, (~is_eos).astype(np.float32))  # never predict the next doc
            if add_bos:
                np.testing.assert_array_equal(inp[starts[1:]], TOK.bos_id)


def test_segments_off_is_plain_constant_length_packing():
    b_on, b_off = next(pipeline(segment_ids=True)), next(pipeline(segment_ids=False))
    np.testing.assert_array_equal(b_on["inputs"], b_off["inputs"])
    assert (b_off["segment_ids"] == 1).all() and (b_off["loss_mask"] == 1).all()
    np.testing.assert_array_equal(b_off["positions"], np.broadcast_to(np.arange(SEQ), (8, SEQ)))


def test_long_documents_are_split_across_rows():
    src = bundled_source("novel")  # one document per file, far longer than a row
    p = make_pipeline({"sources": [src], "shuffle": False}, TOK, seq_len=SEQ, global_batch_size=4)
    b = next(p)
    assert (b["segment_ids"] == 1).all()  # each row is a piece of the first novel
    assert (b["positions"] == np.arange(SEQ)).all()
    assert p.stats()["packing_efficiency"] == 1.0
