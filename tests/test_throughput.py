"""btx_jax.train.throughput: steps timed in alternation, the matmul-peak probe, and the benchmarks' train step
(the one train() runs) on a random LoRA model: it trains exactly the phase's leaves.  Timings are never asserted."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from btx_jax import param_paths
from btx_jax.train import throughput
from btx_jax.configs.common import base_config

ARCH = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64)


def test_interleaved_alternates_and_times_every_step():
    calls = []
    times = throughput.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert calls == ["a", "b"] * 4                       # one warm-up round, then three timed rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and min(times["a"] + times["b"]) >= 0
    first = throughput.first_step(lambda: calls.append("c"))
    assert calls[-1] == "c" and first["compile_s"] >= 0 and first["step"] is not None


def test_matmul_peak_is_two_n_cubed_over_the_best_time():
    rates = throughput.matmul_peak(64, reps=3, warmup=1, others={"10ms": lambda: time.sleep(0.01)})
    assert set(rates) == {"xla", "10ms"} and rates["xla"] > 0
    assert 2 * 64**3 / 1.0 < rates["10ms"] <= 2 * 64**3 / 0.01          # FLOP/s of the best (>= 10 ms) call


def test_lora_step_trains_the_phase_leaves():
    """The router phase of a LoRA-MoE: routers and lm_head train; LoRA B (frozen) was shifted off zero."""
    out = throughput.lora_step(base_config(), "router", ARCH, rank=4, experts=3, top_k=2, global_batch_size=2,
                               seq_len=16, dtype="float32", frozen_dtype="float32", attention="xla")
    state = out["last"]["state"]
    before = {k: np.asarray(v) for k, v in param_paths.flatten(jax.device_get(state["trainable"])).items()}
    assert sorted(before) == ["layers/mlp/down_proj/router", "layers/mlp/gate_proj/router",
                              "layers/mlp/up_proj/router", "lm_head"]
    frozen_b = [np.asarray(v) for k, v in param_paths.flatten(state["frozen"]).items() if k.endswith("lora_b")]
    assert len(frozen_b) == 3 and all(np.all(b == np.float32(0.01)) for b in frozen_b)
    assert int(state["step"]) == 1 and np.isfinite(float(out["last"]["metrics"]["loss"]))
    out["step"]()
    state = out["last"]["state"]
    after = param_paths.flatten(jax.device_get(state["trainable"]))
    assert int(state["step"]) == 2 and any(not np.array_equal(before[k], after[k]) for k in before)


def test_cpu_threads_sets_the_threads_within_the_block_only(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with throughput.cpu_threads(3):
        assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=3"
        assert os.environ["OMP_NUM_THREADS"] == "3"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert os.environ["OMP_NUM_THREADS"] == "7"
