"""The btx config schema: one declaration per section, each field with its default, type, allowed values,
whether it may change on resume, and a one-line doc.  Everything else reads it: configs/common.py's
base_config (defaults), btx_jax/train/validate.py (types, ranges, unknown keys), btx_jax/train/checkpoints.py
(which keys may change on resume) and docs/reference/configuration.md (`python -m btx_jax.schema`).

    run = parse(cfg)            # resolved ConfigDict or dict -> Run (frozen dataclasses); ConfigError naming the key
    run.train.steps, run.data.kind, run.mesh.fsdp
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from typing import Any, Callable

from btx_jax.config import ALL_TARGETS, ATTENTION_IMPLS, DTYPES, LOSS_LAYOUTS, REMAT_CHOICES, ConfigError, LlamaConfig


def field(default, doc: str, *, kind: str, allowed: str, check: Callable | None = None,
          choices: tuple = (), resumable: bool = False, optional: bool = False):
    """A schema field: `kind` int | float | bool | choice | str | path | list | dict (a value is checked by its
    kind, then `check`); `allowed` says the range in words (error messages and the reference)."""
    meta = dict(doc=doc, kind=kind, allowed=allowed + (" or None" if optional else ""), check=check,
                choices=choices, resumable=resumable, optional=optional)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _int(default, lo: int, doc: str, **kw):
    return field(default, doc, kind="int", allowed=f"an integer >= {lo}", check=lambda v: v >= lo, **kw)


def _num(default, check, allowed: str, doc: str, **kw):
    return field(default, doc, kind="float", allowed=allowed, check=check, **kw)


def _bool(default, doc: str, **kw):
    return field(default, doc, kind="bool", allowed="True or False", **kw)


def _choice(default, choices: tuple, doc: str, **kw):
    return field(default, doc, kind="choice", allowed=f"one of {', '.join(map(str, choices))}", choices=choices, **kw)


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = _int(100, 1, "optimizer steps of the phase", resumable=True)
    global_batch_size: int = _int(8, 1, "sequences per step, over all processes")
    microbatches: int = _int(1, 1, "gradient accumulation: the batch is split into this many microbatches")
    seq_len: int = _int(256, 1, "tokens per sequence")
    lr: float = _num(1e-3, lambda v: v > 0, "a number > 0", "peak learning rate (AdamW)")
    warmup_steps: int = _int(10, 0, "linear warm-up steps")
    warmup_offset: int = _int(1, 0, "warm-up starts at step offset / warmup_steps (1: the first step has lr > 0)")
    min_lr_ratio: float = _num(0.1, lambda v: 0 <= v <= 1, "between 0 and 1", "cosine decay floor, as a share of lr")
    weight_decay: float = _num(0.0, lambda v: v >= 0, "a number >= 0", "AdamW weight decay")
    grad_clip: float = _num(1.0, lambda v: v >= 0, "a number >= 0 (0 = no clipping)", "global gradient-norm clip")
    b1: float = _num(0.9, lambda v: 0 <= v < 1, "in [0, 1)", "AdamW beta1")
    b2: float = _num(0.95, lambda v: 0 <= v < 1, "in [0, 1)", "AdamW beta2")
    eps: float = _num(1e-8, lambda v: v > 0, "a number > 0", "AdamW epsilon")
    lb_alpha: float = _num(0.01, lambda v: v >= 0, "a number >= 0", "router load-balancing loss weight (BTX: 0.01)")
    z_alpha: float = _num(0.0, lambda v: v >= 0, "a number >= 0", "router z-loss weight")
    dtype: str = _choice("float32", DTYPES, "compute dtype")
    frozen_dtype: str = _choice("float32", DTYPES, "dtype the frozen weights are held in")
    remat: str = _choice("none", REMAT_CHOICES, "rematerialisation policy per layer (btx_jax/model/llama.py)",
                         resumable=True)
    attention: str = _choice("auto", ATTENTION_IMPLS, "attention kernel (btx_jax/model/attention.py; xla = reference)",
                             resumable=True)
    attention_block: int = _int(64, 1, "attention block size (blocked / splash / triton kernels)", resumable=True)
    loss_chunk: int = _int(512, 0, "lm_head + cross-entropy this many positions at a time; 0 = full logits")
    loss_layout: str = _choice("auto", LOSS_LAYOUTS, "chunked loss sharding: batch | vocab | auto (fewer bytes)",
                               resumable=True)
    skip_nonfinite: bool = _bool(False, "skip a step with a non-finite loss or gradient instead of stopping")
    max_consecutive_nonfinite: int = _int(5, 1, "stop after this many skipped steps in a row")
    seed: int = _int(0, 0, "seed of the parameter init, dropout and data order")
    log_every: int = _int(10, 1, "log metrics every N steps", resumable=True)
    ckpt_every: int = _int(50, 1, "save a checkpoint every N steps", resumable=True)
    keep_checkpoints: int = _int(2, 1, "checkpoints kept (the newest)", resumable=True)
    eval_every: int = _int(0, 0, "evaluate held-out loss every N steps and at the end (0 = off; needs a source "
                           "with an eval_path; btx_jax/train/held_out.py)", resumable=True)
    eval_batches: int = _int(4, 1, "held-out batches of global_batch_size rows per domain per evaluation",
                             resumable=True)


@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int = _int(1, -1, "data-parallel axis size (-1: the devices left)", resumable=True)
    fsdp: int = _int(-1, -1, "fully-sharded data-parallel axis size (-1: the devices left)", resumable=True)
    tensor: int = _int(1, -1, "tensor-parallel axis size (-1: the devices left)", resumable=True)
    expert: int = _int(1, -1, "expert-parallel axis size (-1: the devices left)", resumable=True)
    num_devices: int = _int(0, 0, "devices the mesh uses (0 = all)", resumable=True)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and bool(str(v))


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int = _int(8, 1, "LoRA rank r of every target")
    alpha: float = _num(16.0, lambda v: v > 0, "a number > 0", "LoRA alpha: the update is scaled by alpha / r "
                        "(alpha / sqrt(r) with rslora)")
    targets: list = field(["gate_proj", "up_proj", "down_proj"], "the projections of every layer that get LoRA",
                          kind="list", allowed=f"a list of {', '.join(ALL_TARGETS)}",
                          check=lambda v: bool(v) and all(t in ALL_TARGETS for t in v))
    dropout: float = _num(0.0, lambda v: 0 <= v < 1, "in [0, 1)", "dropout on the LoRA branch's input (training)")
    rslora: bool = _bool(False, "rank-stabilised LoRA: scale alpha / sqrt(r)")
    init: str = _choice("kaiming", ("kaiming", "gaussian"), "init of LoRA A (B starts at zero: the model's output "
                        "is unchanged at step 0)")


ARCH_KEYS = tuple(f.name for f in dataclasses.fields(LlamaConfig) if "doc" in f.metadata)   # model.arch's keys


@dataclasses.dataclass(frozen=True)
class Model:
    init: str = field("random", "'random' or a model directory (HF, mergoo, btx) the phase starts from",
                      kind="path", allowed="'random' or a model directory", check=_is_path)
    arch: dict = field({}, "the architecture of a random model (init='random'; configs/common.py ARCHS): "
                       "`model.arch` below", kind="dict", allowed="a dict of LlamaConfig fields")
    lora: Lora | None = field({}, "a fresh LoRA, added for the expert phase: `model.lora` below (empty = none)",
                              kind="dict", allowed="a dict of LoRA settings", optional=True)
    compose: dict = field({}, "compose before training (router phase): experts, mode, top_k, seed_expert, "
                          "router_init (empty = none)", kind="dict", allowed="a dict of compose settings",
                          optional=True)


@dataclasses.dataclass(frozen=True)
class Data:
    kind: str = _choice("pretrain", ("pretrain", "sft", "synthetic"), "pretraining text, SFT records, or random tokens")
    sources: list = field([], "source dicts (btx_jax/data/sources.py): name, path, ratio, text_field / template, ...",
                          kind="list", allowed="a non-empty list of source dicts", check=lambda v: len(v) > 0)
    add_bos: bool = _bool(True, "each document / example starts with BOS")
    add_eos: bool = _bool(True, "each pretraining document ends with EOS")
    segment_ids: bool = _bool(True, "packed documents get their own segments (never attend to each other)")
    shuffle: bool = _bool(True, "document / row order drawn from train.seed")
    overlong: str = _choice("truncate", ("truncate", "drop"), "SFT examples longer than seq_len + 1 tokens")
    chat_template: str = _choice("auto", ("auto", "default"), "the tokenizer's chat template (auto) or the default")
    cache_dir: str = field(None, "where tokenised stores go (None: $BTX_DATA_CACHE, else ~/.cache/btx_jax/data)",
                           kind="path", allowed="a directory path", check=_is_path, optional=True)
    num_proc: int = _int(None, 1, "processes tokenising a store (None: every core for 64 MB or more)", optional=True)
    shard_mb: float = _num(None, lambda v: v > 0, "a number of MB > 0", "store build shard size in MB (default 64)",
                           optional=True)
    verify: str = _choice("sampled", ("sampled", "full"), "store checksums checked on a few blocks or every byte",
                          resumable=True)
    skip_bad_records: bool = _bool(False, "skip SFT records without prompt or response instead of refusing them")
    allow_changed_data: bool = _bool(False, "resume even when the store differs from the checkpoint's",
                                     resumable=True)
    workers: int = _int(0, 0, "grain worker processes building batches (0: a read-ahead thread)")
    read_ahead: int = _int(2, 0, "batches prefetched ahead of the trainer (0: built on demand)")
    tokenizer: str = field(None, "sentencepiece .model or tokenizer directory (bundled: = the package's)",
                           kind="path", allowed="a tokenizer path", check=_is_path, optional=True)


CPU_COLLECTIVES = ("", "gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class Distributed:
    enabled: bool = _bool(False, "call jax.distributed.initialize (multi-host runs)", resumable=True)
    coordinator_address: str = field(
        "", "coordinator host:port ('' = detected: SLURM, TPU pods, JAX_COORDINATOR_ADDRESS)", kind="str",
        allowed="host:port, or '' to detect it (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS)",
        check=lambda v: v == "" or ":" in v, resumable=True)
    num_processes: int = _int(None, 1, "processes of the run (None = detected)", optional=True, resumable=True)
    process_id: int = _int(None, 0, "this process's index (None = detected)", optional=True, resumable=True)
    local_device_ids: list = field(
        None, "devices this process uses (None = all local ones)", kind="list", allowed="a list of device ids",
        check=lambda v: all(isinstance(i, int) and not isinstance(i, bool) for i in v), optional=True,
        resumable=True)
    cpu_collectives: str = field("", "CPU collectives implementation ('' = JAX's default)", kind="choice",
                                 allowed=f"one of {', '.join(map(repr, CPU_COLLECTIVES))}", choices=CPU_COLLECTIVES,
                                 resumable=True)
    initialization_timeout: int = _int(300, 1, "seconds to wait for every process to reach the coordinator",
                                       resumable=True)


@dataclasses.dataclass(frozen=True)
class Run:
    phase: str = field("full", "expert | router | sft | full | ... (btx_jax/train/phases.py)", kind="str",
                       allowed="a phase name", check=lambda v: bool(v))
    trainable: list = field([], "regexes over parameter paths; empty = the phase's table", kind="list",
                            allowed="a list of regexes")
    mesh_rules: list = field([], "logical axis -> mesh axes rules; empty = btx_jax.mesh.DEFAULT_RULES", kind="list",
                             allowed="a list of (axis, mesh axes) pairs")
    model: Model = dataclasses.field(default_factory=Model, metadata=dict(doc="the starting model"))
    mesh: Mesh = dataclasses.field(default_factory=Mesh, metadata=dict(doc="the device mesh", resumable=True))
    train: Train = dataclasses.field(default_factory=Train, metadata=dict(doc="optimisation and the step"))
    data: Data = dataclasses.field(default_factory=Data, metadata=dict(doc="the training data"))
    distributed: Distributed = dataclasses.field(default_factory=Distributed,
                                                 metadata=dict(doc="multi-host start-up", resumable=True))


SECTIONS = {"model": Model, "mesh": Mesh, "train": Train, "data": Data, "distributed": Distributed}
# Top-level keys that are not part of the schema's sections but a run may carry (written by the CLI).
EXTRA_RESUMABLE = ("export", "eval")


def fields(cls) -> tuple[dataclasses.Field, ...]:
    """The schema fields of a section (not the sub-sections of Run)."""
    return tuple(f for f in dataclasses.fields(cls) if f.name not in SECTIONS)


def plain(cfg) -> Any:
    """A ConfigDict (or anything with to_dict) as plain dicts and lists; the one place that coercion happens."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if isinstance(cfg, dict):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg


def unknown_key(key: str, known) -> ConfigError:
    """ConfigError for an unknown config key, with the closest known key as a suggestion."""
    *parent, leaf = key.split(".")
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" (did you mean {'.'.join(parent + close)!r}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(section: str, values: dict, cls) -> None:
    """ConfigError (with "did you mean") for the first key of `values` that `cls` does not declare."""
    for key in values or {}:
        if key not in names(cls):
            raise unknown_key(f"{section}.{key}" if section else key, names(cls))


def check_values(section: str, values: dict, cls) -> None:
    """ConfigError for the first value (in declaration order) that its field does not allow."""
    for f in fields(cls):
        if f.name not in values:
            continue
        v, m = values[f.name], f.metadata
        if v is None and m["optional"]:
            continue
        kind, check = m["kind"], m["check"]
        if kind == "choice":
            bad = v not in m["choices"]
        elif kind == "bool":
            bad = not isinstance(v, bool)
        elif kind in ("path", "str"):
            bad = not isinstance(v, (str, os.PathLike) if kind == "path" else str) or not check(v)
        elif kind == "list":
            bad = not isinstance(v, (list, tuple)) or (check is not None and not check(v))
        elif kind == "dict":
            bad = not isinstance(v, dict)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and v != int(v)):
            bad = True
        else:
            bad = not (math.isfinite(v) and check(v))
        if bad:
            raise ConfigError(f"{section}.{f.name}={v!r}: must be {m['allowed']}")


def _model(values: dict) -> dict:
    """The model section's values with its sub-dicts checked: `arch` keys (LlamaConfig fields), `lora` as a
    typed `Lora` (None when empty).  `compose` is checked by its mode's spec (btx_jax/mix/compose.py)."""
    arch = values.get("arch") or {}
    if not isinstance(arch, dict):
        raise ConfigError(f"model.arch={arch!r}: must be a dict of LlamaConfig fields")
    for key in arch:
        if key not in ARCH_KEYS:
            raise unknown_key(f"model.arch.{key}", ARCH_KEYS)
    return {**values, "arch": {k: _tuples(v) for k, v in arch.items()},
            "lora": parse_lora(values["lora"]) if values.get("lora") else None}


def _tuples(v):
    """Lists (as plain() writes a config's tuples) back to tuples: LlamaConfig is hashable."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def parse_lora(values: dict) -> Lora:
    """`model.lora` (a dict of LoRA settings) as a typed Lora; ConfigError naming the key otherwise."""
    values = plain(values)
    check_keys("model.lora", values, Lora)
    check_values("model.lora", values, Lora)
    return _typed(Lora, {**values, "targets": list(values.get("targets", Lora().targets))})


def _typed(cls, values: dict):
    out = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if v is not None and f.metadata["kind"] == "int":
            v = int(v)
        elif v is not None and f.metadata["kind"] == "float":
            v = float(v)
        out[f.name] = v
    return cls(**out)


def parse(cfg) -> Run:
    """The resolved config (ConfigDict or dict) as typed objects; ConfigError naming the first unknown key or
    bad value.  Keys a config leaves out take the schema's defaults."""
    d = plain(cfg)
    for key in d:
        if key not in names(Run) + EXTRA_RESUMABLE:
            raise unknown_key(key, names(Run))
    sections = {}
    for name, cls in SECTIONS.items():
        values = d.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a dict, not {values!r}")
        check_keys(name, values, cls)
        check_values(name, values, cls)
        sections[name] = _typed(cls, _model(values) if cls is Model else values)
    top = {k: d[k] for k in ("phase", "trainable", "mesh_rules") if k in d and d[k] is not None}
    check_values("", top, Run)
    return Run(**top, **sections)


def defaults(cls) -> dict:
    """{key: default} of a section (what configs/common.py's base_config starts from)."""
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default) for f in fields(cls)}


def resumable_keys() -> tuple[str, ...]:
    """Dotted keys (sections or fields) whose value may change between a run and its resumption."""
    out = [f.name for f in dataclasses.fields(Run) if f.metadata.get("resumable")]
    for name, cls in SECTIONS.items():
        if name not in out:
            out += [f"{name}.{f.name}" for f in fields(cls) if f.metadata["resumable"]]
    return tuple(out) + EXTRA_RESUMABLE


def _type_name(f: dataclasses.Field) -> str:
    if f.metadata.get("kind") == "dict":        # as a config writes it (model.lora is typed when parsed)
        t = "dict"
    else:
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t + (" or None" if f.metadata.get("optional") else "")


def reference() -> str:
    """docs/reference/configuration.md: one table per section (`python -m btx_jax.schema` prints it)."""
    lines = ["# Configuration reference", "",
             "Generated from `btx_jax/schema.py` by `python -m btx_jax.schema > docs/reference/configuration.md`;",
             "do not edit by hand. A key a config leaves out takes its default. *Resumable*: the value may change",
             "when a run is resumed from its checkpoints (any other change is refused).", ""]
    for title, cls, prefix in [("Top level", Run, "")] + [(n, c, n + ".") for n, c in SECTIONS.items()]:
        doc = "" if cls is Run else dataclasses.fields(Run)[names(Run).index(title)].metadata["doc"]
        lines += [f"## `{title}`" if cls is not Run else "## Top level", ""]
        if doc:
            lines += [doc[0].upper() + doc[1:] + ".", ""]
        lines += ["| key | type | default | allowed | resumable | doc |", "|---|---|---|---|---|---|"]
        section_resumable = cls is not Run and dataclasses.fields(Run)[names(Run).index(title)].metadata.get(
            "resumable", False)
        for f in fields(cls):
            m = f.metadata
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            cell = lambda s: str(s).replace("|", "\\|")      # noqa: E731
            lines.append(f"| `{prefix}{f.name}` | {_type_name(f)} | `{default!r}` | {cell(m['allowed'])} | "
                         f"{'yes' if m['resumable'] or section_resumable else 'no'} | {cell(m['doc'])} |")
        lines.append("")
        if cls is Model:
            lines += _model_tables()
    return "\n".join(lines)


def _model_tables() -> list[str]:
    """The reference's sub-tables of `model`: the LoRA settings and the architecture (LlamaConfig's fields)."""
    cell = lambda s: str(s).replace("|", "\\|")      # noqa: E731
    lines = ["### `model.lora`", "", "| key | type | default | allowed | doc |", "|---|---|---|---|---|"]
    for f in fields(Lora):
        lines.append(f"| `model.lora.{f.name}` | {_type_name(f)} | `{defaults(Lora)[f.name]!r}` | "
                     f"{cell(f.metadata['allowed'])} | {cell(f.metadata['doc'])} |")
    lines += ["", "### `model.arch`", "",
              "Checked by `LlamaConfig` (btx_jax/config.py) when the run starts from a random model; a key not "
              "listed here is refused.", "", "| key | type | default | doc |", "|---|---|---|---|"]
    for f in dataclasses.fields(LlamaConfig):
        if f.name in ARCH_KEYS:
            default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
            lines.append(f"| `model.arch.{f.name}` | {cell(f.type)} | {default} | {cell(f.metadata['doc'])} |")
    return lines + ["", "`model.compose` takes `experts` (directories), `mode` (`lora`: a LoRA-MoE, or `ffn`: an "
                    "FFN-MoE) and the fields of that mode's spec, `LoraMoESpec` or `FfnMoESpec` (btx_jax/mix/"
                    "compose.py; [the pipeline](../pipeline.md)); `router_seed` defaults to `train.seed`.", ""]


typing.get_type_hints(Run)       # the annotations resolve (a typo in one fails at import)

if __name__ == "__main__":
    sys.stdout.write(reference())
