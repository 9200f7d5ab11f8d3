"""Compile targets for hardware that is not here: N virtual CPU devices, a real TPU topology, or GPU nodes.

    target = parse_target("tpu:v5p-8")        # or "cpu:8", "tpu:v5e-16", "tpu:v6e:2x4" (a libtpu topology name),
                                              # "gpu:h100-8", "gpu:h100-2x8" (nodes x GPUs), "gpu:my.txtpb@8"
    with compile_only(target):                # entry points, before JAX starts its backends: platform and flags
    devices = target_devices(target)          # compile-only TPU / GPU devices, or the virtual CPU devices
    compiled, seconds = compile_lowered(lowered, label)   # progress lines while XLA works
    cost_model(compiled, target)              # per-chip step time from XLA's cost model, and the MFU it implies

TPU devices come from `jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`: with `libtpu`
installed (`pip install -e ".[tpu]"`) the real TPU compiler runs on this CPU-only machine (JAX_PLATFORMS=cpu,
TPU_SKIP_MDS_QUERY=1, as MaxText's train_compile does), so memory figures are the TPU compiler's own, and a
step that does not fit fails at compile time ("HLO temporaries ... exceed available HBM"): `compile_lowered`
turns that into `DoesNotFit` with the bytes it needed.

Accelerator names count TensorCores for v4 / v5p (two per chip, one JAX device per chip: megacore) and chips
for v5e / v6e.  Per-chip HBM and bf16 peak are the published figures.

GPU devices come from `get_topology_desc(platform="cuda", target_config=<GpuTargetConfigProto text>,
topology="1x<nodes>x<GPUs per node>")`: with `jax[cuda12]` installed (`pip install -e ".[cuda]"`) XLA's GPU
compiler runs with no GPU (JAX_PLATFORMS=cpu keeps the CUDA plugin from looking for a driver).  The target configs
of `gpu:h100 | h200 | a100` ship in btx_jax/train/gpu_targets/ (XLA's own specs, see SOURCE.md there); any other
GPU is `gpu:<path to its .txtpb>` (XLA's xla/backends/gpu/target_config/specs/, or dumped on the machine).  The
GPU compiler never refuses a program larger than the device (and has no cost model on this compile-only path:
`cost_analysis()` is None), so `device_memory_size` of the target config is what a plan's peak is judged against.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from btx_jax.config import ConfigError

GiB = 2**30
# generation: (HBM bytes per chip, bf16 peak FLOP/s per chip, TensorCores counted per chip in "vN-<count>",
#              dimensions of its torus, libtpu device_kind)
CHIPS = {
    "v4": (32 * GiB, 275e12, 2, 3, "TPU v4"),
    "v5p": (95 * GiB, 459e12, 2, 3, "TPU v5"),
    "v5e": (16 * GiB, 197e12, 1, 2, "TPU v5 lite"),
    "v6e": (32 * GiB, 918e12, 1, 2, "TPU v6 lite"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
LIBTPU_HINT = ('the TPU compiler is not installed: pip install -e ".[tpu]" (libtpu==0.0.42.*, the version '
               'jax 0.10.2 pins)')
# name in "gpu:<name>-<count>": its target config in btx_jax/train/gpu_targets/
GPU_TARGETS_DIR = Path(__file__).parent / "gpu_targets"
GPUS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
CUDA_HINT = ('the GPU compiler is not installed: pip install -e ".[cuda]" (jax[cuda12]==0.10.2: the CUDA plugin, '
             'ptxas and libdevice; no GPU needed)')


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str                 # "cpu" | "tpu" | "gpu"
    devices: int                  # JAX devices (TPU: chips)
    topology: str = ""            # libtpu topology name, e.g. "v5p:2x2x1"; GPU: "1x<nodes>x<per node>"
    generation: str = ""          # a CHIPS key
    text: str = ""
    target_config: str = ""       # GPU: path of the GpuTargetConfigProto text file
    memory: int = 0               # GPU: its device_memory_size (bytes)

    @property
    def hbm_bytes(self) -> int | None:
        return CHIPS[self.generation][0] if self.generation else self.memory or None

    @property
    def peak_flops(self) -> float | None:
        return CHIPS[self.generation][1] if self.generation else None


def topology_dims(generation: str, chips: int) -> str:
    """'2x2x1' style torus of `chips` chips: 2-D (v5e, v6e) as square as possible, 3-D (v4, v5p) from 2x2x1
    by doubling z, y, x in turn (the shapes Cloud TPU slices come in)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a TPU slice of {chips} chips is not a power of two")
    if CHIPS[generation][3] == 2:
        a = 1
        while a * a * 4 <= chips:
            a *= 2
        return f"{a}x{chips // a}"
    dims = [1, 1, 1]
    for axis in [0, 1] + [2, 1, 0] * 8:
        if dims[0] * dims[1] * dims[2] >= chips:
            break
        dims[axis] *= 2
    return "x".join(map(str, dims))


def gpu_target(text: str, config: Path, nodes: int, per_node: int) -> Target:
    """The target of `nodes` x `per_node` GPUs described by the GpuTargetConfigProto text file `config`."""
    if nodes < 1 or per_node < 1:
        raise ConfigError(f"--target {text}: expected at least one node and one GPU per node")
    try:
        body = config.read_text()
    except OSError as e:
        raise ConfigError(f"--target {text}: cannot read GPU target config {config} ({e.strerror})") from None
    except UnicodeDecodeError:
        body = ""
    m = re.search(r"^\s*device_memory_size\s*:\s*(\d+)\s*$", body, re.M)
    if not m or not re.search(r"^\s*gpu_device_info\s*\{", body, re.M):
        raise ConfigError(f"--target {text}: {config} is not a GpuTargetConfigProto text proto (no "
                          "gpu_device_info { device_memory_size: ... }; see xla/backends/gpu/target_config/specs/)")
    return Target("gpu", nodes * per_node, f"1x{nodes}x{per_node}", text=text, target_config=str(config),
                  memory=int(m.group(1)))


def parse_gpu(text: str, rest: str) -> Target:
    """'<name>-<count>' | '<name>-<nodes>x<count>' (name: a GPUS key) | '<path>[@<count> | @<nodes>x<count>]'
    (a target config file; default 8 GPUs on one node)."""
    known = f"known: {', '.join(GPUS)}, or gpu:<path to a GpuTargetConfigProto .txtpb>[@<nodes>x<GPUs per node>]"
    m = re.fullmatch(r"([a-z][a-z0-9]*)-(?:(\d+)x)?(\d+)", rest)
    if m:
        if m.group(1) not in GPUS:
            raise ConfigError(f"--target {text}: unknown GPU {m.group(1)!r} ({known})")
        return gpu_target(text, GPU_TARGETS_DIR / GPUS[m.group(1)], int(m.group(2) or 1), int(m.group(3)))
    path, _, shape = rest.rpartition("@") if "@" in rest else (rest, "", "8")
    if path in GPUS:
        raise ConfigError(f"--target {text}: give the GPU count, e.g. gpu:{path}-8 (or nodes x GPUs: gpu:{path}-2x8)")
    if not Path(path).is_file():
        raise ConfigError(f"--target {text}: no GPU named {path!r} and no such target config file ({known})")
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    if not m:
        raise ConfigError(f"--target {text}: after '@' expected <GPUs> or <nodes>x<GPUs per node>, e.g. @8 or @2x8")
    return gpu_target(text, Path(path), int(m.group(1) or 1), int(m.group(2)))


def parse_target(text: str) -> Target:
    """'cpu:N' | 'tpu:<gen>-<count>' (v4-8, v5p-8, v5e-16, v6e-8, ...) | 'tpu:<libtpu topology>' (v5p:2x2x1) |
    'gpu:...' (parse_gpu)."""
    kind, _, rest = str(text).partition(":")
    if kind == "cpu" and rest.isdigit() and int(rest) > 0:
        return Target("cpu", int(rest), text=text)
    if kind == "gpu" and rest:
        return parse_gpu(text, rest)
    if kind == "tpu" and rest:
        m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", rest)
        if m:
            gen = ALIASES.get(m.group(1), m.group(1))
            if gen in CHIPS:
                cores = int(m.group(2))
                per_chip = CHIPS[gen][2]
                if cores % per_chip:
                    raise ConfigError(f"--target {text}: {gen} counts {per_chip} TensorCores per chip")
                chips = max(cores // per_chip, 1)
                return Target("tpu", chips, f"{gen}:{topology_dims(gen, chips)}", gen, text)
        m = re.fullmatch(r"(v\d+[a-z]*)[:=_]((\d+x)*\d+)", rest)
        if m:
            gen = ALIASES.get(m.group(1), m.group(1))
            chips = 1
            for d in m.group(2).split("x"):
                chips *= int(d)
            return Target("tpu", chips, rest, gen if gen in CHIPS else "", text)
    raise ConfigError(f"--target {text!r}: expected cpu:N, tpu:<v4|v5p|v5e|v6e>-<count> (e.g. tpu:v5p-8), a "
                      f"libtpu topology name (e.g. tpu:v5p:2x2x1) or gpu:<{'|'.join(GPUS)}>-<count> (e.g. gpu:h100-8)")


@contextlib.contextmanager
def process_settings(env: dict[str, str], platforms: str) -> Iterator[None]:
    """Within the block: the environment variables `env` set and JAX's `jax_platforms` = `platforms`; the
    previous values come back after it.  Entry points only (XLA reads its flags when a backend starts, so they
    act only if JAX has started none yet)."""
    import jax
    saved, saved_platforms = {k: os.environ.get(k) for k in env}, jax.config.jax_platforms
    os.environ.update(env)
    jax.config.update("jax_platforms", platforms)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        jax.config.update("jax_platforms", saved_platforms)


def compile_only(target: Target):
    """Context manager for an entry point: within it JAX compiles for `target` from this host (platform and
    flags; enter it before JAX starts its backends, before jax.devices()); a missing compiler is a ConfigError
    before anything is changed."""
    env = {}
    if target.platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target.devices}".strip()
    elif target.platform == "gpu":
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            raise ConfigError(f"--target {target.text}: {CUDA_HINT}")
    else:
        if importlib.util.find_spec("libtpu") is None:
            raise ConfigError(f"--target {target.text}: {LIBTPU_HINT}")
        env["TPU_SKIP_MDS_QUERY"] = os.environ.get("TPU_SKIP_MDS_QUERY", "1")          # no metadata server
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to lock
    return process_settings(env, "cpu")       # compile for TPU / GPU from this host; never open one


def target_devices(target: Target) -> list:
    import jax
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.devices:
            raise ConfigError(f"--target {target.text}: only {len(devices)} CPU devices (JAX started before "
                              "compile_only() set the device count)")
        return devices[:target.devices]
    from jax.experimental import topologies
    if target.platform == "gpu":
        return gpu_devices(target)
    kw = {"chip_config_name": "megacore"} if target.generation == "v4" else {}
    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kw).devices)
    except Exception as e:      # libtpu rejects the name (or cannot start): one line with its reason
        raise ConfigError(f"--target {target.text}: libtpu cannot describe topology {target.topology!r} "
                          f"({str(e).splitlines()[0][:200]})") from None
    return devices


def gpu_devices(target: Target) -> list:
    """The compile-only GPUs of `target`; ConfigError naming the file and XLA's parse error for a bad config."""
    from jax.experimental import topologies
    body = Path(target.target_config).read_text()
    with tempfile.TemporaryFile("w+") as log, _stderr_to(log):   # XLA logs the parse error (line:col) there
        try:
            return list(topologies.get_topology_desc(platform="cuda", target_config=body,
                                                     topology=target.topology).devices)
        except Exception as e:
            log.seek(0)
            said = [line.split("] ", 1)[-1] for line in log.read().splitlines() if "] " in line]
            reason = said[-1] if said else str(e).splitlines()[0]
    raise ConfigError(f"--target {target.text}: {target.target_config}: XLA cannot use this GPU target config "
                      f"({reason[:300]})")


class _stderr_to:
    """Send file descriptor 2 (where XLA's C++ logging writes) to `file` inside the block."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


class DoesNotFit(Exception):
    """The TPU compiler refused the program: it needs `needed` bytes per chip, `available` exist."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed, self.available = needed, available


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text)
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1)) if m else 0


# XLA:CPU's while-loop-invariant code motion hoists the per-layer casts of stacked weights (bf16 frozen weights,
# fp32 compute) out of the layer scan, so every device holds an fp32 copy of all its weight shards for the
# whole step; without the pass each layer's weights are cast when the layer runs.  271M-parameter expert step
# on 8 virtual devices: 238 -> 139 MiB of temporaries per device, step time no slower (interleaved runs).
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options(platform: str) -> dict | None:
    """Compiler options the train step is compiled with on `platform` (jax.jit(compiler_options=...))."""
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def compile_lowered(lowered, label: str = "step", log=print, every_s: float = 30.0):
    """(compiled, seconds) of `lowered.compile()`, logging a line every `every_s` seconds while it runs.
    Raises DoesNotFit when the compiler reports that the program exceeds the device's memory."""
    done = threading.Event()
    tic = time.perf_counter()

    def heartbeat():
        while not done.wait(every_s):
            log(f"  [compile] {label}: {time.perf_counter() - tic:.0f}s ...")

    log(f"  [compile] {label} ...")
    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        compiled = lowered.compile()
    except Exception as e:
        msg = str(e)
        m = re.search(r"(?:exceed|exceeds) available HBM|RESOURCE_EXHAUSTED|Ran out of memory", msg)
        if not m:
            raise
        sizes = re.findall(r"\(([\d.]+[KMGT]?i?B?)\)", msg)
        needed, available = (_size(sizes[0]), _size(sizes[1])) if len(sizes) >= 2 else (0, 0)
        first = next((line for line in msg.splitlines() if "HBM" in line or "memory" in line), msg.splitlines()[0])
        raise DoesNotFit(first.strip()[:300], needed, available) from None
    finally:
        done.set()
    return compiled, time.perf_counter() - tic


def counts_loop_trips(platform: str) -> bool:
    """Whether XLA's cost analysis on `platform` may multiply a while loop's body by its trip count (TPU did for
    a plain 10-step scan, but not for the train step's layer scan: a 2- and a 4-layer step count the same
    FLOPs; XLA:CPU never does)."""
    return platform == "tpu"


def cost_analysis(compiled) -> dict | None:
    """XLA's cost analysis of a compiled program (one dict), or None where the backend has none (GPU, compiled
    with no device)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def cost_model(compiled, target: Target) -> dict:
    """{"step_s": XLA's optimal seconds per step (TPU cost model), "flops": per-chip FLOPs it counted,
    "mfu": flops / (step_s * published bf16 peak)}; empty where the backend has no cost model, and
    {"unpriced_s": the value} where it returns no positive time.  (libtpu 0.0.42's v5e model prices some ops at
    exactly -1 s: a [N, 512 or 640] x [512 or 640, M] matmul, the LoRA B projection at r=640, found by bisection;
    768 or 1024 and every v5p shape are priced.  docs/performance.md section 5.)"""
    if target.platform != "tpu":
        return {}
    cost = cost_analysis(compiled) or {}
    seconds = float(cost.get("optimal_seconds", 0.0) or 0.0)
    if seconds <= 0:
        return {"unpriced_s": seconds}
    out = {"step_s": seconds, "flops": float(cost.get("flops", 0.0))}
    if target.peak_flops:
        out["mfu"] = out["flops"] / (seconds * target.peak_flops)
    return out
