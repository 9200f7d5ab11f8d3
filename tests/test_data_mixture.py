"""Mixture: realised ratios follow the spec; sources are told apart by their tokens."""

import numpy as np
import pytest

from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer, make_pipeline, mixture_config

TOK = load_tokenizer(BUNDLED_TOKENIZER)


def letter_sources(tmp_path, ratios):
    """One source per letter; each document is the letter repeated, so every token tells its source."""
    sources = []
    for letter, ratio in ratios.items():
        path = tmp_path / f"{letter}.txt"
        path.write_text((letter * 40 + "\n") * 30, encoding="utf-8")
        sources.append({"name": letter, "path": str(path), "ratio": ratio})
    return {"kind": "pretrain", "add_bos": False, "add_eos": False, "sources": sources}


@pytest.mark.parametrize("seed", [0, 1])
def test_realised_ratios_within_two_points(tmp_path, seed):
    ratios = {"a": 0.5, "k": 0.3, "z": 0.2}
    p = make_pipeline(letter_sources(tmp_path, ratios), TOK, seq_len=16, global_batch_size=50, seed=seed)
    token_source = {t: letter for letter in ratios for t in TOK.encode(letter * 40)}
    counts = dict.fromkeys(ratios, 0)
    for _ in range(60):  # 3,000 sequences
        for row in next(p)["inputs"]:
            (letter,) = {token_source[t] for t in row}
            counts[letter] += 1
    total = sum(counts.values())
    stats = p.stats()
    for letter, r in ratios.items():
        assert abs(counts[letter] / total - r) < 0.02
        assert stats["realised_ratios"][letter] == counts[letter] / total
        assert stats["target_ratios"][letter] == pytest.approx(r)


def test_zero_ratio_source_never_sampled_and_seed_changes_order(tmp_path):
    cfg = letter_sources(tmp_path, {"a": 1.0, "k": 3.0, "z": 0.0})
    p0 = make_pipeline(cfg, TOK, seq_len=16, global_batch_size=16, seed=0)
    p1 = make_pipeline(cfg, TOK, seq_len=16, global_batch_size=16, seed=1)
    b0, b1 = next(p0), next(p1)
    assert p0.stats()["rows"] == p1.stats()["rows"] == {"a": 4, "k": 12, "z": 0}
    assert not np.array_equal(b0["inputs"], b1["inputs"])


def test_bundled_domains_mixture():
    p = make_pipeline(mixture_config({"wiki": 0.4, "math": 0.4, "novel": 0.2}), TOK, seq_len=128, global_batch_size=20)
    for _ in range(10):
        next(p)
    stats = p.stats()
    assert stats["realised_ratios"] == {"wiki": 0.4, "math": 0.4, "novel": 0.2}
    assert stats["packing_efficiency"] == 1.0
    assert all(0 < e < 1 for e in stats["epochs"].values())
