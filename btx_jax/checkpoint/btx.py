"""The btx format: `btx_config.json` (the LlamaConfig, plus where frozen weights come from) and an orbax
checkpoint `params/` of the stored leaves.

A self-contained btx checkpoint stores every leaf.  A lean one (what training phases write as `final`)
stores only the leaves it changed and names the rest in `frozen_from`:

    {"path": DIR, "adapter": DIR or null, "experts": [DIR, ...] or null, "digest": "..."}

`path` is any directory `load_pretrained` reads (HF, mergoo, btx — lean ones resolve recursively),
`adapter` a LoRA adapter on it, `experts` LoRA experts concatenated into a LoRA-MoE on it (what `compose`
does), and `digest` the `digest()` of those frozen leaves when the checkpoint was written: loading checks it,
so a base that changed on disk since is reported instead of silently mixed with newer weights.

Versioned finals.  A training run writes each final as a new version `<run>/finals/<step>-<digest>/` (a btx
checkpoint, never rewritten) and makes `<run>/final/` name it: `final/` holds only `btx_final.json`,
{"version": "<step>-<digest>"}.  Every reader goes through `resolve`, so `<run>/final` loads the latest
version, while `frozen_from` records the version it was built on: continuing a run leaves the models built on
its earlier finals loadable.  Each final also registers itself in `dependents/` of the btx directories it
names, so what is built on a directory can be listed (`dependents`) before anything replaces it.  See
docs/finals.md.

Leaves are restored by orbax straight into the target shardings (each process reads its shards).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from btx_jax import param_paths
from btx_jax.checkpoint.tensor_files import ALLOW_EXTERNAL, CheckpointError, external_allowed, read_json
from btx_jax.config import ConfigError, LlamaConfig, config_from_dict, config_to_dict

BTX_CONFIG = "btx_config.json"
FROZEN_FROM = "frozen_from"
REFERENCE_KEYS = ("path", "adapter", "experts")
FINAL_POINTER = "btx_final.json"        # <run>/final/btx_final.json: {"version": NAME} of <run>/finals/NAME
FINALS = "finals"
RUN_INFO = "run_info.json"              # <run>/run_info.json: the training run's resolved config
DEPENDENTS = "dependents"               # <btx dir>/dependents/<hash>.json: {"path": a final built on it}


def resolve(directory: str | Path) -> Path:
    """The absolute directory that holds the checkpoint: the version a final pointer names
    (`<run>/final` -> `<run>/finals/<version>`), else `directory` itself."""
    directory = Path(directory).absolute()
    pointer = directory / FINAL_POINTER
    if not pointer.is_file():
        return directory
    name = read_json(pointer).get("version")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{pointer}: 'version' must name a directory in {directory.parent / FINALS}")
    return directory.parent / FINALS / name


def point_final(final: Path, version: Path) -> Path | None:
    """Make `final` name `version` (a directory in `final.parent / finals`), atomically; returns the version
    it named before (None if none).  A `final` that is itself a checkpoint (written before versioned finals)
    is moved to `finals/legacy[-n]` first, never deleted."""
    final = Path(final).absolute()
    previous = resolve(final) if final.is_dir() else None
    if previous == final:
        previous = final.parent / FINALS / "legacy"
        n = 1
        while previous.exists():
            n += 1
            previous = final.parent / FINALS / f"legacy-{n}"
        previous.parent.mkdir(parents=True, exist_ok=True)
        final.rename(previous)
    final.mkdir(parents=True, exist_ok=True)
    tmp = final / f".{FINAL_POINTER}.tmp"
    tmp.write_text(json.dumps({"version": version.name}))
    tmp.replace(final / FINAL_POINTER)
    return previous


def named(reference: dict | None) -> list[Path]:
    """The directories a frozen_from reference names (path, adapter, experts)."""
    if not reference:
        return []
    found = [reference["path"], reference.get("adapter"), *(reference.get("experts") or [])]
    return [Path(p) for p in found if p]


def links(directory: str | Path) -> list[Path]:
    """`directory` (resolved) and every directory its frozen_from names, recursively (depth first, each
    once): the chain a lean checkpoint needs.  Missing or unreadable links are listed, not followed."""
    out: list[Path] = []

    def visit(d: Path) -> None:
        try:
            d = resolve(d)
            reference = read_config(d)[1] if is_btx(d) else None
        except (CheckpointError, ConfigError):
            reference = None
        if d in out:
            return
        out.append(d)
        for up in named(reference):
            visit(up)

    visit(Path(directory))
    return out


def register_dependent(upstream: Path, dependent: Path) -> None:
    """Record in `upstream`'s dependents/ that the final `dependent` is built on it."""
    key = hashlib.sha256(str(dependent).encode()).hexdigest()[:16]
    folder = resolve(upstream) / DEPENDENTS
    folder.mkdir(exist_ok=True)
    (folder / f"{key}.json").write_text(json.dumps({"path": str(dependent)}))


def dependents(directory: str | Path) -> list[Path]:
    """The finals registered as built on `directory` that still exist and still name it in frozen_from."""
    directory = resolve(directory)
    out = []
    for record in sorted((directory / DEPENDENTS).glob("*.json")):
        try:
            path = Path(read_json(record)["path"])
            if any(resolve(up) == directory for up in named(read_config(path)[1])):
                out.append(path)
        except (CheckpointError, ConfigError, KeyError, TypeError):
            continue           # a dependent since removed or rewritten
    return out


def is_btx(directory: Path) -> bool:
    return (resolve(directory) / BTX_CONFIG).is_file()


def read_config(directory: str | Path) -> tuple[LlamaConfig, dict | None]:
    """(LlamaConfig, the frozen_from reference or None) of a btx checkpoint directory."""
    directory = resolve(directory)
    raw = dict(read_json(directory / BTX_CONFIG))
    reference = raw.pop(FROZEN_FROM, None)
    try:
        config = config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{Path(directory) / BTX_CONFIG}: {e}") from None
    if reference is not None:
        check_reference(directory / BTX_CONFIG, reference)
    return config, reference


def check_reference(file: Path, reference) -> None:
    """CheckpointError naming `file` and the entry unless `reference` is a frozen_from that btx_jax writes:
    absolute directory paths (`path`, optional `adapter`, `experts`) and the `digest` that verifies what they hold
    when loaded (so a reference edited to name other files is refused; BTX_ALLOW_EXTERNAL_FILES=1 accepts one
    without a digest)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("path"), str):
        raise CheckpointError(f"{file}: {FROZEN_FROM} must name a 'path'")
    experts = reference.get("experts")
    if experts is not None and not isinstance(experts, list):
        raise CheckpointError(f"{file}: {FROZEN_FROM} 'experts' must be a list of directories")
    entries = [("path", reference["path"]), ("adapter", reference.get("adapter")),
               *((f"experts[{i}]", e) for i, e in enumerate(experts or []))]
    for key, value in entries:
        if value is None and key == "adapter":
            continue
        if not isinstance(value, str) or not Path(value).is_absolute():
            raise CheckpointError(f"{file}: {FROZEN_FROM} {key!r} {value!r} is not an absolute directory path")
    if not isinstance(reference.get("digest"), str) and not external_allowed():
        raise CheckpointError(f"{file}: {FROZEN_FROM} names {reference['path']} without the 'digest' that verifies "
                              f"its weights (set {ALLOW_EXTERNAL}=1 to load it anyway)")


def check_acyclic(directory: str | Path) -> None:
    """CheckpointError naming the cycle when following frozen_from from `directory` comes back to a directory
    on the way (instead of recursing until Python gives up)."""
    done: set[Path] = set()

    def visit(d: Path, way: list[Path]) -> None:
        d = resolve(d)
        if d in way:
            cycle = " -> ".join(str(x) for x in [*way[way.index(d):], d])
            raise CheckpointError(f"{way[0] / BTX_CONFIG}: {FROZEN_FROM} forms a cycle: {cycle}")
        if d in done:
            return
        try:
            reference = read_config(d)[1] if is_btx(d) else None
        except (CheckpointError, ConfigError):
            reference = None          # reported when that link is loaded
        for up in named(reference):
            visit(up, [*way, d])
        done.add(d)

    visit(Path(directory), [])


def _params_dir(directory: Path) -> Path:
    path = resolve(directory) / "params"
    if not path.is_dir():
        raise CheckpointError(f"{path}: orbax checkpoint directory not found")
    return path


def stored_shapes(directory: str | Path) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of the leaves stored in the checkpoint (from its metadata; nothing is read)."""
    with ocp.StandardCheckpointer() as ckpt:
        try:
            meta = ckpt.metadata(_params_dir(directory)).item_metadata
            meta = getattr(meta, "tree", meta)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"{_params_dir(directory)}: unreadable orbax checkpoint ({e})") from None
    return {path: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for path, m in param_paths.flatten(meta).items()}


HOST_BUDGET = 2 ** 28        # host bytes a save or restore holds in flight (a larger leaf is copied alone)


def concurrent_gb(nbytes: int) -> float:
    """orbax's `*_concurrent_gb` for a limit of `nbytes` (orbax counts 10**9 bytes, and a read must be below it)."""
    return (nbytes + 1) / 10 ** 9


def largest_shard_bytes(tree) -> int:
    """Bytes of the largest one-device shard of the (abstract) arrays in `tree`: what one read holds on host
    (an array without a sharding counts whole)."""
    def shard(x):
        sharding = getattr(x, "sharding", None)
        return sharding.shard_shape(x.shape) if sharding is not None else x.shape
    return max((int(np.prod(shard(x))) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)),
               default=0)


def bounded_handler(largest_shard: int) -> ocp.PyTreeCheckpointHandler:
    """orbax's PyTree handler holding at most max(HOST_BUDGET, `largest_shard`) host bytes in flight: a save
    copies that much of the leaves from the devices at a time and writes it before copying more, a restore reads
    that much at a time.  orbax refuses a write or a read above its limit, so `largest_shard` must be at least
    the largest one-device shard saved or restored (`largest_shard_bytes`)."""
    limit = concurrent_gb(max(HOST_BUDGET, largest_shard))
    return ocp.PyTreeCheckpointHandler(save_concurrent_gb=limit, save_device_host_concurrent_gb=limit,
                                       restore_concurrent_gb=limit)


def restore(directory: str | Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The stored leaves named in `target`, in its dtypes and shardings (a ShapeDtypeStruct without a
    sharding restores as a host numpy array)."""
    if not target:
        return {}
    stored = stored_shapes(directory)
    for path, sds in target.items():
        if path not in stored:
            raise CheckpointError(f"{directory}: the checkpoint does not hold {path!r}")
        if tuple(stored[path].shape) != tuple(sds.shape):
            raise CheckpointError(f"{directory}: {path!r} has shape {list(stored[path].shape)}, expected "
                                  f"{list(sds.shape)}")
    item = param_paths.unflatten(dict(target))
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=len(target) < len(stored))
    with ocp.Checkpointer(bounded_handler(largest_shard_bytes(item))) as ckpt:    # host memory: about one batch
        out = param_paths.flatten(ckpt.restore(_params_dir(directory), args=args))
    for path, leaf in out.items():     # checked where the leaf lives: no extra host copy
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
            raise CheckpointError(f"{directory}: tensor {path!r} holds non-finite values (NaN/inf); refusing to load "
                                  "it")
    return out


def save(directory: Path, config: LlamaConfig, params: dict, reference: dict | None = None) -> None:
    """Write `params` (a tree or {path: array}; sharded arrays are written by every process) with
    `config` and, for a lean checkpoint, the `frozen_from` reference."""
    tree = params if any(isinstance(v, dict) for v in params.values()) else param_paths.unflatten(params)
    if jax.process_index() == 0:
        raw = config_to_dict(config)
        if reference is not None:
            raw[FROZEN_FROM] = reference
        (directory / BTX_CONFIG).write_text(json.dumps(raw, indent=2))
    with ocp.Checkpointer(bounded_handler(largest_shard_bytes(tree))) as ckpt:   # one batch on host at a time
        ckpt.save((directory / "params").absolute(), args=ocp.args.PyTreeSave(tree))


def _fingerprint(x):
    """Two uint32 checksums of a leaf rounded to bf16: plain and position-weighted sums (wrapping), positions
    counted row-major.  Both sums are one variadic reduction, which XLA fuses with the elementwise terms: no
    temporary of the leaf's size (two separate sums materialise 8 bytes per element)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    position, stride = jnp.zeros(x.shape, jnp.uint32), 1        # row-major index, built in place: a reshape
    for dim in reversed(range(x.ndim)):                          # of a sharded leaf would gather it
        position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    weights = position * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)
    zero = jnp.uint32(0)
    plain, weighted = jax.lax.reduce((bits, bits * weights), (zero, zero),
                                     lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
    return jnp.stack([plain, weighted])


_jit_fingerprint = jax.jit(_fingerprint)


def digest(flat: dict[str, jax.Array]) -> str:
    """Content digest of {path: array}: a checksum of every leaf rounded to bf16, computed where the leaves
    live (sharded arrays stay sharded; integer sums are exact in any order), combined with the paths and
    shapes.  bf16 rounding makes a base read in fp32 and the same base kept in bf16 digest alike."""
    h = hashlib.sha256()
    for path in sorted(flat):                  # one leaf at a time: temporaries stay at one leaf's size
        sums = np.asarray(jax.device_get(_jit_fingerprint(flat[path]))).tolist()
        h.update(f"{path}:{list(flat[path].shape)}:{sums};".encode())
    return h.hexdigest()[:32]
