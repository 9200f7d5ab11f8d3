"""Does the compiled train step fit the devices it will run on?  Checked before anything is written.

    t = schema.parse(cfg).train
    check_fits(compiled, t, devices)   # StepDoesNotFit (one line: the numbers and the knobs)
    fit_knobs(t)                       # those knobs, for a step the compiler itself refused (TPU)

The step's per-device peak is the compiler's own memory analysis: arguments + temporaries + the outputs that do
not alias a donated argument.  The memory it is held against: an accelerator's `memory_stats()["bytes_limit"]`
(what the allocator may use); on CPU the host's available memory (psutil; on Linux MemAvailable) shared by
the step's CPU devices in this process.  Where neither is known nothing is refused.
"""
from __future__ import annotations

import jax
import psutil

from btx_jax.disk import human
from btx_jax.errors import UserError
from btx_jax.schema import Train


class StepDoesNotFit(UserError, MemoryError):
    """The compiled step needs more memory per device than the device has; the message says what to lower."""


def step_peak_bytes(mem) -> int:
    """Live bytes per device while the step runs, from `compiled.memory_analysis()`: the state is donated, so
    outputs that alias arguments take no extra room."""
    return int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


def device_bytes(devices=None) -> tuple[int, str] | None:
    """(bytes one of `devices` (default: this process's) may use, where the number comes from), None if
    unknown."""
    devices = list(devices if devices is not None else jax.local_devices())
    if devices[0].platform == "cpu":
        avail = psutil.virtual_memory().available
        return avail // len(devices), f"host available memory {human(avail)} / {len(devices)} CPU devices"
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:      # noqa: BLE001 - a backend without memory stats: nothing to compare against
        stats = {}
    limit = stats.get("bytes_limit")
    return (int(limit), f"{devices[0].device_kind} bytes_limit") if limit else None


def check_fits(compiled, t: Train, devices=None) -> None:
    """StepDoesNotFit when the step's per-device peak exceeds the device memory (device_bytes)."""
    mem = compiled.memory_analysis()
    have = device_bytes(devices)
    if mem is None or have is None:
        return
    need = step_peak_bytes(mem)
    if need <= have[0]:
        return
    raise StepDoesNotFit(
        f"the train step needs {human(need)} per device ({human(mem.argument_size_in_bytes)} state+batch, "
        f"{human(mem.temp_size_in_bytes)} temporaries) but a device has {human(have[0])} ({have[1]}): "
        f"{fit_knobs(t)}")


def fit_knobs(t: Train) -> str:
    """What to change in train config `t` for a step that does not fit, with the values now set."""
    return (f"lower train.global_batch_size={t.global_batch_size} or train.seq_len={t.seq_len}, raise "
            f"train.microbatches={t.microbatches}, or set train.remat='full' (now {t.remat!r}); nothing was "
            "written (`btx plan` shows the memory of other settings without running them)")
