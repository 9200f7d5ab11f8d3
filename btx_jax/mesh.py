"""Device mesh and sharding: logical axis names (btx_jax/param_paths.py) -> mesh axes by swappable rules.

Mesh axes are `data`, `fsdp`, `tensor` and `expert`. A rule maps a logical axis to a tuple of mesh axes; for each
weight, dimensions are visited left to right and take the rule's mesh axes not already used by an earlier
dimension and dividing the dimension.  The FSDP default shards every weight matrix over `fsdp` on one
dimension; batches are sharded over (`data`, `fsdp`, `expert`).  The `expert` axis (size 1 unless set) shards
the FFN-MoE's stacked experts (logical axis `expert`, btx_jax/model/moe_ffn.py) while the rest of the model is
data-parallel over it: expert parallelism.  XLA's partitioner places the token dispatch (gathers by expert).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btx_jax import param_paths
from btx_jax.checkpoint import lazy
from btx_jax.config import MESH_AXES, ConfigError

DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", ("tensor", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor", "fsdp")),
    ("q_heads", ("tensor", "fsdp")),
    ("kv_heads", ("tensor", "fsdp")),
    ("lora_rank", ()),
    ("experts", ()),                  # router outputs (LoRA-MoE and FFN-MoE): small, replicated
    ("expert", ("expert",)),          # the FFN-MoE's stacked expert weights
    ("layers", ()),
    ("norm", ()),
)


_RULES = contextvars.ContextVar("btx_jax_mesh_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules):
    """Within the block, `rules_in_context()` is `rules` (the train step sets it while tracing, next to the
    abstract mesh, for kernels that run per shard: btx_jax/model/per_shard.py)."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def rules_in_context():
    """The mesh rules set by the innermost `use_rules` (default: DEFAULT_RULES)."""
    return _RULES.get()


def mesh_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
    """Resolve axis sizes (one may be -1 = the rest) against the device count; ConfigError if impossible."""
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: at most one axis may be -1, none 0")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible "
                              f"by {known}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                          f"{num_devices} available")
    return tuple(shape)


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """Mesh over `devices` (default: all, or the first `sizes['num_devices']` when that is > 0)."""
    devices = jax.devices() if devices is None else devices
    if int(sizes.get("num_devices", 0)) > 0:
        devices = devices[:int(sizes["num_devices"])]
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name not in table:
            raise ConfigError(f"logical axis {name!r} has no sharding rule")
        picked = []
        for mesh_axis in table[name]:
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in picked) * size):
                continue
            picked.append(mesh_axis)
        used.update(picked)
        spec.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    return P(*spec)


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every leaf of a params tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: NamedSharding(mesh, spec_for(param_paths.rule_for(param_paths.path_str(kp)).axes,
                                                      leaf.shape, mesh, rules)), tree)


def gathered_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """The spec a weight is computed with: its stored spec without the batch's mesh axes (FSDP gathers the
    weight; tensor / expert parallel shards stay), so activations keep their batch sharding."""
    batch_axes = set(dict(rules)["batch"])
    spec = []
    for entry in spec_for(axes, shape, mesh, rules):
        kept = tuple(a for a in entry_axes(entry) if a not in batch_axes)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*spec)


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of them)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    axes = tuple(a for a in dict(rules)["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None, None))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    return math.prod(mesh.shape[a] for a in dict(rules)["batch"])


def bytes_per_device(tree, shardings) -> int:
    """Largest per-device byte count of a (sharded) tree, computed from the shardings' shard shapes."""
    total = 0
    for leaf, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def single_device_mesh() -> Mesh:
    """A 1-device mesh on the first local device (where an unsharded model lives)."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def sharded_target(shapes: dict, mesh: Mesh | None = None, rules=DEFAULT_RULES, dtype=None) -> dict:
    """{path: ShapeDtypeStruct with its NamedSharding} for {path: shape-and-dtype} (a model's abstract
    leaves); `dtype` overrides every leaf's dtype; no mesh = one device."""
    mesh = single_device_mesh() if mesh is None else mesh
    return {path: jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(dtype or s.dtype), sharding=NamedSharding(
        mesh, spec_for(param_paths.rule_for(path).axes, tuple(s.shape), mesh, rules))) for path, s in shapes.items()}


def place(leaf, target: jax.ShapeDtypeStruct) -> jax.Array:
    """`leaf` (a lazy leaf or a numpy array) as a jax.Array with `target`'s dtype and sharding; each device's
    shard is read on its own (`leaf[shard index]`), so the whole leaf never exists on one device or in host
    memory unless it is small enough to be held anyway."""
    if tuple(leaf.shape) != tuple(target.shape):
        raise ValueError(f"leaf of shape {list(leaf.shape)} cannot be placed as {list(target.shape)}")
    with lazy.reading():        # leaves read whole (a LoRA of a btx checkpoint): once per placement, then freed
        return jax.make_array_from_callback(tuple(target.shape), target.sharding,
                                            lambda index: host_buffer(leaf[index], target.dtype))


ALIGN = 64       # XLA:CPU adopts a host buffer aligned to this many bytes instead of copying it


def host_buffer(x, dtype) -> np.ndarray:
    """`x` as a new `dtype` array in 64-byte-aligned memory: a CPU device takes it over without a copy (so
    placing a converted leaf holds it once, not twice); other devices copy it to theirs as they would any array."""
    x = np.asarray(x)
    dtype = np.dtype(dtype)
    nbytes = x.size * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    out = raw[start:start + nbytes].view(dtype).reshape(x.shape)
    out[...] = x
    return out


def inference_mesh() -> Mesh:
    """Where evaluation and the lm-eval backend hold a model: every local device (FSDP, as training shards it)
    on accelerators; one device on CPU, whose virtual devices share the host's memory (sharding there saves no
    memory and costs each device its own gathered copy of every layer's weights during the forward pass)."""
    if jax.default_backend() == "cpu":
        return single_device_mesh()
    return make_mesh({"fsdp": -1}, jax.local_devices())
