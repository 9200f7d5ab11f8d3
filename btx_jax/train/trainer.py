"""The training loop: config -> mesh, model, phase split, data, jit step, logging, checkpoints, resume.

    train(config, workdir)

Running the same command again resumes from the latest checkpoint in `workdir/checkpoints`.  SIGTERM
(preemption) saves a checkpoint and exits; a non-finite loss stops with a clear message and keeps the last
good checkpoint (or is skipped with `train.skip_nonfinite`).  The final parameters are written to
`workdir/final` as a btx_jax checkpoint, which `load_pretrained` and the next phase read.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from btx_jax.config import ConfigError
from btx_jax.model import attention
from btx_jax.pretrained import Pretrained, save_btx
from btx_jax.train import checkpoints, mesh as mesh_lib, phases
from btx_jax.train.metrics_log import MetricsLog
from btx_jax.train.model_init import initial_model
from btx_jax.train.optim import make_optimizer, schedule
from btx_jax.train.step import BATCH_KEYS, init_state, make_train_step

log = logging.getLogger("btx_jax.train")
_KILL_AT_STEP = int(os.environ.get("BTX_KILL_AT_STEP", "0"))


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, ...); the message says what to do."""


def resolved(config) -> dict:
    """The config as plain JSON (what checkpoints store and resume compares)."""
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


def validate(cfg: dict, num_devices: int) -> tuple:
    """Every check that needs no compilation; ConfigError with one line each."""
    t = cfg["train"]
    wanted = int(cfg["mesh"].get("num_devices", 0))
    if wanted > num_devices:
        raise ConfigError(f"mesh.num_devices={wanted} but only {num_devices} devices are available")
    shape = mesh_lib.mesh_shape(cfg["mesh"], wanted or num_devices)
    sizes = dict(zip(mesh_lib.MESH_AXES, shape))
    rules = tuple((k, tuple(v)) for k, v in (cfg.get("mesh_rules") or mesh_lib.DEFAULT_RULES))
    dp = int(np.prod([sizes[a] for a in dict(rules)["batch"]]))
    gb, micro = int(t["global_batch_size"]), int(t["microbatches"])
    if micro < 1 or gb % micro:
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by train.microbatches={micro}")
    if (gb // micro) % dp:
        raise ConfigError(f"train.global_batch_size/microbatches={gb // micro} is not divisible by the "
                          f"data-parallel size {dp} (mesh {sizes})")
    if gb % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by {jax.process_count()} processes")
    if int(t["steps"]) < 1:
        raise ConfigError(f"train.steps={t['steps']} must be >= 1")
    if t["attention"] not in attention.IMPLS or int(t["attention_block"]) < 1:
        raise ConfigError(f"train.attention={t['attention']!r} / attention_block={t['attention_block']} must be one "
                          f"of {attention.IMPLS} / >= 1")
    phases.trainable_patterns(cfg["phase"], cfg.get("trainable"))
    return rules


def maybe_initialize_distributed(cfg: dict) -> None:
    d = cfg.get("distributed") or {}
    if not d.get("enabled"):
        return
    if d.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", d["cpu_collectives"])
    kwargs = {k: d[k] for k in ("coordinator_address", "num_processes", "process_id") if d.get(k) is not None}
    if d.get("local_device_ids") is not None:
        kwargs["local_device_ids"] = list(d["local_device_ids"])
    jax.distributed.initialize(**kwargs)


def make_data(cfg: dict, vocab_size: int):
    """The training batch iterator of this process (synthetic tokens when data.kind='synthetic')."""
    t, d = cfg["train"], dict(cfg["data"])
    kw = dict(seq_len=int(t["seq_len"]), global_batch_size=int(t["global_batch_size"]),
              process_index=jax.process_index(), process_count=jax.process_count(), seed=int(t["seed"]))
    if d.get("kind") == "synthetic":
        from btx_jax.data.synthetic import SyntheticPipeline
        return SyntheticPipeline(vocab_size=vocab_size, **kw)
    from btx_jax.data import load_tokenizer, make_pipeline
    tokenizer = load_tokenizer(d.pop("tokenizer"))
    tokenizer.check_fits(vocab_size)
    return make_pipeline(d, tokenizer, **kw)


def summary(trainable, frozen, state_shardings, state) -> dict:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    per_dev = mesh_lib.bytes_per_device(state, state_shardings)
    return {"params_total": count(trainable) + count(frozen), "params_trainable": count(trainable),
            "params_frozen": count(frozen), "state_bytes_per_device": per_dev,
            "opt_state_leaves": len(jax.tree_util.tree_leaves(state["opt_state"]))}


def _cast(x, dtype):
    """x.astype(dtype) for arrays and ShapeDtypeStructs alike (the plan builds on abstract shapes)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
    return x.astype(dtype)


def phase_params(params, cfg: dict) -> tuple[dict, dict]:
    """(trainable fp32, frozen in train.frozen_dtype) sub-trees of `params` (arrays or ShapeDtypeStructs)."""
    patterns = phases.trainable_patterns(cfg["phase"], cfg.get("trainable"))
    trainable, frozen = phases.split(params, patterns)
    frozen = jax.tree_util.tree_map(lambda x: _cast(x, cfg["train"]["frozen_dtype"]), frozen)
    trainable = jax.tree_util.tree_map(lambda x: _cast(x, jnp.float32), trainable)
    return trainable, frozen


class BuiltStep(NamedTuple):
    tx: optax.GradientTransformation
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any                      # jitted step(state, batch) -> (state, metrics), state donated
    abstract_state: dict              # ShapeDtypeStruct tree of the state, with shardings


def build_step(cfg: dict, mesh, rules, model, trainable, frozen) -> BuiltStep:
    """Optimizer, state/batch shardings and the jitted train step for `model` whose parameters split into
    `trainable`/`frozen` (arrays or ShapeDtypeStructs: only shapes and dtypes are read).  Shared by train()
    and scripts/plan.py (which lowers `step_fn` on `abstract_state` without allocating anything)."""
    t = cfg["train"]
    tx = make_optimizer(t)
    shard = lambda tree: mesh_lib.param_shardings(tree, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, trainable)
    state_shardings = {"step": replicated, "trainable": shard(trainable), "frozen": shard(frozen),
                       "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract_opt, shard(trainable),
                                                          transform_non_params=lambda _: replicated),
                       "rng": replicated}
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    model = model.clone(attention=attention.resolve(model.attention, mesh.devices.flat[0].platform))
    step_fn = jax.jit(make_train_step(model, tx, microbatches=int(t["microbatches"]), lb_alpha=float(t["lb_alpha"]),
                                      z_alpha=float(t["z_alpha"]), loss_chunk=int(t.get("loss_chunk", 0)), mesh=mesh),
                      in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    abstract = jax.eval_shape(lambda tr, fr: init_state(tr, fr, tx, int(t["seed"])), trainable, frozen)
    abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                      abstract, state_shardings)
    return BuiltStep(tx, state_shardings, batch_sharding, step_fn, abstract)


def train_module(pre: Pretrained, t: dict):
    """The Flax module a phase trains: the train config's compute dtype, remat policy and attention."""
    return pre.model(deterministic=False, remat=t["remat"], dtype=t["dtype"], attention=t["attention"],
                     attention_block=int(t["attention_block"]))


def train(config, workdir: str | Path) -> dict:
    """Run (or resume) one training phase; returns the last logged metrics."""
    cfg = resolved(config)
    workdir = Path(workdir)
    maybe_initialize_distributed(cfg)
    rules = validate(cfg, jax.device_count())
    t = cfg["train"]
    mesh = mesh_lib.make_mesh(cfg["mesh"])

    pre = initial_model(cfg["model"], seed=int(t["seed"]))
    trainable, frozen = phase_params(pre.params, cfg)
    model = train_module(pre, t)
    built = build_step(cfg, mesh, rules, model, trainable, frozen)
    tx, state_shardings, batch_sharding = built.tx, built.state_shardings, built.batch_sharding
    state = jax.jit(lambda tr, fr: init_state(tr, fr, tx, int(t["seed"])), out_shardings=state_shardings)(
        jax.device_put(trainable, state_shardings["trainable"]), jax.device_put(frozen, state_shardings["frozen"]))
    del trainable, frozen
    data = make_data(cfg, pre.config.vocab_size)

    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", t["ckpt_every"], t["keep_checkpoints"])
    start = ckpt.latest_step()
    if start is not None:
        checkpoints.check_compatible(ckpt.saved_config(start), cfg, workdir)
        state, data_state = ckpt.restore(start, built.abstract_state)
        data.set_state(data_state)
        print(f"[btx] resumed {workdir} at step {start}", flush=True)
    start = start or 0

    info = summary(state["trainable"], state["frozen"], state_shardings, state)
    metrics_log = MetricsLog(workdir, total_steps=int(t["steps"]), start_step=start, enabled=jax.process_index() == 0)
    metrics_log.header(cfg, info, mesh)

    step_fn = built.step_fn
    lr_at = schedule(t)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
    last = {}
    try:
        pending = None
        for step in range(start, int(t["steps"])):
            local = next(data)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
                     for k in BATCH_KEYS}
            state, metrics = step_fn(state, batch)
            if step + 1 == _KILL_AT_STEP:      # fault injection for the resume test
                os.kill(os.getpid(), signal.SIGKILL)
            if pending is not None:
                last = _check(pending, metrics_log, lr_at, t)
            pending = (step + 1, metrics)
            done = step + 1 == int(t["steps"])
            if (step + 1) % int(t["ckpt_every"]) == 0 or done or stop["signal"]:
                last = _check(pending, metrics_log, lr_at, t)
                pending = None
                ckpt.save(step + 1, state, data.get_state(), cfg, force=True)
            if stop["signal"]:
                ckpt.wait()
                print(f"[btx] SIGTERM: checkpoint saved at step {step + 1}, exiting", flush=True)
                raise SystemExit(143)
        if pending is not None:
            last = _check(pending, metrics_log, lr_at, t)
        ckpt.wait()
        save_final(workdir / "final", Pretrained(pre.config, phases.merge(state["trainable"], state["frozen"]),
                                                 pre.dtype))
        last["data_stats"] = data.stats()
        metrics_log.footer(last)
        return last
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        metrics_log.close()


def save_final(dst: Path, pre: Pretrained) -> None:
    """Write the phase's result as a btx checkpoint, every process writing its shards (orbax), atomically."""
    from jax.experimental import multihost_utils
    tmp = dst.with_name(f".{dst.name}.tmp")
    if jax.process_index() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    multihost_utils.sync_global_devices("btx_final_clean")
    tmp.mkdir(parents=True, exist_ok=True)
    save_btx(tmp, pre)
    multihost_utils.sync_global_devices("btx_final_saved")
    if jax.process_index() == 0:
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    multihost_utils.sync_global_devices("btx_final_done")


def _check(pending, metrics_log: MetricsLog, lr_at, t) -> dict:
    """Fetch a step's metrics (one step behind the device), log them, stop on a non-finite loss."""
    step, metrics = pending
    host = jax.device_get(metrics)
    loss = float(host["loss"])
    finite = all(np.isfinite(float(host[k])) for k in ("loss", "grad_norm", "update_norm"))
    if not finite and not t["skip_nonfinite"]:
        what = "loss" if not np.isfinite(loss) else "gradient"
        raise TrainingError(f"non-finite {what} at step {step} (loss {loss}): training stopped; the last good "
                            "checkpoint is kept (lower train.lr, check the data, or set train.skip_nonfinite=True)")
    host["lr"] = float(lr_at(step - 1))
    host["step"] = step
    metrics_log.step(step, host, log=step % int(t["log_every"]) == 0
                     or step == int(t["steps"]))
    return host
