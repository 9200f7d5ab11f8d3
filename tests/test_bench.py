"""scripts/bench.py and scripts/gpu_check.py: the model-FLOPs count against the model's parameter count, and
CPU smoke runs that produce both sides of each comparison (timings are printed, never asserted)."""
from __future__ import annotations

import json

import pytest

from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
from btx_jax.counting import leaf_counts
from conftest import load_script
from configs.common import ARCHS

TARGETS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


@pytest.mark.parametrize("phase", ["expert", "router", "sft"])
def test_model_flops_follow_the_parameter_count(bench, phase):
    arch, rank, experts, top_k, seq = ARCHS["bench"], 8, 3, 2, 64
    n_exp = 1 if phase == "expert" else experts
    spec = AdapterSpec(targets=TARGETS, experts=(ExpertSpec(rank=rank, alpha=16.0),) * n_exp,
                       router=phase != "expert", top_k=top_k if phase != "expert" else 1)
    counts = leaf_counts(LlamaConfig(**arch, adapter=spec))
    matmul = {p: n for p, n in counts.items() if not p.endswith("scale") and p != "embed_tokens"}
    lora = sum(n for p, n in matmul.items() if "/lora_" in p)
    n_all = sum(matmul.values()) - lora + lora * (top_k if phase != "expert" else 1) // n_exp  # active experts
    trainable = {"expert": lora,
                 "router": sum(n for p, n in matmul.items() if p.endswith("router") or p == "lm_head"),
                 "sft": sum(n for p, n in matmul.items() if "/attn/" in p or p.endswith("router") or p == "lm_head")}
    attn = 3 * 2 * seq * arch["num_heads"] * arch["head_dim"] * arch["num_layers"]
    expected = 4 * n_all + 2 * trainable[phase] + attn
    got = bench.model_flops_per_token(arch, seq, TARGETS, rank, experts, top_k, phase != "expert", phase)
    assert got == expected


def test_bench_smoke_both_sides_in_one_run(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--arch", "tiny", "--batch", "1", "--seq", "32", "--rank", "8", "--steps", "2",
                       "--warmup", "0", "--threads", "2", "--phases", "expert,router", "--out", str(out)]) == 0
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


def test_gpu_check_tiny_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert load_script("gpu_check").main(["--tiny", "--out", str(out)]) == 0
    assert "| expert |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["expert", "router"] and all(r["mfu"] > 0 for r in rows)
