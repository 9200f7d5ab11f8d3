"""Evaluation: per-domain loss equals a cross-entropy computed with transformers on the same batches; models are
evaluated one at a time, sharded, in the dtype asked for; routing statistics of a LoRA-MoE; the BTX findings;
the `btx evaluate` report, its cache dir, its refusal of unknown tasks and its partial results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from btx_jax import LoraMoESpec, compose, load_pretrained, mesh as mesh_lib, param_paths
from btx_jax.cli import evaluate as evaluate_cli
from btx_jax.eval import evaluate
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
    moe = compose(base, experts, LoraMoESpec(top_k=2))
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
                           "--max-new-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "| tiny |" in report and "Question:" in report
    assert json.loads((out / "results.json").read_text())["tiny"]["math"]["tokens"] > 0
    assert list((tmp_path / "cache").rglob("*")), "--cache-dir holds the evaluation store"
    bad = subprocess.run([sys.executable, "scripts/evaluate.py", "--model", f"x={tmp_path / 'missing'}",
                          "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_models_are_evaluated_one_at_a_time_sharded_in_the_dtype_asked(hf_llama, monkeypatch):
    """Three models: the live device bytes while any one is evaluated stay about one model's (all three kept
    would be three times that); each is sharded over the 8 devices of the mesh an accelerator host gets (on CPU
    `inference_mesh` is one device: test_inference_mesh_is_one_device_on_cpu) in bfloat16; the losses are the
    fp32 single-device ones within bf16 precision."""
    monkeypatch.setattr(mesh_lib, "inference_mesh", lambda: mesh_lib.make_mesh({"fsdp": -1}, jax.local_devices()))
    paths = {f"m{i}": hf_llama(seed=i, vocab_size=4096) for i in range(3)}
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    domains = {"math": bundled_source("math")}
    one = sum(x.nbytes for x in jax.tree_util.tree_leaves(load_pretrained(paths["m0"], dtype="bfloat16").params))
    seen, real = [], evaluate.evaluate_domain

    def recording(pre, batches):
        leaves = jax.tree_util.tree_leaves(pre.params)
        embed = param_paths.flatten(pre.params)["embed_tokens"]
        seen.append((_live_bytes() - base, {x.dtype for x in leaves}, len(embed.sharding.device_set),
                     embed.addressable_shards[0].data.shape, embed.shape))
        return real(pre, batches)
    monkeypatch.setattr(evaluate, "evaluate_domain", recording)
    base = _live_bytes()
    got = evaluate.evaluate_models(paths, domains, tok, seq_len=32, batch_size=8, max_batches=1, dtype="bfloat16")
    assert len(seen) == 3
    for live, dtypes, devices, shard, shape in seen:
        assert live < 1.3 * one, (live, one)          # the other two models are not held
        assert dtypes == {np.dtype(jax.numpy.bfloat16)} and devices == 8 and np.prod(shard) * 8 == np.prod(shape)
    monkeypatch.setattr(evaluate, "evaluate_domain", real)
    for name, path in paths.items():
        want = real(load_pretrained(path), eval_batches(domains["math"], tok, 32, 8, 1))["loss"]
        np.testing.assert_allclose(got[name]["math"]["loss"], want, rtol=2e-2)


def test_evaluate_refuses_unknown_task_before_any_model_runs(hf_llama, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr(evaluate_cli, "evaluate_models", lambda *a, **k: pytest.fail("a model ran"))
    model = hf_llama(vocab_size=4096)
    capsys.readouterr()                 # transformers' progress bars, when this test builds the model
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--model", f"m={model}", "--tasks", "btx_gsm8kk", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "'btx_gsm8kk'" in err[0] and "did you mean 'btx_gsm8k'" in err[0] and "btx_jcommonsenseqa" in err[0]
    assert not (tmp_path / "out").exists()


def test_results_of_finished_models_survive_a_later_crash(hf_llama, tmp_path, monkeypatch):
    """results.json is rewritten as each model completes: a crash on the second model keeps the first's."""
    real, calls = evaluate.evaluate_domain, []

    def crashing(pre, batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(pre, batches)
    monkeypatch.setattr(evaluate, "evaluate_domain", crashing)
    path = hf_llama(vocab_size=4096)
    with pytest.raises(RuntimeError, match="went away"):
        evaluate_cli.main(["--model", f"a={path}", "--model", f"b={path}", "--domains", "math", "--max-batches", "1",
                           "--seq-len", "32", "--batch-size", "2", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved) == ["a"] and saved["a"]["math"]["tokens"] > 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]     # no temporary left


def test_downstream_scores_of_finished_tasks_survive_a_later_crash(hf_llama, tmp_path, monkeypatch):
    """--tasks through the lm-eval backend on the model evaluate.py loaded (sharded over 8 devices):
    downstream.json is rewritten after each task, so a crash in the second task keeps the first's score."""
    pytest.importorskip("lm_eval")
    from btx_jax.eval import downstream

    real, seen = downstream.run_tasks, []

    def crashing(models, tasks, **kw):
        seen.append(tasks)
        if len(seen) == 2:
            raise RuntimeError("the machine went away")
        return real(models, tasks, **kw)
    monkeypatch.setattr(downstream, "run_tasks", crashing)
    with pytest.raises(RuntimeError, match="went away"):
        evaluate_cli.main(["--model", f"a={hf_llama(vocab_size=4096)}", "--domains", "math", "--max-batches", "1",
                           "--seq-len", "32", "--batch-size", "2", "--tasks", "btx_jcommonsenseqa,btx_gsm8k",
                           "--limit", "2", "--max-gen-toks", "4", "--out", str(tmp_path / "out")])
    assert seen == [["btx_jcommonsenseqa"], ["btx_gsm8k"]]
    scores = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert list(scores) == ["a"] and list(scores["a"]) == ["btx_jcommonsenseqa"]
    assert scores["a"]["btx_jcommonsenseqa"]["n"] == 2 and 0.0 <= scores["a"]["btx_jcommonsenseqa"]["value"] <= 1.0


def test_importing_and_plotting_leave_the_matplotlib_backend_alone(tmp_path):
    """btx_jax.eval.evaluate imports no matplotlib; the report's plots use their own Agg canvas, never pyplot."""
    code = ("import sys, numpy as np, btx_jax.eval.evaluate\n"
            "assert 'matplotlib' not in sys.modules\n"
            "from btx_jax.eval import report\n"
            f"out = report.plot_routing_heatmap(np.eye(2), ['a', 'b'], ['e0', 'e1'], {str(tmp_path / 'h.png')!r})\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "import matplotlib\n"
            "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.rcParams._get_backend_or_none()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"}, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
