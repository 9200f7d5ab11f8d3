"""`load_pretrained` / `Pretrained`: the public face of a model (config + params) and its formats.

Formats: `hf` (config.json + safetensors), `btx` (btx_config.json + an orbax checkpoint of the params; lean
ones name the files their frozen weights come from, see btx_jax/checkpoint/btx.py), `peft`
(adapter_config.json + adapter_model.safetensors, LoRA only), `mergoo` (LoRA-MoE config.json + safetensors),
`mixtral` (an FFN-MoE as Hugging Face MixtralForCausalLM).  Loading detects the format from the directory's files.

Loading is sharded from the first byte: `open_model` describes a model without reading it (a `ModelSource`:
its config and how to make any subset of its leaves), and `ModelSource.fill(target)` creates each requested
leaf directly in its target dtype and `NamedSharding` — safetensors are read per device slice, btx
checkpoints restored by orbax into the shardings, fresh leaves initialised by a jit with `out_shardings`.
Host memory stays around one tensor above what the devices hold; no device holds more than its shard.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from btx_jax import mesh as mesh_lib, param_paths
from btx_jax.checkpoint import btx, hf as hf_format, mergoo, mixtral, peft
from btx_jax.checkpoint.tensor_files import CheckpointError, atomic_directory, read_json, write_tensors
from btx_jax.config import LlamaConfig
from btx_jax.model.generate import check_ids, check_sampling, generate as _generate
from btx_jax.model import Llama, abstract_leaves, init_leaves, routed_layers
from btx_jax.model.attention import DEFAULT_BLOCK, DEFAULT_IMPL

FORMATS = ("hf", "btx", "peft", "mergoo", "mixtral")
Target = dict[str, jax.ShapeDtypeStruct]          # {path: ShapeDtypeStruct with a sharding}
Arrays = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model not yet in memory: its config, a `fill(target) -> {path: array}` that materialises any subset
    of its leaves in the target dtypes and shardings, the JSON `reference` to the files its leaves come from
    (None for a model made in memory), and `covered`: the leaves that reference provides (others, such as
    fresh LoRA or routers, are made here and must be stored by whoever saves the model lean)."""
    config: LlamaConfig
    fill: Callable[[Target], Arrays]
    reference: dict | None = None
    covered: frozenset = frozenset()

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        return abstract_leaves(self.config)

    def load(self, *, dtype=None, mesh=None, rules=mesh_lib.DEFAULT_RULES) -> "Pretrained":
        """Every leaf in `dtype` (default fp32), sharded over `mesh` by `rules` (default: one device)."""
        dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
        target = mesh_lib.sharded_target(self.abstract(), mesh, rules, dtype)
        return Pretrained(self.config, param_paths.unflatten(self.fill(target)), dtype)

    def with_leaves(self, config: LlamaConfig, leaves: dict, covered: bool) -> "ModelSource":
        """This source with `leaves` ({path: lazy leaf or array}) added or replaced, as model `config`;
        `covered`: whether the reference still provides them (an adapter named in it) or not (computed)."""
        def fill(target: Target) -> Arrays:
            own = {p: mesh_lib.place(leaves[p], t) for p, t in target.items() if p in leaves}
            return {**own, **self.fill({p: t for p, t in target.items() if p not in leaves})}
        cov = self.covered | set(leaves) if covered else self.covered - set(leaves)
        return ModelSource(config, fill, self.reference, frozenset(cov))

    def with_fresh(self, config: LlamaConfig, seed: int) -> "ModelSource":
        """As model `config` (this model plus new leaves such as LoRA): the leaves this source lacks are
        initialised as `init_params(config, PRNGKey(seed))` would (LoRA B = 0: outputs unchanged)."""
        mine = set(self.abstract())

        def fill(target: Target) -> Arrays:
            out = self.fill({p: t for p, t in target.items() if p in mine})
            return {**out, **init_leaves(config, seed, {p: t for p, t in target.items() if p not in mine})}
        return ModelSource(config, fill, self.reference, self.covered)


def random_source(config: LlamaConfig, seed: int) -> ModelSource:
    """A freshly initialised model (pretraining from scratch)."""
    return ModelSource(config, lambda target: init_leaves(config, seed, target))


def memory_source(pre: "Pretrained") -> ModelSource:
    """A model already in memory as a source (its arrays re-placed in the target dtypes and shardings)."""
    flat = param_paths.flatten(pre.params)
    return ModelSource(pre.config, lambda target: {
        p: jax.device_put(flat[p].astype(t.dtype), t.sharding) for p, t in target.items()})


def _file_source(config: LlamaConfig, leaves: dict, directory: Path) -> ModelSource:
    fill = lambda target: {p: mesh_lib.place(leaves[p], t) for p, t in target.items()}  # noqa: E731
    return ModelSource(config, fill, {"path": str(directory.absolute())}, frozenset(leaves))


@dataclasses.dataclass
class Pretrained:
    """A Llama (optionally with LoRA / LoRA-MoE) ready for inference, export or training."""
    config: LlamaConfig
    params: dict
    dtype: jnp.dtype = jnp.float32          # compute dtype

    def model(self, deterministic: bool = True, remat: str = "none", dtype=None, attention: str = DEFAULT_IMPL,
              attention_block: int = DEFAULT_BLOCK) -> Llama:
        """The Flax module (compute dtype `dtype`, default this model's; attention: btx_jax/model/attention.py)."""
        param_dtype = jax.tree_util.tree_leaves(self.params)[0].dtype
        return Llama(self.config, dtype=jnp.dtype(dtype or self.dtype), param_dtype=param_dtype, remat=remat,
                     deterministic=deterministic, attention=attention, attention_block=attention_block)

    @classmethod
    def from_arrays(cls, config: LlamaConfig, flat: dict, dtype=None) -> "Pretrained":
        """A model from {path: array} (numpy or jax), in `dtype` (default fp32)."""
        dtype = jnp.dtype(dtype if dtype is not None else jnp.float32)
        return cls(config, param_paths.unflatten({k: jnp.asarray(v, dtype) for k, v in flat.items()}), dtype)

    def logits(self, input_ids) -> np.ndarray:
        """fp32 logits [batch, seq, vocab] for int token ids [batch, seq] (InputError for ids outside the
        vocabulary or longer than the model's positions)."""
        ids = jnp.asarray(check_ids(input_ids, self.config))
        return np.asarray(_logits(self.model(), self.params, ids), dtype=np.float32)

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> np.ndarray:
        """Prompt + `max_new_tokens` generated tokens, [batch, seq + max_new_tokens] (KV-cached).

        Prompts are padded to a multiple of 32 tokens internally, so calls with nearby lengths reuse one
        compilation.  InputError for ids outside the vocabulary, prompt + new tokens beyond the model's
        positions, max_new_tokens < 1, temperature < 0 or top_p outside (0, 1]."""
        check_sampling(max_new_tokens, temperature, top_p)
        ids = check_ids(input_ids, self.config, int(max_new_tokens))
        T = ids.shape[1]
        padded = np.zeros((ids.shape[0], -(-T // 32) * 32), np.int32)
        padded[:, :T] = ids
        new = _generate(self.model(), self.params, jnp.asarray(padded), jnp.int32(T), jax.random.PRNGKey(seed),
                        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        return np.concatenate([ids, np.asarray(new)], axis=1)

    def flat_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in param_paths.flatten(self.params).items()}

    def save_pretrained(self, dst: str | Path, format: str = "hf", *, merge_lora: bool = False,
                        overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                        progress: Callable[[int], None] | None = None) -> Path:
        """Write the model as `format` into `dst` (atomically: nothing is left at dst on error); `btx` is
        self-contained (every leaf: a lean final's whole chain resolved into one directory).  A `dst` that lean
        checkpoints are built on (btx_jax/checkpoint/btx.py `dependents`) is not replaced, even with `overwrite`.
        `progress(nbytes)` is called per tensor written (format 'hf')."""
        check_savable(self.config, format, merge_lora=merge_lora)
        dst = Path(dst)
        users = btx.dependents(dst) if overwrite and dst.is_dir() else []
        if users:
            raise CheckpointError(f"{dst}: not replaced: {len(users)} lean checkpoint(s) are built on it "
                                  f"({', '.join(map(str, users))}); export them first with `btx convert "
                                  "btx-to-btx --self-contained SRC DST`, or write elsewhere")
        nbytes = (sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.params))
                  if format in ("btx", "mergoo") else None)     # every tensor is written (hf/peft: a subset)
        with atomic_directory(dst, overwrite=overwrite, nbytes=nbytes) as tmp:
            if format == "btx":
                btx.save(tmp, self.config, self.params)
            elif format == "hf":
                save_hf(tmp, self, merge_lora=merge_lora, max_shard_bytes=max_shard_bytes, progress=progress)
            elif format == "mixtral":
                mixtral.save(tmp, self.config, param_paths.flatten(self.params), max_shard_bytes=max_shard_bytes,
                             progress=progress)          # device arrays: fetched one tensor at a time
            elif format == "peft":
                peft.save(tmp, self.config, self.flat_numpy())
            else:
                mergoo.save(tmp, self.config, self.flat_numpy(), max_shard_bytes=max_shard_bytes)
        return dst


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Llama, params, ids_BT):
    return model.apply({"params": params}, ids_BT)


def check_savable(config: LlamaConfig, format: str, *, merge_lora: bool = False) -> None:
    """CheckpointError (ValueError for an unknown format) unless a model of `config` can be saved as `format`:
    checked from the config alone, so a conversion refuses before it reads any weight."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    if format == "hf":
        if config.moe is not None:
            raise CheckpointError("this model is an FFN-MoE: save it with format='mixtral' (or 'btx')")
        if config.adapter is not None and not merge_lora:
            raise CheckpointError("this model has LoRA adapters: save with merge_lora=True (fold them into the "
                                  "base weights), format='peft' (adapter only) or format='mergoo' (LoRA-MoE)")
        peft.check_mergeable(config)
    elif format in ("mixtral", "peft", "mergoo"):
        {"mixtral": mixtral, "peft": peft, "mergoo": mergoo}[format].check_savable(config)


def save_hf(directory: Path, pre: Pretrained, *, merge_lora: bool = False,
            max_shard_bytes: int = 5 * 2**30, progress: Callable[[int], None] | None = None) -> None:
    """`pre` as a Hugging Face Llama in `directory` (after `check_savable`: LoRA folded in when it has any)."""
    flat = pre.flat_numpy()
    config = pre.config
    if config.adapter is not None:
        flat = peft.merged_kernels(flat, config)
        config = config.replace(adapter=None)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    write_tensors(directory, hf_format.export_tensors(flat, config, lambda p: True),
                  max_shard_bytes=max_shard_bytes, progress=progress)


CHAIN_COMMAND = "btx chain"


class ChainError(CheckpointError):
    """A link of a lean checkpoint's chain is missing or changed; the message names the whole chain and
    the command that lists it.  `problem`: what is wrong, without the chain."""

    def __init__(self, directory: Path, problem: str):
        self.problem = problem
        chain = " -> ".join(str(p) for p in btx.links(directory))
        super().__init__(f"{directory}: {problem}; its chain (each built on the next): {chain}; see each link's "
                         f"status with: {CHAIN_COMMAND} {directory}")


def _btx_source(directory: Path) -> ModelSource:
    directory = btx.resolve(directory)
    btx.check_acyclic(directory)
    config, reference = btx.read_config(directory)
    stored = btx.stored_shapes(directory)
    shapes = abstract_leaves(config)
    for path, sds in stored.items():
        if tuple(shapes.get(path, sds).shape) != tuple(sds.shape) or path not in shapes:
            raise CheckpointError(f"{directory}: stored leaf {path!r} {list(sds.shape)} does not belong to the "
                                  f"model in {btx.BTX_CONFIG}")
    try:
        base = reference_source(reference, config) if reference is not None else None
    except ChainError as e:
        raise ChainError(directory, e.problem) from None
    except CheckpointError as e:        # a directory it names is missing or unreadable
        raise ChainError(directory, f"a link is missing or unreadable ({e})") from None
    unstored = set(shapes) - set(stored)
    missing = sorted(unstored - set(base.abstract() if base else ()))
    if missing:
        raise CheckpointError(f"{directory}: leaf {missing[0]!r} is neither stored nor provided by "
                              f"{btx.FROZEN_FROM} {reference}")

    def fill(target: Target) -> Arrays:
        out = btx.restore(directory, {p: t for p, t in target.items() if p in stored})
        rest = {p: t for p, t in target.items() if p not in stored}
        if rest:
            try:
                frozen = base.fill(rest)
            except ChainError as e:
                raise ChainError(directory, e.problem) from None
            if reference.get("digest") and set(rest) == unstored:
                found = btx.digest(frozen)
                if found != reference["digest"]:
                    raise ChainError(directory, f"the frozen weights it was trained on ({reference['path']}) changed "
                                                f"since it was written (digest {reference['digest']}, now {found})")
            out.update(frozen)
        return out

    return ModelSource(config, fill, {"path": str(directory)}, frozenset(shapes))


def reference_source(reference: dict, config: LlamaConfig | None = None) -> ModelSource:
    """The model a `frozen_from` reference names: `path` (+ `adapter`), with `experts` (LoRA adapters)
    concatenated into the LoRA-MoE of `config` when given."""
    src = open_model(reference["path"], adapter=reference.get("adapter"))
    if reference.get("experts"):
        loras = [peft.load_adapter(e, src.config)[1] for e in reference["experts"]]
        src = dataclasses.replace(src.with_leaves(config, peft.concat_experts(loras, routed_layers(config)), True),
                                  reference={k: reference[k] for k in btx.REFERENCE_KEYS if k in reference})
    return src


def detect_format(directory: Path) -> str:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    if btx.is_btx(directory):
        return "btx"
    if (directory / "adapter_config.json").is_file():
        return "peft"
    if (directory / "config.json").is_file():
        raw = read_json(directory / "config.json")
        return "mergoo" if "adapter_configs" in raw else "mixtral" if raw.get("model_type") == "mixtral" else "hf"
    raise CheckpointError(f"{directory}: no config.json, {btx.BTX_CONFIG} or adapter_config.json found")


def open_model(path: str | Path, *, adapter: str | Path | None = None, allow_pickle: bool = False,
               progress: Callable[[int], None] | None = None) -> ModelSource:
    """The `ModelSource` of an HF Llama directory, a mergoo LoRA-MoE directory or a btx checkpoint (plus a
    PEFT / btx LoRA `adapter` on an HF base).  Reads configs and tensor headers only."""
    directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "peft":
        raise CheckpointError(f"{directory}: is a PEFT adapter; pass the base model as path and this "
                              "directory as adapter=")
    if fmt == "btx":
        src = _btx_source(directory)
    elif fmt == "mergoo":
        src = _file_source(*mergoo.load(directory, allow_pickle=allow_pickle), directory)
    elif fmt == "mixtral":
        src = _file_source(*mixtral.load(directory, allow_pickle=allow_pickle, progress=progress), directory)
    else:
        config, _ = hf_format.read_config(directory)
        leaves = hf_format.load_base(directory, config, allow_pickle=allow_pickle, progress=progress)
        src = _file_source(config, leaves, directory)
    if adapter is None:
        return src
    if src.config.adapter is not None:
        raise CheckpointError(f"{adapter}: the model already has an adapter; load the base model alone to attach one")
    warn_other_base(adapter, directory)
    config, lora = peft.load_adapter(adapter, src.config, allow_pickle=allow_pickle)
    return dataclasses.replace(src.with_leaves(config, lora, covered=True),
                               reference={**src.reference, "adapter": str(btx.resolve(adapter))})


def warn_other_base(adapter: str | Path, base: str | Path) -> None:
    """A warning line when a PEFT adapter's `base_model_name_or_path` names another model than the directory
    `base` it is applied to (a local directory elsewhere, or a hub name that is not part of `base`'s path): its
    shapes fit, its weights may not.  btx LoRA checkpoints record their base's digest instead (compose checks it)."""
    file = Path(adapter) / peft.ADAPTER_CONFIG
    named = read_json(file).get("base_model_name_or_path") if file.is_file() else None
    if not isinstance(named, str) or not named.strip():
        return
    here = btx.resolve(base)
    local = Path(named).expanduser()
    same = btx.resolve(local) == here if local.is_dir() else named.rstrip("/").rsplit("/", 1)[-1].lower() in \
        str(here).lower()
    if not same:
        print(f"warning: {file}: base_model_name_or_path is {named!r}, but the adapter is applied to {base} "
              "(trained on another base? the shapes fit)", file=sys.stderr)


def inference_dtype(dtype=None) -> jnp.dtype:
    """`dtype` (a name or dtype); None or "auto": bfloat16 on accelerators, float32 on CPU (evaluation, the
    lm-eval backend, generation)."""
    if dtype is None or str(dtype) == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def load_pretrained(path: str | Path, *, dtype=None, adapter: str | Path | None = None, allow_pickle: bool = False,
                    progress: Callable[[int], None] | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules=mesh_lib.DEFAULT_RULES) -> Pretrained:
    """Load an HF Llama or Mixtral directory, a mergoo LoRA-MoE directory or a btx_jax checkpoint.

    `adapter`: a PEFT LoRA directory (or btx LoRA checkpoint) applied on top of an HF base.
    `dtype`: parameter and compute dtype (default: fp32 params, fp32 compute).
    `mesh`/`rules`: shard every leaf over `mesh` by the logical-axis rules (btx_jax/mesh.py) as it is read;
    default: one device."""
    src = open_model(path, adapter=adapter, allow_pickle=allow_pickle, progress=progress)
    return src.load(dtype=dtype, mesh=mesh, rules=rules)
