"""Tokenised store: built once and reused, resumable after a kill, refuses another tokenizer, hub layouts."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from btx_jax.data import (BUNDLED_TOKENIZER, DataError, bundled_source, eval_batches, load_tokenizer, make_pipeline,
                          prepare)
from btx_jax.data import store as store_lib

TOK = load_tokenizer(BUNDLED_TOKENIZER)
REPO = Path(__file__).resolve().parents[1]


def wiki_copy(tmp_path, n_docs=None):
    """A local jsonl corpus (the bundled wiki train split, optionally cut)."""
    lines = Path(bundled_source("wiki")["path"]).read_text(encoding="utf-8").splitlines()[:n_docs]
    path = tmp_path / "wiki.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [json.loads(line)["text"] for line in lines]


def store_dir(cfg, source_index=0):
    (_, info), *_ = prepare(cfg, TOK, held_out=False, progress=False)[source_index:]
    return Path(info["store"])


def test_store_holds_every_document_in_order(tmp_path):
    path, texts = wiki_copy(tmp_path)
    cfg = {"sources": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache"), "shard_mb": 0.2}
    store = store_dir(cfg)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["documents"] == len(texts) and len(list((store / "shards").glob("*.json"))) > 2
    tokens = np.fromfile(store / "tokens.bin", meta["dtype"])
    expected = np.concatenate([[TOK.bos_id] + ids + [TOK.eos_id] for ids in TOK.encode_batch(texts)])
    np.testing.assert_array_equal(tokens, expected)
    assert not (store / "arrow").exists() and not (store / "tmp").exists()  # intermediates removed


def test_second_run_reuses_the_store(tmp_path, monkeypatch):
    path, _ = wiki_copy(tmp_path, 200)
    cfg = {"sources": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache")}
    first = next(make_pipeline(cfg, TOK, seq_len=64, global_batch_size=4, seed=2))
    monkeypatch.setattr(store_lib, "build_store", lambda *a, **k: pytest.fail("store rebuilt"))
    second = next(make_pipeline(cfg, TOK, seq_len=64, global_batch_size=4, seed=2))
    assert all(np.array_equal(first[k], second[k]) for k in first)


_KILLED_BUILD = """
import os, signal, sys
from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer, prepare
from btx_jax.data import store

real = store._tokenize_shard
def dies_in_shard_2(pool, lo, hi, path, index, *args):
    if index == 2:  # half-written data of the killed shard is left behind in the flat files
        with open(path / "tokens.bin", "ab") as f:
            f.write(b"\\x07" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(pool, lo, hi, path, index, *args)
store._tokenize_shard = dies_in_shard_2
prepare({"sources": [{"path": sys.argv[1]}], "cache_dir": sys.argv[2], "shard_mb": 0.2},
        load_tokenizer(BUNDLED_TOKENIZER), held_out=False, progress=False)
"""


def test_killed_build_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    path, _ = wiki_copy(tmp_path)
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(path), str(cache)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert killed.returncode == -9
    (store,) = [p for p in cache.glob("wiki-*") if p.is_dir()]
    assert not (store / "meta.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (store / "shards").glob("*.json")}
    assert sorted(finished) == ["00000.json", "00001.json"]

    redone = []
    real = store_lib._tokenize_shard
    monkeypatch.setattr(store_lib, "_tokenize_shard", lambda pool, lo, hi, p, i, *a: redone.append(i) or real(pool, lo, hi, p, i, *a))
    cfg = {"sources": [{"path": str(path)}], "cache_dir": str(cache), "shard_mb": 0.2}
    assert store_dir(cfg) == store
    n_shards = len(json.loads((store / "store.json").read_text())["shards"])
    assert redone == list(range(2, n_shards))
    assert {p: (store / "shards" / p).stat().st_mtime_ns for p in finished} == finished

    fresh = store_dir(dict(cfg, cache_dir=str(tmp_path / "fresh")))
    for name in ("tokens.bin", "lengths.bin"):
        assert (store / name).read_bytes() == (fresh / name).read_bytes()
    a = make_pipeline(cfg, TOK, seq_len=128, global_batch_size=8, seed=1)
    b = make_pipeline(dict(cfg, cache_dir=str(tmp_path / "fresh")), TOK, seq_len=128, global_batch_size=8, seed=1)
    for _ in range(5):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_stores_are_keyed_by_tokenizer(tmp_path):
    """Training and evaluation stores of the same source: another tokenizer builds its own store beside the
    first (not refused), and each records the tokenizer that built it."""
    path, _ = wiki_copy(tmp_path, 50)
    cfg = {"sources": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache")}
    other = copy.copy(TOK)
    other.fingerprint = "0123456789abcdef"
    for tok in (TOK, other, TOK):
        make_pipeline(cfg, tok, seq_len=32, global_batch_size=2)
        next(eval_batches({"path": str(path)}, tok, 32, 2, 1, cache_dir=tmp_path / "eval"))
    for cache in ("cache", "eval"):
        built = sorted(json.loads(m.read_text())["tokenizer"] for m in (tmp_path / cache).glob("*/store.json"))
        assert built == sorted([TOK.fingerprint, "0123456789abcdef"]), cache


def hub_layout(tmp_path, texts):
    """A local copy of a hub dataset: README.md `configs:` + one data folder per subset."""
    root = tmp_path / "wikimedia" / "wikipedia"
    (root / "20231101.ja").mkdir(parents=True)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: 20231101.ja\n  data_files:\n  - split: train\n"
        "    path: 20231101.ja/train-*\n---\n",
        encoding="utf-8",
    )
    rows = "".join(json.dumps({"id": str(i), "title": "t", "text": t}, ensure_ascii=False) + "\n"
                   for i, t in enumerate(texts))
    (root / "20231101.ja" / "train-00000-of-00001.jsonl").write_text(rows, encoding="utf-8")
    return root


def test_hub_layout_path_subset_and_shorthand(tmp_path):
    path, texts = wiki_copy(tmp_path, 40)
    root = hub_layout(tmp_path, texts)
    cache = str(tmp_path / "cache")
    batches = []
    for src in ({"path": str(path)}, {"path": str(root), "subset": "20231101.ja"}, {"path": f"{root}:20231101.ja"}):
        p = make_pipeline({"sources": [dict(src, name="w")], "cache_dir": cache, "shuffle": False}, TOK,
                          seq_len=64, global_batch_size=4)
        batches.append(next(p)["inputs"])
    np.testing.assert_array_equal(batches[0], batches[1])
    np.testing.assert_array_equal(batches[0], batches[2])


def test_unresolvable_hub_name_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'nosuch-org/nosuch' subset 'x'.*offline") as e:
        make_pipeline({"sources": [{"path": "nosuch-org/nosuch:x"}], "cache_dir": str(tmp_path)}, TOK, seq_len=32,
                      global_batch_size=2)
    assert "\n" not in str(e.value)


def test_token_file_reads_like_the_array(tmp_path):
    """Stores are read with positional reads, not memory-mapped (mapped pages count in RSS)."""
    import pickle

    values = np.random.default_rng(0).integers(0, 4096, 10_000).astype(np.uint16)
    values.tofile(tmp_path / "tokens.bin")
    tokens = store_lib.TokenFile(tmp_path / "tokens.bin", "uint16", len(values))
    runs = np.concatenate([np.arange(5, 300), np.arange(9_000, 9_999), [0, 7, 7, 3], np.arange(100, 40, -1)])
    for index in (runs, runs[:1356].reshape(-1, 4), np.zeros(0, np.int64), np.arange(10_000)):
        np.testing.assert_array_equal(tokens[index], values[index])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokens))[runs], values[runs])
    with pytest.raises(IndexError):
        tokens[np.array([10_000])]
    with pytest.raises(DataError, match=r"tokens\.bin is shorter than its meta\.json says"):
        store_lib.TokenFile(tmp_path / "tokens.bin", "uint16", len(values) + 5)[np.array([10_002])]
