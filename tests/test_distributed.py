"""Multi-process start-up (btx_jax/train/trainer.py maybe_initialize_distributed), on localhost with gloo CPU
collectives: JAX's SLURM auto-detection from a faked `srun` environment, and an unreachable coordinator
stopping with one line within distributed.initialization_timeout instead of JAX's abort."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from conftest import REPO_ROOT

# One process of a run: initialise from the config's distributed section, then all-gather the process ids
# (a real collective through the coordinator) and print what this process sees.
PROCESS = """
import sys
import numpy as np
import jax
from jax.experimental import multihost_utils
from btx_jax.train.trainer import maybe_initialize_distributed
from btx_jax.configs import expert
distributed = expert.get_config("synthetic").distributed   # the shipped defaults: nothing set but these
distributed.update(enabled=True, cpu_collectives="gloo", initialization_timeout=60)
maybe_initialize_distributed({"distributed": distributed.to_dict()})
ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
print("seen", jax.process_index(), jax.process_count(), sorted(ids.tolist()), flush=True)
"""
SLURM_FIRST_PORT = 65535 - 2**12 + 1          # jax's SlurmCluster: port = SLURM_JOB_ID % 4096 + this


def _free_slurm_port() -> int:
    for port in range(SLURM_FIRST_PORT + 1000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the SLURM range")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    env.update(PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               **extra)
    return env


def test_slurm_environment_is_detected_by_two_processes():
    """What `srun --ntasks=2` sets (the variables jax's SlurmCluster reads); the coordinator port comes from the
    job id by JAX's rule, not from any btx setting."""
    port = _free_slurm_port()
    job = 4096 * 7 + port - SLURM_FIRST_PORT
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1"))
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    seen = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("seen"))
    assert seen == ["seen 0 2 [0, 1]", "seen 1 2 [0, 1]"]


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tic = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config=configs/expert.py:synthetic",
                           f"--workdir={tmp_path / 'run'}", "--config.distributed.enabled=True",
                           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                           "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
                           "--config.distributed.initialization_timeout=3"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - tic
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: distributed initialization timed out after "
                               "distributed.initialization_timeout=3s: process 1 of 2")
    assert f"coordinator at 127.0.0.1:{port}" in lines[0]
    assert elapsed < 40                 # JAX alone: silence until its 300 s deadline, then SIGABRT
    assert not (tmp_path / "run").exists()


def test_bad_distributed_value_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config=configs/expert.py:synthetic",
                           f"--workdir={tmp_path / 'run'}", "--config.distributed.enabled=True",
                           "--config.distributed.coordinator_address=localhost",
                           "--config.distributed.initialization_timeout=3"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == "error: distributed.coordinator_address='localhost': must be host:port, or '' to detect it " \
                       "(SLURM, TPU pods, JAX_COORDINATOR_ADDRESS)"
    assert not (tmp_path / "run").exists()
