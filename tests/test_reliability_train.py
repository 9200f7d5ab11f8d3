"""Fault injection for a training run's surroundings: two runs on one work directory, a step too big for the
machine, a full disk when the final version is written (issue 24, items 3, 7, 10).

Each case asserts how it ends (exit code 2 and one stderr line, or the exception), that nothing half-written
is left and that what was there before is byte-identical.  The multi-process start-up cases are in
tests/test_distributed.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btx_jax import disk
from btx_jax.train import trainer
from btx_jax.train.device_memory import StepDoesNotFit
from conftest import REPO_ROOT, needs_mount, small_tmpfs
from test_reliability import compilation_cache, config, digest, steps  # noqa: F401 - the module's cache fixture

TRAIN = [sys.executable, str(REPO_ROOT / "scripts" / "train.py")]


def _args(workdir: Path, *overrides: str) -> list[str]:
    return ["--config=configs/expert.py:synthetic", f"--workdir={workdir}", "--config.train.seq_len=16",
            "--config.train.global_batch_size=2", "--config.model.arch.num_layers=1", "--config.mesh.num_devices=1",
            "--config.train.log_every=1", *overrides]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("train:")]


# ---- one run per work directory ---------------------------------------------------------------------------------

def test_second_run_on_a_workdir_is_refused_and_the_first_is_unaffected(tmp_path):
    """Run A is frozen (SIGSTOP) while it holds the lock; run B on the same directory must stop with one line
    naming A's PID and host before it compiles and write nothing; A then finishes every step once."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(TRAIN + _args(workdir, "--config.train.steps=6", "--config.train.ckpt_every=3"),
                             cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = workdir / ".lock"
    deadline = time.monotonic() + 180
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None:
        assert time.monotonic() < deadline, "run A never took the lock"
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, first.communicate()[1][-2000:]
        before = digest(workdir)
        second = subprocess.run(TRAIN + _args(workdir, "--config.train.steps=6"), cwd=REPO_ROOT, env=_env(),
                                capture_output=True, text=True, timeout=180)
        assert digest(workdir) == before                      # B wrote nothing, not even the lock file
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=180)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = _lines(second.stderr)
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {workdir}: another training is running in this directory (PID {first.pid} "
                               f"on host {socket.gethostname()})"), lines[0]
    assert "step compiled" not in second.stdout               # refused before compiling
    assert first.returncode == 0, err[-2000:]
    logged = [line for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and not lock.exists()             # every step once; the lock is released
    assert (workdir / "final").is_dir() and sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").write_text("PID 4194305 on host deadhost\n")      # left by a run killed with SIGKILL elsewhere
    trainer.train(config(), workdir)
    out = capsys.readouterr().err
    assert (f"[btx] warning: taking over the lock {workdir / '.lock'} left by PID 4194305 on host deadhost, which "
            "is no longer running") in out
    assert steps(workdir) == ["2", "4"] and not (workdir / ".lock").exists()


def test_workdir_that_is_a_file_is_refused_before_any_work(tmp_path):
    from btx_jax.lock import LockError
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(LockError, match=f"^{path}: not a directory \\(a file is in the way\\); choose another path$"):
        trainer.train(config(), path)
    assert path.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


# ---- memory preflight -------------------------------------------------------------------------------------------

def test_step_bigger_than_the_machine_is_refused_before_the_workdir_exists(tmp_path):
    """seq_len 2^20 on a one-layer model: the compiled step needs about 9.5 TiB of temporaries per device."""
    workdir = tmp_path / "run"
    proc = subprocess.run(TRAIN + ["--config=configs/expert.py:synthetic", f"--workdir={workdir}",
                                   "--config.train.seq_len=1048576", "--config.train.global_batch_size=1",
                                   "--config.model.arch.max_position_embeddings=1048576",
                                   "--config.model.arch.num_layers=1", "--config.mesh.num_devices=1"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: the train step needs 9.5 TiB per device (")
    assert "but a device has" in lines[0] and "(host available memory " in lines[0]
    for knob in ("train.global_batch_size=1", "train.seq_len=1048576", "train.microbatches=1",
                 "train.remat='full' (now 'none')"):
        assert knob in lines[0]
    assert not workdir.exists()


def test_step_the_compiler_refuses_is_one_line_with_the_knobs(tmp_path, monkeypatch):
    """The TPU compiler refuses an oversized program itself (RESOURCE_EXHAUSTED at compile time, message as
    libtpu words it; injected here, there is no TPU): the same one line and knobs, no workdir."""
    import jax

    def refuse(self, *a, **kw):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                                         "memory space hbm. Used 889.14T of 95.74G hbm. Exceeded hbm capacity by "
                                         "889.04T.")
    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    with pytest.raises(StepDoesNotFit) as e:
        trainer.train(config(), tmp_path / "run")
    assert str(e.value).startswith("the compiler refused the train step (RESOURCE_EXHAUSTED: XLA:TPU compile "
                                   "permanent error. Ran out of memory in memory space hbm.")
    assert "lower train.global_batch_size=2 or train.seq_len=16" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ---- full disk: the final version ------------------------------------------------------------------------------

def test_final_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    """Checkpoints fit, the final version does not: one DiskError naming finals/, nothing of it on disk, the
    checkpoints kept; once there is space the rerun writes the final version."""
    workdir = tmp_path / "run"
    real_free = disk.free_bytes
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000 if "finals" in str(path) else real_free(path))
    with pytest.raises(disk.DiskError) as e:
        trainer.train(config(), workdir)
    assert str(e.value).startswith(f"{workdir.absolute() / 'finals'}: no space left on device (writing needs about ")
    assert not (workdir / "finals").exists() and not (workdir / "final").exists()
    before = digest(workdir / "checkpoints")
    assert steps(workdir) == ["2", "4"] and not (workdir / ".lock").exists()
    monkeypatch.setattr(disk, "free_bytes", real_free)
    trainer.train(config(), workdir)
    assert (workdir / "final").is_dir() and digest(workdir / "checkpoints") == before


# scripts/train.py with disk.require made a no-op: the disk fills while orbax's threads write (as when another
# writer takes the space after the preflight).
LATE_CALLBACKS = """
import asyncio, sys
from btx_jax import disk
disk.quiet_background_faults()
loop = asyncio.new_event_loop(); loop.close()

class Write:                                  # a write whose completion arrives after its loop closed
    def __del__(self):
        loop.call_soon_threadsafe(print)
Write()                                       # -> sys.unraisablehook (PyErr_WriteUnraisable)
try:
    loop.call_soon_threadsafe(print)
except RuntimeError as e:                     # -> sys.excepthook (PyErr_Print on a TensorStore thread)
    sys.excepthook(type(e), e, e.__traceback__)
try:
    raise RuntimeError("Event loop is closed")
except RuntimeError as e:                     # not asyncio's closed-loop check: still printed
    sys.excepthook(type(e), e, e.__traceback__)
"""


def test_late_write_callbacks_into_a_closed_loop_are_kept_off_stderr_and_nothing_else():
    """orbax closes its event loop when one write of a save fails; the other writes' completions raise
    'Event loop is closed' in asyncio's check on TensorStore's threads, printed through either hook, in either
    order relative to the logged fault.  Both are dropped; a RuntimeError raised elsewhere is not."""
    proc = subprocess.run([sys.executable, "-c", LATE_CALLBACKS], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Traceback") == 1 and proc.stderr.count("Event loop is closed") == 1, proc.stderr
    raised = next(i for i, line in enumerate(LATE_CALLBACKS.splitlines(), 1) if "raise RuntimeError" in line)
    assert f'File "<string>", line {raised}' in proc.stderr and "base_events.py" not in proc.stderr, proc.stderr


UNCHECKED = ("import runpy, sys\nfrom btx_jax import disk\ndisk.require = lambda path, nbytes: None\n"
             "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


@needs_mount
def test_disk_filling_up_under_orbax_threads_is_one_line(tmp_path):
    """A 3 MB tmpfs holds the LoRA checkpoints but not the 5.5 MiB final version, and the preflight is
    bypassed: orbax's writer threads meet the full disk; stderr holds one line and no traceback."""
    with small_tmpfs(tmp_path / "tmpfs", "3m") as mnt:
        workdir = mnt / "run"
        args = _args(workdir, "--config.train.steps=4", "--config.train.ckpt_every=2",
                     "--config.model.arch.num_layers=2", "--config.train.seq_len=32")
        proc = subprocess.run([sys.executable, "-c", UNCHECKED] + TRAIN[1:] + args, cwd=REPO_ROOT,
                              env={**_env(), "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = _lines(proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert lines[0].startswith(f"error: {workdir / 'finals' / '4-'}") and "no space left on device" in lines[0]
        assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"] and not (workdir / "final").exists()
        # at most the hidden temp directory of the version (orbax's threads may still write into it after the
        # cleanup); the next save_final of that version removes it first
        assert all(p.name.startswith(".4-") and p.name.endswith(".tmp") for p in (workdir / "finals").iterdir())
