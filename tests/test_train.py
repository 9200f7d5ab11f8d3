"""Training engine: sharding over 8 virtual CPU devices, phase freezing, resume after SIGKILL, two-process
training, config validation.  (conftest.py sets XLA_FLAGS to 8 host devices.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from btx_jax import param_paths, schema
from btx_jax.model import abstract_params
from btx_jax.pretrained import load_pretrained
from btx_jax import mesh as mesh_lib
from btx_jax.train.model_init import initial_source
from btx_jax.train.trainer import train
from btx_jax.configs import expert
from conftest import build_hf_llama

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)


def tiny_config(**train):
    c = expert.get_config("synthetic")
    c.model.arch = ARCH
    c.train.update(dict(steps=6, global_batch_size=8, seq_len=32, log_every=1, ckpt_every=3, lr=1e-2,
                        warmup_steps=2), **train)
    return c


def losses(workdir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record wins for steps logged twice across a resume)."""
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_every_weight_matrix_sharded_over_fsdp_once():
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
    cfg = LlamaConfig(**{**ARCH, "adapter": AdapterSpec(experts=(ExpertSpec(8, 16),) * 3, router=True)})
    shapes = abstract_params(cfg)
    for path, leaf in param_paths.flatten(shapes).items():
        spec = mesh_lib.spec_for(param_paths.rule_for(path).axes, leaf.shape, mesh)
        used = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
        assert len(used) == len(set(used)), (path, spec)
        axes = param_paths.rule_for(path).axes
        matrix_dims = [d for a, d in zip(axes, leaf.shape) if a != "layers"]
        if len(matrix_dims) == 2 and any(d % 8 == 0 for d in matrix_dims):
            assert "fsdp" in used, (path, spec)      # every weight matrix: fsdp on one dimension


def test_sharded_run_matches_single_device_and_memory_splits(tmp_path):
    eight = train(tiny_config(), tmp_path / "eight")
    one_cfg = tiny_config()
    one_cfg.mesh.update(dict(fsdp=1, num_devices=1))
    one = train(one_cfg, tmp_path / "one")
    a, b = losses(tmp_path / "eight"), losses(tmp_path / "one")
    assert sorted(a) == list(range(1, 7))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
    info8 = json.loads((tmp_path / "eight" / "run_info.json").read_text())
    info1 = json.loads((tmp_path / "one" / "run_info.json").read_text())
    assert info8["state_bytes_per_device"] <= 1.05 * info1["state_bytes_per_device"] / 8 + 64 * 1024
    assert np.isfinite(eight["loss"]) and np.isfinite(one["loss"])
    # the final checkpoint, written sharded over 8 devices, loads in a process that has a single device
    ids = np.arange(1, 9)[None]
    here = load_pretrained(tmp_path / "eight" / "final").logits(ids)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = (f"import numpy as np, btx_jax; np.save({str(tmp_path / 'l.npy')!r}, "
            f"btx_jax.load_pretrained({str(tmp_path / 'eight' / 'final')!r}).logits(np.arange(1, 9)[None]))")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), here, atol=1e-5)


@pytest.mark.parametrize("phase,changed", [
    ("expert", r"layers/mlp/\w+/lora_[ab]"),
    ("full", r".*"),
])
def test_phase_freezes_exactly_the_frozen_set(tmp_path, phase, changed):
    import re
    c = tiny_config(steps=3)
    c.phase = phase
    train(c, tmp_path)
    before = param_paths.flatten(initial_source(c.model, seed=0).load().params)
    after = param_paths.flatten(load_pretrained(tmp_path / "final").params)
    assert before.keys() == after.keys()
    for path in before:
        same = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
        if re.fullmatch(changed, path):
            if not path.endswith("lora_b") or phase == "expert":
                assert not same, f"{path} should have trained"
        else:
            assert same, f"{path} should be frozen"
    info = json.loads((tmp_path / "run_info.json").read_text())
    trainable = sum(int(np.prod(v.shape)) for k, v in before.items() if re.fullmatch(changed, k))
    assert info["params_trainable"] == trainable


def test_optimizer_state_holds_trainable_leaves_only(tmp_path):
    c = tiny_config(steps=1)
    train(c, tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    # Adam's mu and nu for the 6 trainable leaves (3 projections x lora_a/lora_b, stacked over layers) and
    # two step counters (adam, schedule); nothing for the 106,816 frozen parameters.
    assert info["opt_state_leaves"] == 2 * 6 + 2


def _run(args, env_extra=None, check=True):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _run_killed_at(step: int, args):
    """scripts/train.py with `args`, killed with SIGKILL once step `step`'s metrics are logged (fault injected
    from outside the package: the metrics logger is wrapped in the child process)."""
    code = (f"import os, signal, sys, runpy\n"
            f"from btx_jax.train import metrics_log\n"
            f"real = metrics_log.MetricsLog.step\n"
            f"def step(self, s, *a, **k):\n"
            f"    real(self, s, *a, **k)\n"
            f"    if s == {step}: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"metrics_log.MetricsLog.step = step\n"
            f"sys.argv = {[str(REPO / 'scripts' / 'train.py'), *args]!r}\n"
            f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def _cli(workdir, *overrides):
    return ["--config=configs/expert.py:synthetic", f"--workdir={workdir}", "--config.train.steps=8",
            "--config.train.ckpt_every=3", "--config.train.log_every=1", "--config.train.seq_len=32",
            "--config.model.arch.num_layers=2", *overrides]


@pytest.mark.parametrize("init", ["random", "hf"])
def test_resume_after_sigkill_replays_the_same_losses(tmp_path, init):
    """Also from an HF base in bf16: the lean checkpoints hold no frozen weight, so the resume reads the base
    again from its safetensors and checks it against the digest saved with the step."""
    extra = []
    if init == "hf":
        import torch
        base = build_hf_llama(tmp_path / "base", torch_dtype=torch.bfloat16, num_hidden_layers=2)
        extra = [f"--config.model.init={base}", "--config.train.frozen_dtype=bfloat16"]
    _run(_cli(tmp_path / "straight", *extra))
    killed = _run_killed_at(5, _cli(tmp_path / "killed", *extra))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    _run(_cli(tmp_path / "killed", *extra))   # the same command resumes from step 3
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 9))
    assert [straight[s] for s in range(1, 9)] == [resumed[s] for s in range(1, 9)]   # bitwise on CPU


def test_two_processes_train_together_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = _cli(tmp_path / "multi", "--config.distributed.enabled=True",
                  f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", "--config.distributed.cpu_collectives=gloo")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *common,
                               f"--config.distributed.process_id={i}"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    env4 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    _run(_cli(tmp_path / "single"), env4)
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    np.testing.assert_allclose([multi[s] for s in range(1, 9)], [single[s] for s in range(1, 9)], rtol=2e-5)


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.fsdp=3", "mesh"),
    ("--config.train.global_batch_size=12", "divisible"),
    ("--config.phase=pretrain", "unknown phase"),
    ("--config.trainable=('nothing_matches',)", "match no parameter"),
    ("--config.model.lora.targets=('gate_proj','wo')", "'wo'"),
    ("--config.model.lora.rank=0", "model.lora.rank=0: must be an integer >= 1"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, override, message):
    proc = _run(_cli(tmp_path, override), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    import signal
    import time
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = _cli(tmp_path, "--config.train.steps=2000", "--config.train.ckpt_every=1000")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: checkpoint saved at step" in out
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 3 <= saved[-1] < 2000


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """The weights turn NaN before step 3 (injected from outside the package: the compiled step is wrapped in
    the child process), so its loss is non-finite whatever the learning rate: training stops at step 3 with one
    line naming it, checkpoints 1 and 2 stay, and no final is written; checkpoint 2 is good: resuming from it
    without the fault finishes the run."""
    args = _cli(tmp_path, "--config.train.ckpt_every=1", "--config.train.steps=5")
    code = ("import runpy, sys\n"
            "import jax, jax.numpy as jnp\n"
            "from btx_jax.train import trainer\n"
            "real = trainer.compile_step\n"
            "def compile_step(*a, **k):\n"
            "    step, calls = real(*a, **k), [0]\n"
            "    def poisoned(state, batch):\n"
            "        calls[0] += 1\n"
            "        if calls[0] == 3:\n"
            "            state = {**state, 'trainable': jax.tree_util.tree_map(lambda x: x * jnp.nan, state['trainable'])}\n"
            "        return step(state, batch)\n"
            "    poisoned.memory_analysis = step.memory_analysis      # for the trainer's memory preflight\n"
            "    return poisoned\n"
            "trainer.compile_step = compile_step\n"
            f"sys.argv = {[str(REPO / 'scripts' / 'train.py'), *args]!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "non-finite loss at step 3" in lines[0] and "checkpoint (step 2) is kept" in lines[0]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2]
    assert not (tmp_path / "final").exists()
    resumed = _run(args)
    assert "resumed" in resumed.stdout and "at step 2" in resumed.stdout and (tmp_path / "final").is_dir()


def test_step_one_trains_and_old_runs_keep_their_schedule(tmp_path):
    """Warmup evaluated at the optimizer count + 1: step 1 trains at lr / warmup_steps (it used to be 0, so the
    first step moved nothing); a checkpoint written before `train.warmup_offset` existed is refused on resume
    with the key named (restoring 0 resumes it on its old schedule), never shifted silently."""
    from btx_jax.config import ConfigError
    from btx_jax.train import checkpoints, trainer
    from btx_jax.train.optim import schedule

    train(tiny_config(steps=2, warmup_steps=4), tmp_path / "w")
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "w" / "metrics.jsonl").read_text().splitlines())}
    assert rows[1]["lr"] == pytest.approx(1e-2 / 4) and rows[1]["update_norm"] > 0
    assert rows[2]["lr"] == pytest.approx(2e-2 / 4)
    cfg = trainer.resolved(tiny_config(warmup_steps=4))
    assert schedule(schema.parse({**cfg, "train": {**cfg["train"], "warmup_offset": 0}}).train)(0) == 0.0
    saved = json.loads(json.dumps(cfg))
    del saved["train"]["warmup_offset"]
    with pytest.raises(ConfigError, match="train.warmup_offset"):
        checkpoints.check_compatible(saved, cfg, tmp_path)


def test_cpu_step_casts_frozen_weights_per_layer():
    """fp32 compute over bf16 frozen weights on XLA:CPU: the step is compiled without while-loop-invariant code
    motion (btx_jax/train/aot.py), so no fp32 copy of the stacked weight shards lives for the whole step; with
    the pass back on, the temporaries grow by about that copy."""
    import math

    from btx_jax.train import trainer

    c = expert.get_config("synthetic")
    c.train.frozen_dtype = "bfloat16"
    c.model.arch.update(num_layers=4, hidden_size=256, intermediate_size=512)
    cfg = trainer.resolved(c)
    phase = trainer.wire(cfg)
    batch = trainer.abstract_batch(phase.built, schema.parse(cfg).train)
    lowered = phase.built.step_fn.lower(phase.built.abstract_state, batch)
    ours = lowered.compile().memory_analysis().temp_size_in_bytes
    hoisted = lowered.compile(compiler_options={"xla_disable_hlo_passes": ""}).memory_analysis().temp_size_in_bytes
    fp32_copy = sum(math.prod(s.sharding.shard_shape(s.shape)) * 4 for p, s in phase.frozen.items()
                    if p.startswith("layers/") and s.ndim == 3)
    assert hoisted - ours >= 0.75 * fp32_copy, (ours, hoisted, fp32_copy)


def test_streaming_source_resumes_in_the_trainer(tmp_path):
    """A run over a streaming source mixed with a stored one, stopped after 3 steps and resumed to 6 (its data
    state in the orbax checkpoint), gives the losses of a straight 6-step run."""
    from btx_jax.data import bundled_source
    from btx_jax.configs import pretrain

    def config(steps):
        c = pretrain.get_config("tiny")
        wiki = bundled_source("wiki")
        c.data.sources = [dict(name="wiki", path=wiki["path"], text_field="text", streaming=True, ratio=0.5),
                          dict(bundled="math", ratio=0.5)]
        c.data.cache_dir = str(tmp_path / "cache")
        c.train.update(steps=steps, ckpt_every=3, log_every=1, seq_len=64, global_batch_size=8)
        c.model.arch.num_layers = 2
        return c

    train(config(6), tmp_path / "straight")
    train(config(3), tmp_path / "resumed")
    train(config(6), tmp_path / "resumed")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [straight[s] for s in range(1, 7)] == [resumed[s] for s in range(1, 7)]
