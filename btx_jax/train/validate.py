"""Every check of a training config that needs no compilation, run before anything is compiled or written.

    rules = validate(cfg, num_devices)       # the resolved config (plain dict); mesh rules for the run
    check_model(cfg, pre)                    # after the starting model is loaded: positions, phase patterns

Each failure is a ConfigError of one line naming the key, its value and what is allowed; train() runs both
before it creates the work directory, so a bad value costs seconds and leaves nothing behind.  Unknown keys
get a "did you mean" suggestion (the command line's typos are caught earlier, by btx_jax/cli.py's flag
parser; these checks also cover configs built in Python).
"""
from __future__ import annotations

import difflib
import math
import os
import re

import jax
import numpy as np

from btx_jax.config import DTYPES, ConfigError
from btx_jax.model import attention
from btx_jax.model.llama import REMAT_POLICIES
from btx_jax import mesh as mesh_lib
from btx_jax.train import phases
from btx_jax.train.step import LOSS_LAYOUTS

SECTIONS = {
    "": ("phase", "trainable", "model", "mesh", "mesh_rules", "train", "data", "distributed"),
    "model": ("init", "arch", "lora", "compose"),
    "mesh": mesh_lib.MESH_AXES + ("num_devices",),
}


def _int(lo: int):
    return ("int", lambda v: v >= lo, f"an integer >= {lo}")


def _float(ok, allowed: str):
    return ("float", ok, allowed)


# train.<key>: (kind, check, allowed range in words)
TRAIN = {
    "steps": _int(1), "global_batch_size": _int(1), "microbatches": _int(1), "seq_len": _int(1),
    "lr": _float(lambda v: v > 0, "a number > 0"), "warmup_steps": _int(0), "warmup_offset": _int(0),
    "min_lr_ratio": _float(lambda v: 0 <= v <= 1, "between 0 and 1"),
    "weight_decay": _float(lambda v: v >= 0, "a number >= 0"),
    "grad_clip": _float(lambda v: v >= 0, "a number >= 0 (0 = no clipping)"),
    "b1": _float(lambda v: 0 <= v < 1, "in [0, 1)"), "b2": _float(lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": _float(lambda v: v > 0, "a number > 0"),
    "lb_alpha": _float(lambda v: v >= 0, "a number >= 0"), "z_alpha": _float(lambda v: v >= 0, "a number >= 0"),
    "dtype": ("choice", DTYPES, f"one of {', '.join(DTYPES)}"),
    "frozen_dtype": ("choice", DTYPES, f"one of {', '.join(DTYPES)}"),
    "remat": ("choice", tuple(REMAT_POLICIES), f"one of {', '.join(REMAT_POLICIES)}"),
    "attention": ("choice", attention.IMPLS, f"one of {', '.join(attention.IMPLS)}"),
    "attention_block": _int(1), "skip_nonfinite": ("bool", None, "True or False"),
    "max_consecutive_nonfinite": _int(1), "seed": _int(0), "log_every": _int(1), "ckpt_every": _int(1),
    "keep_checkpoints": _int(1), "loss_chunk": _int(0), "eval_every": _int(0), "eval_batches": _int(1),
    "loss_layout": ("choice", LOSS_LAYOUTS, f"one of {', '.join(LOSS_LAYOUTS)}"),
}


def _bool():
    return ("bool", None, "True or False")


def _or_none(rule: tuple) -> tuple:
    kind, check, allowed = rule
    return ("optional " + kind, check, allowed + " or None")


# data.<key> (every key optional; the defaults are btx_jax/data/pipeline.py's): (kind, check, allowed range)
DATA = {
    "kind": ("choice", ("pretrain", "sft", "synthetic"), "one of pretrain, sft, synthetic"),
    "sources": ("list", lambda v: len(v) > 0, "a non-empty list of source dicts"),
    "add_bos": _bool(), "add_eos": _bool(), "segment_ids": _bool(), "shuffle": _bool(),
    "overlong": ("choice", ("truncate", "drop"), "one of truncate, drop"),
    "chat_template": ("choice", ("auto", "default"), "one of auto, default"),
    "cache_dir": _or_none(("path", None, "a directory path")),
    "num_proc": _or_none(_int(1)), "shard_mb": _or_none(_float(lambda v: v > 0, "a number of MB > 0")),
    "workers": _int(0), "read_ahead": _int(0),
    "tokenizer": _or_none(("path", None, "a tokenizer path")),
    "verify": ("choice", ("sampled", "full"), "one of sampled, full"),
    "skip_bad_records": _bool(), "allow_changed_data": _bool(),
}

CPU_COLLECTIVES = ("", "gloo", "mpi")
# distributed.<key>: (kind, check, allowed range); the unset ones are detected by jax.distributed.initialize
DISTRIBUTED = {
    "enabled": _bool(),
    "coordinator_address": ("str", lambda v: v == "" or ":" in v,
                            "host:port, or '' to detect it (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS)"),
    "num_processes": _or_none(_int(1)), "process_id": _or_none(_int(0)),
    "local_device_ids": _or_none(("list", lambda v: all(isinstance(i, int) and not isinstance(i, bool) for i in v),
                                  "a list of device ids")),
    "cpu_collectives": ("choice", CPU_COLLECTIVES, f"one of {', '.join(map(repr, CPU_COLLECTIVES))}"),
    "initialization_timeout": _int(1),
}


def unknown_key(key: str, known) -> ConfigError:
    """ConfigError for an unknown config key, with the closest known key as a suggestion."""
    *parent, leaf = key.split(".")
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" (did you mean {'.'.join(parent + close)!r}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _check_keys(cfg: dict) -> None:
    for section, known in SECTIONS.items():
        node = cfg.get(section, {}) if section else cfg
        for key in node or {}:
            if key not in known:
                raise unknown_key(f"{section}.{key}" if section else key, known)
    for key in cfg["train"]:
        if key not in TRAIN:
            raise unknown_key(f"train.{key}", TRAIN)
    for key in TRAIN:
        if key not in cfg["train"]:
            raise ConfigError(f"config key 'train.{key}' is missing (it must be {TRAIN[key][2]})")


def _check_values(section: str, values: dict, rules: dict) -> None:
    """ConfigError for the first value (in the order of `rules`) that its rule does not allow."""
    for key, (kind, check, allowed) in rules.items():
        if key not in values:
            continue
        v = values[key]
        if kind.startswith("optional "):
            if v is None:
                continue
            kind = kind.removeprefix("optional ")
        bad = False
        if kind == "choice":
            bad = v not in check
        elif kind == "bool":
            bad = not isinstance(v, bool)
        elif kind == "path":
            bad = not isinstance(v, (str, os.PathLike)) or not str(v)
        elif kind == "str":
            bad = not isinstance(v, str) or not check(v)
        elif kind == "list":
            bad = not isinstance(v, (list, tuple)) or not check(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and v != int(v)):
            bad = True
        else:
            bad = not (math.isfinite(v) and check(v))
        if bad:
            raise ConfigError(f"{section}.{key}={v!r}: must be {allowed}")


def check_data(d: dict) -> None:
    """ConfigError (one line) for an unknown `data` key or a value of the wrong type or range (the sources
    themselves are checked by btx_jax/data when they are read)."""
    for key in d:
        if key not in DATA:
            raise unknown_key(f"data.{key}", DATA)
    _check_values("data", d, DATA)


def _check_held_out(t: dict, d: dict) -> None:
    """train.eval_every > 0 needs held-out data (btx_jax/train/held_out.py): a source with an eval_path."""
    every = int(t["eval_every"])
    if every and d.get("kind") != "synthetic" and not any(
            isinstance(s, dict) and (s.get("eval_path") or s.get("bundled")) for s in d.get("sources") or []):
        raise ConfigError(f"train.eval_every={every}: no held-out data (set data.sources[i].eval_path to held-out "
                          "files of that source, or train.eval_every=0)")


def check_distributed(d: dict) -> None:
    """ConfigError (one line) for a bad distributed.* key or value; run before jax.distributed.initialize."""
    for key in d:
        if key not in DISTRIBUTED:
            raise unknown_key(f"distributed.{key}", DISTRIBUTED)
    _check_values("distributed", d, DISTRIBUTED)
    n, i = d.get("num_processes"), d.get("process_id")
    if n is not None and i is not None and i >= n:
        raise ConfigError(f"distributed.process_id={i}: must be < distributed.num_processes={n}")


def validate(cfg: dict, num_devices: int) -> tuple:
    """ConfigError (one line) for the first bad value of the resolved config; returns the mesh rules."""
    for section in ("train", "mesh", "model"):
        if not isinstance(cfg.get(section), dict):
            raise ConfigError(f"config section {section!r} is missing")
    _check_keys(cfg)
    check_distributed(cfg.get("distributed") or {})
    t = cfg["train"]
    _check_values("train", t, TRAIN)
    check_data(dict(cfg.get("data") or {}))
    _check_held_out(t, dict(cfg.get("data") or {}))
    wanted = int(cfg["mesh"].get("num_devices", 0))
    if wanted > num_devices:
        raise ConfigError(f"mesh.num_devices={wanted} but only {num_devices} devices are available")
    shape = mesh_lib.mesh_shape(cfg["mesh"], wanted or num_devices)
    sizes = dict(zip(mesh_lib.MESH_AXES, shape))
    rules = tuple((k, tuple(v)) for k, v in (cfg.get("mesh_rules") or mesh_lib.DEFAULT_RULES))
    dp = int(np.prod([sizes[a] for a in dict(rules)["batch"]]))
    gb, micro = int(t["global_batch_size"]), int(t["microbatches"])
    if gb % micro:
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by train.microbatches={micro}")
    if (gb // micro) % dp:
        raise ConfigError(f"train.global_batch_size/microbatches={gb // micro} is not divisible by the "
                          f"data-parallel size {dp} (mesh {sizes})")
    if gb % jax.process_count():
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by {jax.process_count()} processes")
    phases.trainable_patterns(cfg["phase"], cfg.get("trainable"))
    arch = cfg["model"].get("arch") or {}
    if cfg["model"].get("init", "random") == "random" and "max_position_embeddings" in arch:
        _check_positions(t, int(arch["max_position_embeddings"]), "model.arch")
    return rules


def _check_positions(t: dict, max_positions: int, where: str) -> None:
    if int(t["seq_len"]) > max_positions:
        raise ConfigError(f"train.seq_len={t['seq_len']}: must be <= {max_positions}, the model's "
                          f"max_position_embeddings ({where})")


def check_model(cfg: dict, config, paths: list[str]) -> None:
    """Checks against the starting model itself: seq_len within its positions, and every trainable pattern
    matching at least one of its parameters (a `router` phase on a model without routers is refused)."""
    _check_positions(cfg["train"], config.max_position_embeddings, f"model.init={cfg['model'].get('init')!r}")
    patterns = phases.trainable_patterns(cfg["phase"], cfg.get("trainable"))
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"trainable pattern {pattern!r} is not a regular expression ({e})") from None
        if not any(rx.fullmatch(p) for p in paths):
            which = "trainable" if cfg.get("trainable") else f"phase={cfg['phase']!r}"
            raise ConfigError(f"{which}: pattern '{pattern}' would match no parameter of the model loaded from "
                              f"model.init={cfg['model'].get('init')!r} (is it the right model for this phase?)")
