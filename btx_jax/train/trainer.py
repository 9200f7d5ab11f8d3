"""The training loop: config -> mesh, model, phase split, data, jit step, logging, checkpoints, resume.

    train(config, workdir, hooks=())

Running the same command again resumes from the latest checkpoint in `workdir/checkpoints`.  Inside
`btx_jax.cli.stopping_cleanly` (scripts/train.py), SIGTERM (preemption) or Ctrl-C saves a checkpoint after the
step in flight and exits 143 / 130; a non-finite loss stops with a clear message and keeps the last good
checkpoint (or is skipped with `train.skip_nonfinite`).  The loop's logging, health check, checkpoints and
held-out evaluation (`train.eval_every`) are hooks (btx_jax/train/hooks.py); `hooks` adds the caller's.  The
final parameters are written as a new version `workdir/finals/<step>-<digest>/` (a btx_jax checkpoint) and
`workdir/final` is made to name it: `load_pretrained` and the next phase read `workdir/final`; earlier versions
are kept (docs/finals.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from btx_jax import disk, param_paths, schema
from btx_jax import lock as run_lock
from btx_jax.checkpoint import btx
from btx_jax.command_line import Stopped, deferred_stops, fail
from btx_jax.config import ConfigError, LlamaConfig
from btx_jax.data import load_tokenizer, make_pipeline
from btx_jax.data.packing import FIELDS
from btx_jax.data.synthetic import SyntheticPipeline
from btx_jax.errors import UserError
from btx_jax.model import Llama, attention, moe_ffn
from btx_jax.pretrained import ModelSource
from btx_jax import mesh as mesh_lib
from btx_jax.train import aot, checkpoints, held_out, phases
from btx_jax.train.device_memory import StepDoesNotFit, check_fits, fit_knobs
from btx_jax.train.health import TrainingError, TrainingHealth  # noqa: F401 - trainer.TrainingError
from btx_jax.train.hooks import Hook, Loop
from btx_jax.train.host_memory import release_freed_memory
from btx_jax.train.metrics_log import MetricsLog
from btx_jax.train.model_init import initial_source
from btx_jax.train.optim import make_optimizer, schedule
from btx_jax.train.step import init_state, make_train_step
from btx_jax.train.validate import check_distributed, check_model, validate

log = logging.getLogger("btx_jax.train")


def resolved(config) -> dict:
    """The config as plain JSON (what checkpoints store and resume compares)."""
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


class DistributedError(UserError, RuntimeError):
    """The processes of a multi-host run could not connect; the message names the coordinator and process."""


def maybe_initialize_distributed(cfg: dict) -> None:
    """jax.distributed.initialize() when distributed.enabled: the keys left unset (coordinator_address '',
    num_processes, process_id) are detected by JAX (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS; docs/hardware.md).
    Stops with one line (exit 2 from the CLI) naming the coordinator and this process when the processes have
    not all connected within distributed.initialization_timeout seconds, instead of JAX's abort."""
    d = cfg.get("distributed") or {}
    if not d.get("enabled") or jax.distributed.is_initialized():     # once per process (phases run in one)
        return
    check_distributed(d)
    if d.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", d["cpu_collectives"])
    kwargs = {k: d[k] for k in ("num_processes", "process_id") if d.get(k) is not None}
    if d.get("coordinator_address"):
        kwargs["coordinator_address"] = d["coordinator_address"]
    if d.get("local_device_ids") is not None:
        kwargs["local_device_ids"] = list(d["local_device_ids"])
    timeout = int(d.get("initialization_timeout", 300))

    def gave_up():   # JAX's own timeout aborts the process from C++ (SIGABRT): stop first, with one line
        try:
            fail(_distributed_message(kwargs, timeout))      # the CLI's line (the main thread is blocked)
        except SystemExit as e:
            sys.stderr.flush()
            os._exit(e.code)
    watchdog = threading.Timer(timeout, gave_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout + DISTRIBUTED_GRACE_S)
    except (ValueError, RuntimeError, TypeError) as e:
        raise DistributedError(f"{_distributed_message(kwargs, timeout, failed=True)}: "
                               f"{' '.join(str(e).split())}") from None
    finally:
        watchdog.cancel()


DISTRIBUTED_GRACE_S = 60     # JAX's own deadline, after ours: it would abort the process


def _distributed_message(kwargs: dict, timeout: int, failed: bool = False) -> str:
    """'... coordinator <address> ... process <id> of <n> ...', with what JAX detected for the unset keys."""
    found = dict(kwargs)
    if None in (found.get("coordinator_address"), found.get("num_processes"), found.get("process_id")):
        try:    # what jax.distributed.initialize detects (private API, used for this message only)
            from jax._src import clusters
            address, n, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
                found.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                found.get("num_processes"), found.get("process_id"), None, None, 5)
            found.update(coordinator_address=address, num_processes=n, process_id=pid)
        except Exception:     # noqa: BLE001 - the message then says the values were not detected
            pass
    address = found.get("coordinator_address") or "(none: not set and not detected)"
    who = f"process {found.get('process_id', '?')} of {found.get('num_processes', '?')}"
    if failed:
        return (f"distributed initialization failed ({who}, coordinator {address}; set "
                "distributed.coordinator_address, num_processes and process_id, or run under SLURM / on a TPU pod)")
    return (f"distributed initialization timed out after distributed.initialization_timeout={timeout}s: {who} "
            f"could not connect all processes through the coordinator at {address} (check "
            "distributed.coordinator_address, that every process was started and that the port is reachable)")


def make_data(t: schema.Train, d: dict, vocab_size: int):
    """The training batch iterator of this process for train section `t` and data section `d` (synthetic tokens
    when data.kind='synthetic')."""
    d = dict(d)
    kw = dict(seq_len=t.seq_len, global_batch_size=t.global_batch_size, process_index=jax.process_index(),
              process_count=jax.process_count(), seed=t.seed)
    if d.get("kind") == "synthetic":
        return SyntheticPipeline(vocab_size=vocab_size, **kw)
    tokenizer = load_tokenizer(d.pop("tokenizer"))
    tokenizer.check_fits(vocab_size)
    return make_pipeline(d, tokenizer, **kw)


def summary(trainable, frozen, state_shardings, state) -> dict:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    per_dev = mesh_lib.bytes_per_device(state, state_shardings)
    return {"params_total": count(trainable) + count(frozen), "params_trainable": count(trainable),
            "params_frozen": count(frozen), "state_bytes_per_device": per_dev,
            "opt_state_leaves": len(jax.tree_util.tree_leaves(state["opt_state"]))}


def phase_targets(shapes: dict, run: schema.Run, mesh, rules) -> tuple[dict, dict]:
    """({path: ShapeDtypeStruct} trainable in fp32, frozen in train.frozen_dtype), each with its sharding,
    for a model's abstract leaves `shapes`."""
    trainable, frozen = phases.split(shapes, phases.trainable_patterns(run.phase, run.trainable))
    return (mesh_lib.sharded_target(trainable, mesh, rules, jnp.float32),
            mesh_lib.sharded_target(frozen, mesh, rules, run.train.frozen_dtype))


class BuiltStep(NamedTuple):
    tx: optax.GradientTransformation
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any                      # jitted step(state, batch) -> (state, metrics), state donated
    abstract_state: dict              # ShapeDtypeStruct tree of the state, with shardings


def build_step(t: schema.Train, mesh, rules, model, trainable, frozen) -> BuiltStep:
    """Optimizer, state/batch shardings and the jitted train step for `model` whose parameters split into
    `trainable`/`frozen` (arrays or ShapeDtypeStructs: only shapes and dtypes are read).  Shared by train()
    and btx_jax/train/plan.py (which lowers `step_fn` on `abstract_state` without allocating anything)."""
    tx = make_optimizer(t)
    shard = lambda tree: mesh_lib.param_shardings(tree, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, trainable)
    state_shardings = {"step": replicated, "trainable": shard(trainable), "frozen": shard(frozen),
                       "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract_opt, shard(trainable),
                                                          transform_non_params=lambda _: replicated),
                       "rng": replicated}
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    platform = mesh.devices.flat[0].platform
    model = for_platform(model, platform)
    step_fn = jax.jit(make_train_step(model, tx, microbatches=t.microbatches, lb_alpha=t.lb_alpha, z_alpha=t.z_alpha,
                                      loss_chunk=t.loss_chunk, mesh=mesh, rules=rules, loss_layout=t.loss_layout),
                      in_shardings=(state_shardings, {k: batch_sharding for k in FIELDS}),
                      out_shardings=(state_shardings, None), donate_argnums=0,
                      compiler_options=aot.compiler_options(platform))
    abstract = jax.eval_shape(lambda tr, fr: init_state(tr, fr, tx, t.seed), trainable, frozen)
    abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                      abstract, state_shardings)
    return BuiltStep(tx, state_shardings, batch_sharding, step_fn, abstract)


def for_platform(model: Llama, platform: str) -> Llama:
    """The module with the attention and MoE kernels of `platform` ("cpu", "gpu", "tpu")."""
    return model.clone(attention=attention.resolve(model.attention, platform),
                       config=moe_ffn.for_platform(model.config, platform))


def train_module(config: LlamaConfig, t: schema.Train) -> Llama:
    """The Flax module a phase trains: the train config's compute dtype, remat policy and attention."""
    return Llama(config, dtype=jnp.dtype(t.dtype), remat=t.remat, deterministic=False, attention=t.attention,
                 attention_block=t.attention_block)


class Phase(NamedTuple):
    """Everything a training phase is made of, before any weight is read."""
    mesh: jax.sharding.Mesh
    rules: tuple
    source: ModelSource               # where the starting weights come from
    trainable: dict                   # {path: ShapeDtypeStruct with sharding}
    frozen: dict
    model: Llama
    built: BuiltStep
    train: schema.Train               # the config's train section, typed


def wire(cfg: dict, mesh=None, source: ModelSource | None = None) -> Phase:
    """The one place a config becomes mesh, starting model, trainable/frozen split and jitted step (used by
    train(), btx_jax/train/plan.py and btx_jax/train/throughput.py).  Reads configs and tensor headers only.
    `source`: start from this model instead of `cfg["model"]`'s."""
    rules = validate(cfg, jax.device_count() if mesh is None else mesh.devices.size)
    run = schema.parse(cfg)
    mesh = mesh_lib.make_mesh(cfg["mesh"]) if mesh is None else mesh
    source = source or initial_source(run.model, seed=run.train.seed)
    check_model(cfg, source.config, list(source.abstract()))
    trainable, frozen = phase_targets(source.abstract(), run, mesh, rules)
    model = train_module(source.config, run.train)
    built = build_step(run.train, mesh, rules, model, param_paths.unflatten(trainable), param_paths.unflatten(frozen))
    return Phase(mesh, rules, source, trainable, frozen, model, built, run.train)


def initial_state(phase: Phase, seed: int) -> tuple[dict, str]:
    """(fresh train state, digest of the frozen weights), every leaf created in its sharding."""
    params = phase.source.fill({**phase.trainable, **phase.frozen})
    trainable = param_paths.unflatten({p: params.pop(p) for p in phase.trainable})
    frozen = {p: params.pop(p) for p in phase.frozen}
    digest = btx.digest(frozen)
    release_freed_memory()           # the reads' host slices and the digest's temporaries
    init = jax.jit(lambda tr, fr: init_state(tr, fr, phase.built.tx, seed), out_shardings=phase.built.state_shardings,
                   donate_argnums=(0, 1))
    return init(trainable, param_paths.unflatten(frozen)), digest


def frozen_weights(phase: Phase, saved_digest: str, step: int) -> dict:
    """The frozen weights (from their source) for a resume at `step`, checked against the digest it saved."""
    frozen = phase.source.fill(phase.frozen)
    found = btx.digest(frozen)
    release_freed_memory()
    if found != saved_digest:
        raise ConfigError(f"cannot resume: the frozen weights (model.init={phase.source.reference}) changed since "
                          f"step {step} was saved (digest {saved_digest}, now {found})")
    return param_paths.unflatten(frozen)


def train(config, workdir: str | Path, hooks: Sequence[Hook] = ()) -> dict:
    """Run (or resume) one training phase; returns the last step's metrics.  `hooks` run after the built-in
    ones (btx_jax/train/hooks.py)."""
    cfg = resolved(config)
    workdir = Path(workdir)
    maybe_initialize_distributed(cfg)
    with workdir_lock(workdir):     # first: a second run is refused before it compiles (the lock leaves no
        phase = wire(cfg)           # directory behind when the run stops before writing anything)
        t = phase.train
        built = phase.built
        # compiled before any weight is read: the compiler's working memory is freed before the state exists
        try:
            step_fn = compile_step(built.step_fn, built.abstract_state, abstract_batch(built, t),
                                   jax.process_index() == 0)
        except aot.DoesNotFit as e:
            raise StepDoesNotFit(f"the compiler refused the train step ({e}): {fit_knobs(t)}") from None
        check_fits(step_fn, t, [d for d in phase.mesh.devices.flat if d.process_index == jax.process_index()])
        return _train(cfg, workdir, phase, step_fn, list(hooks))


def workdir_lock(workdir: Path):
    """The work directory's run lock (btx_jax/lock.py), taken by process 0 for all processes: every process
    stops with the LockError when another run holds it."""
    from jax.experimental import multihost_utils
    lock = contextlib.ExitStack()
    error = None
    if jax.process_index() == 0:
        try:
            lock.enter_context(run_lock.hold(workdir, "training"))
        except run_lock.LockError as e:
            error = e
    if jax.process_count() > 1 and not bool(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        error = error or run_lock.LockError(f"{workdir}: another training is running in this directory (process 0 "
                                            "holds no lock: see its output)")
    if error is not None:
        raise error
    return lock


def _train(cfg: dict, workdir: Path, phase: Phase, step_fn, extra: list[Hook]) -> dict:
    t = phase.train
    built = phase.built
    vocab = phase.source.config.vocab_size
    data = make_data(t, cfg["data"], vocab)
    with contextlib.ExitStack() as closing:     # every hook closed however the run ends, the last first
        ckpt = checkpoints.Checkpointer(workdir / "checkpoints", t.ckpt_every, t.keep_checkpoints)
        closing.callback(ckpt.close)
        resumed = ckpt.resume(built.abstract_state, lambda saved: checkpoints.check_compatible(saved, cfg, workdir))
        start = 0
        if resumed is None:
            state, digest = initial_state(phase, t.seed)
        else:
            start, state, data_state, digest = resumed
            state = {**state, "frozen": frozen_weights(phase, digest, start)}
            data.set_state(data_state)
            print(f"[btx] resumed {workdir} at step {start}", flush=True)

        info = summary(state["trainable"], state["frozen"], built.state_shardings, state)
        metrics_log = MetricsLog(workdir, total_steps=t.steps, start_step=start,
                                 enabled=jax.process_index() == 0)
        closing.callback(metrics_log.close)
        metrics_log.header(cfg, info, phase.mesh)
        hooks = [TrainingHealth(vocab, check_loss=cfg["data"].get("kind") != "synthetic",
                                skip_nonfinite=t.skip_nonfinite),
                 metrics_log, checkpoints.CheckpointHook(ckpt, digest)]
        if t.eval_every:
            eval_step = held_out.make_eval_step(for_platform(phase.model, phase.mesh.devices.flat[0].platform),
                                                built.state_shardings, built.batch_sharding, t, phase.mesh,
                                                phase.rules)
            hooks.append(held_out.HeldOutEval(t.eval_every, held_out.domains(t, dict(cfg["data"]), vocab), eval_step,
                                              built.batch_sharding, metrics_log))
        for hook in extra:
            closing.callback(hook.close)
        loop = Loop(cfg, t, workdir, start, start, state, data, hooks + extra, schedule(t),
                    saved_step=start if resumed is not None else None)
        del state
        run(loop, step_fn, built.batch_sharding)
        final = workdir / "final"
        if resumed is not None and start == t.steps and final.is_dir():
            print(f"[btx] {workdir} already finished (step {start} of train.steps={start}); {final} is up to date",
                  flush=True)
        else:
            save_final(workdir, phase, loop.state, digest)
        loop.last["data_stats"] = data.stats()
        return loop.last


def run(loop: Loop, step_fn, batch_sharding) -> None:
    """The steps from `loop.step` to train.steps, then every hook's on_end.  A stop signal recorded for it
    (btx_jax.cli.stopping_cleanly) ends it after the step in flight, its checkpoint saved: one line, then
    `Stopped`."""
    with deferred_stops() as stop:
        while not loop.done:
            local = next(loop.data)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k])) for k in FIELDS}
            state, metrics = step_fn(loop.state, batch)
            loop.advance(state, metrics)
            loop.stopping = stop.signum
            for hook in loop.hooks:
                hook.on_step(loop)
            if loop.stopping:
                what = (f"checkpoint saved at step {loop.saved_step}" if loop.saved_step == loop.step else
                        f"no checkpoint could be saved at step {loop.step} (latest on disk: {loop.saved_step})")
                print(f"[btx] {signal.Signals(loop.stopping).name}: {what}, exiting", flush=True)
                raise Stopped(loop.stopping, reported=True)
        loop.sync()
        for hook in loop.hooks:
            hook.on_end(loop)


def abstract_batch(built: BuiltStep, t: schema.Train) -> dict:
    """The global batch the data pipeline yields (btx_jax/data/packing.py), as ShapeDtypeStructs in the batch
    sharding: [global_batch_size, seq_len], loss_mask fp32, the rest int32."""
    shape = (t.global_batch_size, t.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=built.batch_sharding) for k in FIELDS}


def compile_step(step_fn, state: dict, batch: dict, verbose: bool):
    """`step_fn` compiled for these (abstract) shapes, with the compiler's per-device memory printed (on an
    accelerator that is device memory; on virtual CPU devices every device's share is host RAM).  A program the
    compiler refuses for its memory (TPU) raises aot.DoesNotFit."""
    tic = time.perf_counter()
    compiled, _ = aot.compile_lowered(step_fn.lower(state, batch), "train step",
                                      log=print if verbose else lambda _message: None)
    release_freed_memory()
    mem = compiled.memory_analysis()
    if verbose and mem is not None:
        print(f"[btx] step compiled in {time.perf_counter() - tic:.1f}s: per device "
              f"{mem.argument_size_in_bytes / 2**30:.3f} GiB state+batch, {mem.temp_size_in_bytes / 2**30:.3f} GiB "
              "temporaries", flush=True)
    return compiled


def save_final(workdir: Path, phase: Phase, state: dict, frozen_digest: str | None = None) -> Path:
    """Write the phase's result as a new version `workdir/finals/<step>-<digest>/` (a btx checkpoint, every
    process writing its shards, atomically), register it with the btx directories it is built on and make
    `workdir/final` name it; returns the version.  An existing version is never rewritten.

    Lean: it stores the trained leaves (and any frozen leaf its source does not provide, such as fresh
    routers) and names the source of the other frozen weights with their digest (btx_jax/checkpoint/btx.py);
    a model made from nothing (pretraining) is stored whole.  `frozen_digest` is the digest of all frozen
    weights taken at the start (they do not change), reused when every frozen leaf comes from the source."""
    from jax.experimental import multihost_utils
    trainable, frozen = param_paths.flatten(state["trainable"]), param_paths.flatten(state["frozen"])
    reference = phase.source.reference
    linked = {p: v for p, v in frozen.items() if p in phase.source.covered} if reference is not None else {}
    stored = {**{p: v for p, v in frozen.items() if p not in linked}, **trainable}
    if linked:
        same = frozen_digest is not None and set(linked) == set(frozen)
        reference = {**reference, "digest": frozen_digest if same else btx.digest(linked),
                     "digest_paths": sorted(linked)}
    version = workdir.absolute() / btx.FINALS / f"{int(jax.device_get(state['step']))}-{btx.digest(stored)[:8]}"
    if not version.exists():          # else the same step with the same weights: already written
        tmp = version.with_name(f".{version.name}.tmp")
        if jax.process_index() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        multihost_utils.sync_global_devices("btx_final_clean")
        nbytes = sum(x.size * x.dtype.itemsize for x in stored.values())
        disk.require(version.parent, nbytes)     # before orbax's writer threads can meet a full disk
        with disk.writing(version, nbytes, cleanup=[tmp]):
            tmp.mkdir(parents=True, exist_ok=True)
            btx.save(tmp, phase.source.config, stored, reference if linked else None)
        multihost_utils.sync_global_devices("btx_final_saved")
        if jax.process_index() == 0:
            os.replace(tmp, version)
    if jax.process_index() == 0:
        publish_final(workdir.absolute() / "final", version, reference if linked else None)
    multihost_utils.sync_global_devices("btx_final_done")
    return version


def publish_final(final: Path, version: Path, reference: dict | None) -> None:
    """Register `version` with the btx directories `reference` names, point `final` at it and say which
    earlier version stays (and what is built on it)."""
    for upstream in btx.named(reference):
        if btx.is_btx(upstream):
            try:
                btx.register_dependent(upstream, version)
            except OSError as e:
                print(f"[btx] note: could not record in {upstream} that {version} is built on it ({e})", flush=True)
    with disk.writing(final):
        previous = btx.point_final(final, version)
    print(f"[btx] {final} -> {version}", flush=True)
    if previous is not None and previous != version:
        users = btx.dependents(previous)
        used = f"; built on it: {', '.join(map(str, users))}" if users else ""
        print(f"[btx] the previous version {previous} is kept{used}", flush=True)
