"""Memory and scale plan: AOT-compile the real train step on abstract inputs and report, per device,
parameter / optimizer / gradient / temporary bytes, FLOPs per step, and the largest global batch that fits.

Nothing is allocated: parameters come from `btx_jax.model.abstract_params` (jax.eval_shape), the phase
split from the path patterns of btx_jax/train/phases.py, and the step is the one `train()` runs
(`btx_jax.train.trainer.build_step`), lowered with ShapeDtypeStructs that carry their shardings and compiled
for N virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N: `btx plan` runs within
aot.compile_only, entered before JAX starts a backend).  Numbers are the CPU compiler's: GPU temporaries differ (fusion,
scheduling, bf16 dots), so leave headroom (--headroom, default 10%).

Phases other than `expert` plan the LoRA-MoE the router / SFT phases train: the expert LoRA spec of the
config (targets, rank, alpha) repeated --experts times with a top-k router on every target.

From Python (JAX already started: the mesh's devices are the ones there are):

    cfg = resolved(load_config("expert:synthetic"))
    row = plan(cfg, phase="expert", batch=8)                    # bytes per device, FLOPs, compile time
    best, runs = max_batch(cfg, 80 * 10**9, phase="expert", experts=3, top_k=2)
    print(table([row], 80 * 10**9))

The command line is `btx plan` (btx_jax/cli/plan.py); `--target` and the compilers: btx_jax/train/aot.py.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from btx_jax import mesh as mesh_lib, param_paths, schema
from btx_jax.configs import resolve
from btx_jax.config import AdapterSpec, LlamaConfig
from btx_jax.counting import model_flops_per_token
from btx_jax.model.llama import REMAT_POLICIES, DecoderLayer
from btx_jax.pretrained import random_source
from btx_jax.train import aot
from btx_jax.train.device_memory import step_peak_bytes
from btx_jax.train.model_init import lora_spec
from btx_jax.train.phases import merge
from btx_jax.train.step import resolve_layout
from btx_jax.train.trainer import abstract_batch, wire


def load_config(spec: str):
    """`NAME[:preset]` or `path/to/config.py[:preset]` -> ml_collections ConfigDict (the module's
    get_config(preset); btx_jax/configs resolves a packaged config's name)."""
    path, _, preset = resolve(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(f"btx_plan_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def model_config(cfg: dict, phase: str, experts: int, top_k: int):
    """The LlamaConfig a phase trains (abstract: no checkpoint is read)."""
    m = schema.parse(cfg).model
    arch = LlamaConfig(**m.arch)
    one = lora_spec(m.lora or schema.Lora())           # without one in the config: the schema's default LoRA
    if phase == "expert":
        return arch.replace(adapter=one)
    if phase == "full":
        return arch
    spec = AdapterSpec(targets=one.targets, experts=one.experts * experts, dropout=one.dropout, router=True,
                       top_k=top_k, init=one.init)
    return arch.replace(adapter=spec)


def plan(cfg: dict, *, phase: str | None = None, batch: int | None = None, experts: int = 3, top_k: int = 2,
         mesh=None, target=None, log=print) -> dict:
    """Compile the train step of `cfg` (resolved dict) for `phase` and global `batch` on abstract inputs.

    Returns per-device bytes {params, trainable, frozen, optimizer, gradients, temp, argument, output, alias,
    peak} plus flops (per device and global; "flops_source": XLA's cost analysis, or the model count where the
    backend has none), compile seconds and the configuration; on a TPU target also the cost model's step time and
    MFU ("cost"), or fits=False when the TPU compiler refuses the program; on a GPU target fits=False when the
    peak exceeds the device memory of the target config."""
    cfg = json.loads(json.dumps(cfg))
    if phase:
        cfg["phase"] = phase
    if batch:
        cfg["train"]["global_batch_size"] = int(batch)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg["mesh"])
    config = model_config(cfg, cfg["phase"], experts, top_k)
    phase = wire(cfg, mesh, random_source(config, 0))           # abstract: nothing is allocated
    built, t = phase.built, phase.train
    gb, seq = t.global_batch_size, t.seq_len
    trainable, frozen = param_paths.unflatten(phase.trainable), param_paths.unflatten(phase.frozen)
    batch_abs = abstract_batch(built, t)
    target = target or aot.parse_target(f"cpu:{mesh.devices.size}")
    st, sh = built.abstract_state, built.state_shardings
    per_dev = lambda key: mesh_lib.bytes_per_device(st[key], sh[key])
    lowered = built.step_fn.lower(built.abstract_state, batch_abs)
    try:
        compiled, seconds = aot.compile_lowered(lowered, f"{cfg['phase']} batch {gb} on {target.text}", log=log)
    except aot.DoesNotFit as e:
        return {"phase": cfg["phase"], "global_batch": gb, "seq_len": seq, "devices": int(mesh.devices.size),
                "fits": False, "error": str(e), "bytes": {"peak": max(e.needed, e.available + 1), "temp": e.needed}}
    mem = compiled.memory_analysis()
    cost = aot.cost_analysis(compiled)
    out = {
        "phase": cfg["phase"], "global_batch": gb, "seq_len": seq, "devices": int(mesh.devices.size),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "dtype": t.dtype, "frozen_dtype": t.frozen_dtype,
        "remat": t.remat, "microbatches": t.microbatches,
        "params_trainable": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))),
        "params_total": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(phase.source.abstract()))),
        "bytes": {
            "trainable": per_dev("trainable"), "frozen": per_dev("frozen"),
            "params": per_dev("trainable") + per_dev("frozen"),
            "optimizer": per_dev("opt_state"),
            "gradients": per_dev("trainable"),            # fp32, sharded like the trainable params (in temp)
            "argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
            "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
        },
        "flops_xla_raw": float(cost.get("flops", 0.0)) if cost is not None else None,
        "compile_s": round(seconds, 2), "target": target.text, "fits": True,
        "loss_chunk": t.loss_chunk, "attention": t.attention,
        "loss_layout": resolve_layout(t.loss_layout, gb // t.microbatches * seq,
                                      (config.hidden_size, config.vocab_size), mesh, phase.rules),
        "cost": aot.cost_model(compiled, target),
    }
    b = out["bytes"]
    b["peak"] = step_peak_bytes(mem)
    if target.platform == "gpu" and b["peak"] > target.hbm_bytes:    # the GPU compiler never refuses
        out["fits"] = False
        out["error"] = f"peak {_fmt_gb(b['peak'])} GiB > the GPU's {_fmt_gb(target.hbm_bytes)} GiB"
    micro = t.microbatches
    if cost is None:     # no cost model (XLA:GPU compiled with no device): the model's FLOPs
        out["flops_source"] = "model count (btx_jax/counting.py; XLA has no GPU cost model)"
        out["flops_per_device"] = model_flops_per_token(config, seq, cfg["phase"]) * gb * seq / out["devices"]
        out["flops_global"] = out["flops_per_device"] * out["devices"]
        return out
    out["flops_source"] = "xla cost analysis"
    # XLA's cost analysis may count a while-loop body once (XLA:CPU always; the TPU compiler did for the 7B
    # step's layer scan, though it multiplies a plain scan's body by its trip count): then the layer stack
    # shows up as one layer.  Add the other num_layers - 1 layers' train FLOPs (one layer's forward + backward
    # under the same remat policy and trainable split, compiled on its own), per device.
    layer = layer_train_flops(config, t, trainable, frozen, gb // micro, seq) / out["devices"]
    once = not aot.counts_loop_trips(target.platform) or out["flops_xla_raw"] < 2 * layer * micro
    out["flops_per_device"] = (out["flops_xla_raw"] + (config.num_layers - 1) * layer * once) * (micro if once else 1)
    out["flops_global"] = out["flops_per_device"] * out["devices"]
    if "step_s" in out["cost"] and once:   # the cost model's time covers the counted FLOPs: scale it like them
        out["cost"]["step_s"] *= out["flops_per_device"] / max(out["flops_xla_raw"], 1.0)
    return out


def layer_train_flops(config, t: schema.Train, trainable: dict, frozen: dict, batch: int, seq: int) -> float:
    """FLOPs of one decoder layer's forward + backward (input gradients always, weight gradients for the
    trainable leaves) at the global batch, from XLA's cost analysis of that layer alone."""
    strip = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                                tree.get("layers", {}))
    tr, fr = strip(trainable), strip(frozen)
    cls = DecoderLayer
    if t.remat != "none":
        # prevent_cse=True: outside a scan XLA would otherwise merge the recomputation with the forward
        cls = nn.remat(cls, policy=REMAT_POLICIES[t.remat], prevent_cse=True)
    dtype = jnp.dtype(t.dtype)
    layer = cls(config, dtype, jnp.float32, False, t.attention, t.attention_block)

    def loss(tr, fr, x):
        ids = jnp.ones((batch, seq), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        (y, _), aux = layer.apply({"params": merge(tr, fr)}, x, {"routed": jnp.float32(1.0)}, pos, ids, 0,
                                  rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["aux"])
        extra = sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(aux))
        return jnp.sum(y.astype(jnp.float32)) + extra

    x = jax.ShapeDtypeStruct((batch, seq, config.hidden_size), dtype)
    cost = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(tr, fr, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def max_batch(cfg: dict, memory: int, *, phase: str, experts: int, top_k: int, mesh=None, headroom=0.1,
              limit: int = 4096, log=print, target=None, known: tuple[dict, ...] = (),
              max_compiles: int = 8) -> tuple[int, list[dict]]:
    """Largest global batch (a multiple of the data-parallel size) whose compiled peak fits `memory`
    (1 - headroom) per device, and the plans compiled on the way.  A secant search: each next batch is where
    the line through the two compiled batches nearest the budget meets it (peak bytes grow about linearly,
    faster at large batches), kept strictly between the largest batch known to fit and the smallest known not
    to, until those two are one step apart (or `max_compiles` compiles were spent: the largest fitting batch
    found is returned).  `known`: plans already compiled (e.g. at the config's batch), reused."""
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg["mesh"])
    rules = tuple((k, tuple(v)) for k, v in (cfg.get("mesh_rules") or mesh_lib.DEFAULT_RULES))
    dp = mesh_lib.data_parallel_size(mesh, rules) * schema.parse(cfg).train.microbatches
    budget = memory * (1 - headroom)
    runs, peaks = [], {}

    def at(b):
        r = next((k for k in known if k["global_batch"] == b), None) or plan(
            cfg, phase=phase, batch=b, experts=experts, top_k=top_k, mesh=mesh, target=target, log=log)
        runs.append(r)
        peaks[b] = r["bytes"]["peak"] if r["fits"] else max(r["bytes"]["peak"], budget + 1)
        log(f"  [search] {phase} batch {b}: peak {r['bytes']['peak'] / 2**30:.2f} GiB/device "
            + (f"(compile {r['compile_s']:.1f}s)" if r["fits"] else f"(does not fit: {r['error']})"))

    for r in known:
        if r["global_batch"] % dp == 0:
            at(r["global_batch"])
    if not peaks or min(peaks) != dp:
        at(dp)
    for _ in range(max_compiles):
        fit = [b for b, p in peaks.items() if p <= budget]
        over = [b for b, p in peaks.items() if p > budget]
        lo, hi = max(fit, default=0), min(over, default=limit + dp)
        if not fit or hi - lo <= dp or lo >= limit:
            break
        nearest = sorted(peaks.items(), key=lambda bp: abs(bp[1] - budget))[:2]
        (b1, p1), (b2, p2) = nearest if len(nearest) == 2 else (nearest[0], (0, 0))   # one point: through 0
        slope = max((p2 - p1) / (b2 - b1), 1.0)
        guess = int(b1 + (budget - p1) / slope) // dp * dp
        at(min(max(guess, lo + dp), hi - dp, limit))
    fit = [b for b, p in peaks.items() if p <= budget]
    return max(fit, default=0), runs


def _fmt_gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[dict], memory: int | None) -> str:
    head = ("phase", "batch", "trainable", "params GiB", "optim GiB", "grads GiB", "temp GiB", "peak GiB",
            "TFLOP/dev/step", "step s (cost model)", "MFU (cost model)", "fits", "max batch", "compile s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r["bytes"]
        if not r["fits"] and "params" not in b:     # refused by the compiler: no memory analysis
            lines.append("| " + " | ".join([r["phase"], str(r["global_batch"])] + ["-"] * 4 + [
                _fmt_gb(b["temp"]), "-", "-", "-", "-", "NO (compiler)", str(r.get("max_batch", "-")), "-"]) + " |")
            continue
        fits = "-" if memory is None else ("yes" if b["peak"] <= memory and r["fits"] else "NO")
        cost = r.get("cost") or {}
        lines.append("| " + " | ".join([
            r["phase"], str(r["global_batch"]), f"{r['params_trainable'] / 1e6:.1f}M", _fmt_gb(b["params"]),
            _fmt_gb(b["optimizer"]), _fmt_gb(b["gradients"]), _fmt_gb(b["temp"]), _fmt_gb(b["peak"]),
            f"{r['flops_per_device'] / 1e12:.1f}",
            f"{cost['step_s']:.2f}" if "step_s" in cost else f"unpriced ({cost['unpriced_s']:.1f})" if cost else "-",
            f"{cost['mfu']:.1%}" if "mfu" in cost else "-", fits, str(r.get("max_batch", "-")),
            f"{r['compile_s']:.1f}",
        ]) + " |")
    return "\n".join(lines)
