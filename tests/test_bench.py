"""scripts/bench.py and scripts/gpu_check.py: CPU smoke runs (as a user runs them) that produce both sides of each
comparison; timings are printed, never asserted.  The model-FLOPs count they use is tested in test_counting.py,
their steps and timing in test_throughput.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("XLA_FLAGS", None)                  # one CPU device, as a user's run has
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow       # minutes on 2 cores: outside the default run (`pytest -m slow`)
def test_bench_smoke_both_sides_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    _script("bench.py", "--arch", "tiny", "--batch", "1", "--seq", "32", "--rank", "8", "--steps", "2",
            "--warmup", "0", "--threads", "2", "--phases", "expert,router", "--out", str(out))
    data = json.loads(out.read_text())
    impls = {(r["phase"], r["impl"]) for r in data["rows"]}
    assert impls == {("expert", "btx_jax"), ("expert", "HF+PEFT"), ("router", "btx_jax"), ("router", "mergoo-style")}
    for r in data["rows"]:
        assert len(r["times"]) == 2 and r["step_s"] > 0 and 0 < r["mfu"]
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
    ours = [r for r in data["rows"] if r["impl"] == "btx_jax"]
    assert all(any(k.startswith("speedup_vs_") for k in r) for r in ours)
    assert data["peak"]["peak_gflops"] >= max(data["peak"]["xla_gflops"], data["peak"]["torch_gflops"]) > 0
    assert data["data_pipeline"]["tokens_per_s"] > 0
    assert set(data["attention_ms"]) == {"btx_jax blocked", "btx_jax xla", "torch sdpa"}


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _script("gpu_check.py", "--tiny", "--out", str(out))
    assert "| expert |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["expert", "router"] and all(r["mfu"] > 0 for r in rows)
