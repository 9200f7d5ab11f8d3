"""Downstream scores through lm-evaluation-harness for several models (a directory and a loaded model give the
same numbers), the headline metric of each task, and the report's table and bar chart."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")

from btx_jax import load_pretrained  # noqa: E402
from btx_jax.eval import downstream  # noqa: E402
from llama2c import tok512_hf  # noqa: E402


def test_headline_picks_accuracy_then_exact_match():
    assert downstream.headline({"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.1}) == ("acc", 0.25, 0.1)
    gsm = {"exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.2,
           "exact_match,strict-match": 0.0, "exact_match_stderr,strict-match": 0.0}
    assert downstream.headline(gsm) == ("exact_match,strict-match", 0.0, 0.0)
    with pytest.raises(ValueError):
        downstream.headline({"alias": "x"})


def test_run_tasks_table_and_chart(hf_llama, tmp_path):
    model = hf_llama(vocab_size=512, max_position_embeddings=192)
    tok = tok512_hf(tmp_path / "tok")
    scores = downstream.run_tasks({"dir": str(model), "loaded": load_pretrained(model)},
                                  ["btx_jcommonsenseqa", "btx_gsm8k"], tokenizer=str(tok), limit=2, batch_size=4,
                                  max_gen_toks=8, builtin_tasks=False)
    assert scores["dir"] == scores["loaded"]
    jcqa, gsm = scores["dir"]["btx_jcommonsenseqa"], scores["dir"]["btx_gsm8k"]
    assert jcqa["metric"] == "acc" and jcqa["n"] == 2 and jcqa["value"] in (0.0, 0.5, 1.0)
    assert gsm["metric"] == "exact_match,strict-match" and gsm["n"] == 2
    lines = downstream.report_section(scores, tmp_path, note="near chance on a random model")
    assert (tmp_path / "downstream.png").stat().st_size > 1000
    table = lines[0]
    assert "| dir |" in table and "| loaded |" in table and "±" in table and "n=2" in table
    assert "Chance level: btx_jcommonsenseqa: 20%." in lines and lines[-1] == "near chance on a random model"
