"""Train-step throughput, measured the way scripts/bench.py, bench_moe.py and gpu_check.py compare it: a phase's
jitted train step (the one train() runs, from `wire`) on a random model and a random batch on one device, the
steps of several implementations timed in alternation, and the matmul peak measured in the same run.

    with cpu_threads(2): run(args)       # a CPU benchmark's main: same intra-op threads for XLA and torch
    peak = matmul_peak(2048, "float32", others={"torch": lambda: torch.mm(t, t)})     # {"xla": FLOP/s, "torch": ...}
    ours = lora_step(base_config(), "router", arch, rank=64, experts=3, top_k=2, global_batch_size=4, seq_len=512)
    ours = phase_step(base_config(), "full", config, params, global_batch_size=4, seq_len=512)   # any LlamaConfig
    times = interleaved({"btx_jax": ours["step"], "torch": torch_step}, warmup=1, steps=5)   # {impl: [seconds]}

Timing in alternation (one step of each implementation per round) lets drifts in a shared machine's speed hit
every side of a comparison alike.  Model FLOPs per token (MFU's numerator) are btx_jax/counting.py's.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp

from btx_jax.config import MLP_TARGETS, AdapterSpec, ExpertSpec, LlamaConfig
from btx_jax.data.packing import FIELDS
from btx_jax.data.synthetic import SyntheticPipeline
from btx_jax.model import init_params
from btx_jax.pretrained import Pretrained, memory_source
from btx_jax.train.aot import process_settings
from btx_jax.train.trainer import initial_state, resolved, wire


def cpu_threads(n: int):
    """Context manager for a CPU benchmark's entry point: the same intra-op thread count for XLA and torch
    within it (enter it before JAX starts a backend and before torch is imported); JAX runs on the CPU unless
    JAX_PLATFORMS says otherwise.  The previous settings come back after it."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "host_platform_device_count" not in f and "intra_op_parallelism" not in f]
    env = {"XLA_FLAGS": " ".join(flags + ["--xla_cpu_multi_thread_eigen=true", f"intra_op_parallelism_threads={n}"]),
           "OMP_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    return process_settings(env, os.environ.get("JAX_PLATFORMS") or "cpu")


def first_step(step: Callable[[], object]) -> dict:
    """Run (and for JAX compile) the first step: {"step": the step callable, "compile_s": its time}."""
    tic = time.perf_counter()
    step()
    return {"step": step, "compile_s": time.perf_counter() - tic}


def interleaved(steps_by_impl: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each step per implementation, the implementations alternating step by step (after `warmup`
    untimed rounds)."""
    for _ in range(warmup):
        for fn in steps_by_impl.values():
            fn()
    times = {impl: [] for impl in steps_by_impl}
    for _ in range(steps):
        for impl, fn in steps_by_impl.items():
            tic = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - tic)
    return times


def matmul_peak(n: int, dtype: str = "float32", *, reps: int = 5, warmup: int = 2,
                others: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """FLOP/s of an [n, n] x [n, n] matmul (2 n^3 FLOPs), the best of `reps` after `warmup`: XLA's ("xla", jitted
    on the default device, in `dtype`) and each of `others` ({name: a callable doing the same matmul to the
    end}), interleaved.  MFU is taken against the best of them."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: x @ y)
    times = interleaved({"xla": lambda: mm(a, a).block_until_ready(), **(others or {})}, warmup, reps)
    return {name: 2.0 * n ** 3 / min(t) for name, t in times.items()}


def lora_model(arch: dict, phase: str, *, rank: int, experts: int, top_k: int,
               targets=MLP_TARGETS) -> tuple[LlamaConfig, dict]:
    """A random Llama of `arch` with LoRA (rank, alpha 2 rank) on `targets`: one expert for the `expert` phase,
    else `experts` LoRA experts under a top-k router.  LoRA B is shifted off zero so that no product is
    trivially skippable."""
    expert = ExpertSpec(rank=rank, alpha=2.0 * rank)
    spec = (AdapterSpec(targets=targets, experts=(expert,)) if phase == "expert" else
            AdapterSpec(targets=targets, experts=(expert,) * experts, router=True, top_k=top_k))
    config = LlamaConfig(**arch, adapter=spec)
    params = init_params(config, jax.random.PRNGKey(0))
    return config, jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(kp) else x, params)


def random_batch(vocab: int, batch: int, seq: int, sharding) -> dict:
    """One packed-format batch of random tokens (a segment per row), placed with `sharding`."""
    rows = next(SyntheticPipeline(vocab_size=vocab, seq_len=seq, global_batch_size=batch, seed=1))
    return {k: jax.device_put(rows[k], sharding) for k in FIELDS}


def phase_step(base, phase: str, config: LlamaConfig, params: dict, **train) -> dict:
    """The train step of `phase` on one device, starting from `params` of `config`, on one random batch.

    `base` is a training config (configs/common.py base_config(); updated in place), `train` overrides its
    `train` section (global_batch_size, seq_len, dtype, remat, attention, ...).  Returns first_step's dict (the
    first step has run) plus "last": {"state", "metrics"} of the latest step."""
    base.phase = phase
    base.mesh.update(dict(data=1, fsdp=1, tensor=1, num_devices=1))
    base.train.update(train)
    cfg = resolved(base)
    wired = wire(cfg, source=memory_source(Pretrained(config, params)))
    state, _ = initial_state(wired, 0)
    batch = random_batch(config.vocab_size, wired.train.global_batch_size, wired.train.seq_len,
                         wired.built.batch_sharding)
    holder = {"state": state, "metrics": None}

    def step():
        holder["state"], holder["metrics"] = wired.built.step_fn(holder["state"], batch)
        jax.block_until_ready(holder["metrics"]["loss"])

    return {**first_step(step), "last": holder}


def lora_step(base, phase: str, arch: dict, *, rank: int, experts: int, top_k: int, **train) -> dict:
    """phase_step of `phase` (expert | router | sft) on lora_model(arch, phase, ...)."""
    return phase_step(base, phase, *lora_model(arch, phase, rank=rank, experts=experts, top_k=top_k), **train)
