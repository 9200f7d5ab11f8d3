"""Every check of a training config that needs no compilation, run before anything is compiled or written.

    rules = validate(cfg, num_devices)       # the resolved config (plain dict); mesh rules for the run
    check_model(cfg, pre)                    # after the starting model is loaded: positions, phase patterns

Each failure is a ConfigError of one line naming the key, its value and what is allowed; train() runs both
before it creates the work directory, so a bad value costs seconds and leaves nothing behind.  Unknown keys
get a "did you mean" suggestion (the command line's typos are caught earlier, by btx_jax/command_line.py's flag
parser; these checks also cover configs built in Python).  The keys, types and ranges are btx_jax/schema.py's.
"""
from __future__ import annotations

import re

import jax
import numpy as np

from btx_jax import mesh as mesh_lib, schema
from btx_jax.config import ConfigError
from btx_jax.train import phases


def _check_keys(cfg: dict) -> None:
    schema.check_keys("", cfg, schema.Run)
    for name, cls in schema.SECTIONS.items():
        schema.check_keys(name, cfg.get(name) or {}, cls)
    for f in schema.fields(schema.Train):
        if f.name not in cfg["train"]:
            raise ConfigError(f"config key 'train.{f.name}' is missing (it must be {f.metadata['allowed']})")


def check_data(d: dict) -> None:
    """ConfigError (one line) for an unknown `data` key or a value of the wrong type or range (the sources
    themselves are checked by btx_jax/data when they are read)."""
    schema.check_keys("data", d, schema.Data)
    schema.check_values("data", d, schema.Data)


def _check_held_out(t: dict, d: dict) -> None:
    """train.eval_every > 0 needs held-out data (btx_jax/train/held_out.py): a source with an eval_path."""
    every = int(t["eval_every"])
    if every and d.get("kind") != "synthetic" and not any(
            isinstance(s, dict) and (s.get("eval_path") or s.get("bundled")) for s in d.get("sources") or []):
        raise ConfigError(f"train.eval_every={every}: no held-out data (set data.sources[i].eval_path to held-out "
                          "files of that source, or train.eval_every=0)")


def check_distributed(d: dict) -> None:
    """ConfigError (one line) for a bad distributed.* key or value; run before jax.distributed.initialize."""
    schema.check_keys("distributed", d, schema.Distributed)
    schema.check_values("distributed", d, schema.Distributed)
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
    schema.check_values("train", t, schema.Train)
    check_data(dict(cfg.get("data") or {}))
    _check_held_out(t, dict(cfg.get("data") or {}))
    schema.check_values("mesh", cfg["mesh"], schema.Mesh)
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
