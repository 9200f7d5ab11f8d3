"""Evaluation: per-domain loss equals a cross-entropy computed with transformers on the same batches; routing
statistics of a LoRA-MoE; the BTX findings; the evaluate.py CLI report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from btx_jax import compose, evaluate, load_pretrained
from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, eval_batches, load_tokenizer
from conftest import hf_model

REPO = Path(__file__).resolve().parents[1]


def test_domain_loss_matches_transformers_cross_entropy(hf_llama):
    path = hf_llama(vocab_size=4096)
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    batches = list(eval_batches(bundled_source("math"), tok, 32, 4, 2))
    got = evaluate.evaluate_domain(load_pretrained(path), batches)
    model, ce_sum, n = hf_model(path), 0.0, 0.0
    for b in batches:
        # packed rows: run each document (segment) alone through transformers
        for r in range(b["inputs"].shape[0]):
            for seg in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                idx = b["segment_ids"][r] == seg
                logits = model(torch.as_tensor(b["inputs"][r][idx][None], dtype=torch.long)).logits[0]
                ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(b["targets"][r][idx], dtype=torch.long),
                                                       reduction="none").detach().numpy()
                ce_sum += float(np.sum(ce * b["loss_mask"][r][idx]))
                n += float(np.sum(b["loss_mask"][r][idx]))
    assert got["tokens"] == int(n)
    np.testing.assert_allclose(got["loss"], ce_sum / n, rtol=1e-5)
    assert got["routing"] == {}


def test_routing_rows_are_gate_weights(hf_llama, tmp_path):
    base = load_pretrained(hf_llama(vocab_size=4096))
    experts = []
    for i in range(3):
        from btx_jax.pretrained import memory_source
        from btx_jax.train.model_init import lora_spec, with_fresh_lora
        e = with_fresh_lora(memory_source(base), lora_spec({"rank": 4, "alpha": 8.0}), seed=i).load()
        e.save_pretrained(tmp_path / f"e{i}", format="btx")
        experts.append(str(tmp_path / f"e{i}"))
    moe = compose(base, experts, top_k=2)
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    r = evaluate.evaluate_domain(moe, eval_batches(bundled_source("wiki"), tok, 32, 4, 1))
    for target, rows in r["routing"].items():
        np.testing.assert_allclose(np.sum(rows, axis=-1), 1.0, rtol=1e-5)
    m = evaluate.routing_matrix({d: r for d in ("wiki", "math")}, ["wiki", "math"])
    assert m.shape == (2, 3)


def test_btx_findings_flags():
    res = {"seed": {"a": {"loss": 2.0}, "b": {"loss": 2.0}},
           "ea": {"a": {"loss": 1.5}, "b": {"loss": 2.5}},
           "eb": {"a": {"loss": 2.5}, "b": {"loss": 2.1}},
           "moe": {"a": {"loss": 1.52}, "b": {"loss": 2.3}}}
    routing = np.array([[0.7, 0.3], [0.6, 0.4]])
    _, checks = evaluate.btx_findings(res, ["a", "b"], "seed", {"a": "ea", "b": "eb"}, "moe", routing)
    assert checks == {"ea beats seed on a": True, "eb beats seed on b": False,
                      "moe within 5% of best expert on a": True, "moe within 5% of best expert on b": False,
                      "a tokens go mostly to expert ea": True, "b tokens go mostly to expert eb": False}


def test_evaluate_cli_writes_report(hf_llama, tmp_path):
    path = hf_llama(vocab_size=4096)
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--model", f"tiny={path}", "--domains", "math",
                           "--max-batches", "1", "--seq-len", "32", "--batch-size", "2", "--prompt", "Question:",
                           "--max-new-tokens", "4", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "| tiny |" in report and "Question:" in report
    assert json.loads((out / "results.json").read_text())["tiny"]["math"]["tokens"] > 0
    bad = subprocess.run([sys.executable, "scripts/evaluate.py", "--model", f"x={tmp_path / 'missing'}",
                          "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
