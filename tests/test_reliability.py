"""Fault injection: bad config values, damaged checkpoints, full / read-only disks, interrupted runs, dead or
non-finite training, non-finite weights, out-of-range model inputs and CLI arguments.

Every case asserts how it ends (exception type / exit code, one line naming the key or path, no traceback),
that nothing half-written is left and that earlier checkpoints and outputs are byte-identical afterwards.
Training runs in-process on one tiny model (one shared trained work directory, copied per case); a full disk
is injected with OSError(ENOSPC) and, where the tests run as root, also made real with a small tmpfs.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import btx_jax
from btx_jax import disk, param_paths
from btx_jax.cli import evaluate as evaluate_cli
from btx_jax.command_line import stopping_cleanly
from btx_jax.config import ConfigError
from btx_jax.model.generate import InputError
from btx_jax.train import trainer
from btx_jax.train.health import TrainingHealth
from conftest import REPO_ROOT, needs_mount, random_ids, small_tmpfs
from btx_jax.configs import expert

ARCH = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64)


def config(**train):
    c = expert.get_config("synthetic")
    c.model.arch = ARCH
    c.mesh.update(dict(fsdp=1, num_devices=1))
    c.train.update(dict(steps=4, global_batch_size=2, seq_len=16, log_every=1, ckpt_every=2, keep_checkpoints=3,
                        lr=1e-2, warmup_steps=1), **train)
    return c


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each train() call builds a new jitted step; a persistent cache makes the repeats cheap."""
    import jax
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                 "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing anything)."""
    workdir = tmp_path_factory.mktemp("rel") / "run"
    trainer.train(config(), workdir)
    return workdir


def copy_of(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ---- config values: one line naming the key, nothing created -------------------------------------------------

@pytest.mark.parametrize("section,key,value,words", [
    ("train", "dtype", "float17", "train.dtype='float17': must be one of float32"),
    ("train", "ckpt_every", 0, "train.ckpt_every=0: must be an integer >= 1"),
    ("train", "keep_checkpoints", 0, "train.keep_checkpoints=0"),
    ("train", "global_batch_size", 0, "train.global_batch_size=0"),
    ("train", "seq_len", 0, "train.seq_len=0"),
    ("train", "seq_len", 128, "max_position_embeddings"),
    ("train", "lr", -1.0, "train.lr=-1.0: must be a number > 0"),
    ("train", "steps", 0, "train.steps=0"),
    ("train", "b2", 1.5, "train.b2=1.5"),
    ("train", "remat", "sometimes", "train.remat='sometimes'"),
    ("train", "stepz", 5, "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (None, "phaze", "expert", "unknown config key 'phaze' (did you mean 'phase'?)"),
    (None, "phase", "router", "phase='router': pattern 'layers/\\w+/\\w+/router|layers/moe/router/kernel' would match no parameter"),
])
def test_bad_config_value_is_refused_before_anything_is_written(tmp_path, section, key, value, words):
    c = config().to_dict()
    (c[section] if section else c)[key] = value
    with pytest.raises(ConfigError) as e:
        trainer.train(c, tmp_path / "w")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def _script(name: str, *args, timeout=240):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout)


@pytest.mark.parametrize("args,words", [
    (["--config=configs/expert.py:synthetic", "--config.train.stepz=5"],
     "--config.train.stepz: unknown config key 'train.stepz' (did you mean train.steps?)"),
    (["--config=configs/expert.py:wikki"], "preset 'wikki'"),
])
def test_train_cli_flag_errors_are_one_line(tmp_path, args, words):
    proc = _script("train.py", *args, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


# ---- checkpoint integrity ----------------------------------------------------------------------------------------

def _truncate_the_array_files(step_dir: Path) -> None:
    for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])


@pytest.mark.parametrize("damage", [
    _truncate_the_array_files,
    lambda d: (d / "state" / "_METADATA").unlink(),
    lambda d: shutil.rmtree(d / "data"),
], ids=["truncated-array-file", "missing-metadata", "missing-data-item"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_older_one_used(trained, tmp_path, capsys, damage):
    w = copy_of(trained, tmp_path)
    damage(w / "checkpoints" / "4")
    damaged, older = digest(w / "checkpoints" / "4"), digest(w / "checkpoints" / "2")
    capsys.readouterr()
    trainer.train(config(steps=6), w)
    out = capsys.readouterr().out
    assert "checkpoint step 4 cannot be restored" in out and "set aside as 4.damaged" in out
    assert "resumed" in out and "at step 2" in out
    assert digest(w / "checkpoints" / "4.damaged") == damaged          # kept, byte for byte
    assert digest(w / "checkpoints" / "2") == older
    assert steps(w) == ["2", "4", "4.damaged", "6"]


def test_no_restorable_checkpoint_stops_and_renames_nothing(trained, tmp_path):
    w = copy_of(trained, tmp_path)
    for s in ("2", "4"):
        (w / "checkpoints" / s / "state" / "_METADATA").unlink()
    before = digest(w)
    with pytest.raises(btx_jax.CheckpointError, match="no checkpoint restores \\(steps 4, 2"):
        trainer.train(config(steps=6), w)
    assert digest(w / "checkpoints") == {k[len("checkpoints/"):]: v for k, v in before.items()
                                         if k.startswith("checkpoints/")}


def test_rerunning_a_finished_run_changes_nothing(trained, tmp_path, capsys):
    w = copy_of(trained, tmp_path)
    before = digest(w / "final"), digest(w / "checkpoints")
    capsys.readouterr()
    trainer.train(config(), w)
    out = capsys.readouterr().out
    assert "already finished (step 4" in out and "None" not in out and "nan" not in out
    assert (digest(w / "final"), digest(w / "checkpoints")) == before


def test_sigint_saves_then_exits_130(tmp_path, monkeypatch, capsys, python_sigint):
    real = trainer.make_data

    def interrupting(t, d, vocab):         # Ctrl-C arrives while the third batch is being read
        data = real(t, d, vocab)
        nxt = type(data).__next__

        class Interrupting(type(data)):
            def __next__(self):
                if self.index == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return nxt(self)
        data.__class__ = Interrupting
        return data
    monkeypatch.setattr(trainer, "make_data", interrupting)
    with pytest.raises(SystemExit) as e, stopping_cleanly(tmp_path / "w"):     # what scripts/train.py opts in to
        trainer.train(config(steps=50, ckpt_every=100), tmp_path / "w")
    assert e.value.code == 130
    assert "SIGINT: checkpoint saved at step 3, exiting" in capsys.readouterr().out
    assert steps(tmp_path / "w") == ["3"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # handler restored


def test_nonfinite_stop_says_no_checkpoint_when_there_is_none(tmp_path):
    with pytest.raises(trainer.TrainingError, match="no checkpoint was saved"):
        trainer.train(config(steps=6, ckpt_every=100, lr=1e30, grad_clip=0.0, warmup_steps=0), tmp_path / "w")
    assert not (tmp_path / "w" / "final").exists()


# ---- disk faults -------------------------------------------------------------------------------------------------

def test_checkpoint_save_out_of_space_is_one_line_and_keeps_earlier_steps(trained, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    w = copy_of(trained, tmp_path)
    before = digest(w / "checkpoints"), digest(w / "final")
    real_save = ocp.CheckpointManager.save

    def full(self, step, *a, **kw):
        if step == 6:
            (Path(self.directory) / "6.orbax-checkpoint-tmp").mkdir()     # what an interrupted save leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *a, **kw)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(disk.DiskError) as e:
        trainer.train(config(steps=6), w)
    msg = str(e.value)
    assert msg.startswith(f"{w / 'checkpoints'}: no space left on device (writing needs about ") and "\n" not in msg
    assert (digest(w / "checkpoints"), digest(w / "final")) == before     # no tmp dir, nothing changed
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    trainer.train(config(steps=6), w)                                       # space freed: the rerun resumes
    assert steps(w) == ["2", "4", "6"]


def test_preflight_refuses_a_checkpoint_that_cannot_fit(tmp_path, monkeypatch):
    from btx_jax.train.checkpoints import Checkpointer
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    ckpt = Checkpointer(tmp_path / "c", every=1, keep=1)
    state = {"w": np.zeros((64, 64), np.float32)}
    with pytest.raises(disk.DiskError, match=r"no space left on device \(writing needs about 16.0 KiB, 1000 B free\)"):
        ckpt.save(1, state, {}, {}, "digest", force=True)
    ckpt.close()
    assert list((tmp_path / "c").iterdir()) == []


def _tiny_model(seed=0, **arch):
    import jax

    from btx_jax.config import LlamaConfig
    from btx_jax.model import init_params
    cfg = LlamaConfig(**{**ARCH, **arch})
    return btx_jax.Pretrained(cfg, init_params(cfg, jax.random.PRNGKey(seed)))


@pytest.mark.parametrize("fmt", ["btx", "hf"])
def test_export_out_of_space_leaves_no_temp_dir_and_the_old_output(tmp_path, monkeypatch, fmt):
    from btx_jax.checkpoint import tensor_files
    pre = _tiny_model()
    out = pre.save_pretrained(tmp_path / "out", format=fmt)
    before = digest(out)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(tensor_files._ShardWriter, "close", full)      # where a safetensors file is written
    from btx_jax.checkpoint import btx
    monkeypatch.setattr(btx, "save", full)
    with pytest.raises(disk.DiskError, match="no space left on device"):
        pre.save_pretrained(out, format=fmt, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and digest(out) == before


def test_cli_reports_an_unwrapped_disk_fault_in_one_line(capsys):
    from btx_jax.command_line import run_cli

    def write():
        raise PermissionError(errno.EACCES, "Permission denied", "/ro/metrics.jsonl")
    with pytest.raises(SystemExit) as e:
        run_cli(write)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: /ro/metrics.jsonl: permission denied; earlier results are untouched: fix the "
                   "permissions and rerun\n")


@needs_mount
def test_real_full_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "64k") as mnt:
        with pytest.raises(disk.DiskError, match=f"{mnt / 'out'}: no space left on device"):
            _tiny_model().save_pretrained(mnt / "out", format="hf")
        assert list(mnt.iterdir()) == []
        with pytest.raises(disk.DiskError, match="no space left on device \\(writing needs about"):
            _tiny_model().save_pretrained(mnt / "out", format="btx")
        assert list(mnt.iterdir()) == []


# ---- model sanity -----------------------------------------------------------------------------------------------

def test_nonfinite_weights_are_refused_at_load_with_the_tensor_named(tmp_path):
    from safetensors.numpy import load_file, save_file
    bad = _tiny_model(num_layers=2).save_pretrained(tmp_path / "bad", format="hf")
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 3] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(btx_jax.CheckpointError, match=f"tensor '{name}' holds 1 non-finite values"):
        btx_jax.load_pretrained(bad)
    pre = _tiny_model()
    flat = param_paths.flatten(pre.params)
    flat["layers/mlp/up_proj/kernel"] = flat["layers/mlp/up_proj/kernel"].at[0, 0, 0].set(np.inf)
    pre.params = param_paths.unflatten(flat)
    pre.save_pretrained(tmp_path / "btx", format="btx")
    with pytest.raises(btx_jax.CheckpointError, match="tensor 'layers/mlp/up_proj/kernel' holds non-finite"):
        btx_jax.load_pretrained(tmp_path / "btx")


def test_dead_training_warns_once():
    h = TrainingHealth(vocab_size=256)
    assert h.observe(1, {"loss": 3.0, "grad_norm": 0.0}) is None
    assert h.observe(2, {"loss": 3.0, "grad_norm": 0.0}) is None
    assert "gradient norm has been exactly 0" in h.observe(3, {"loss": 3.0, "grad_norm": 0.0})
    assert h.observe(4, {"loss": 3.0, "grad_norm": 0.0}) is None                      # once
    h = TrainingHealth(vocab_size=256)
    for s in range(1, 3):
        assert h.observe(s, {"loss": np.log(256) + 1e-4, "grad_norm": 1.0}) is None
    assert "= ln(vocab)" in h.observe(3, {"loss": np.log(256), "grad_norm": 1.0})
    h = TrainingHealth(vocab_size=256, check_loss=False)                                # synthetic data
    assert all(h.observe(s, {"loss": np.log(256), "grad_norm": 1.0}) is None for s in range(1, 6))
    h = TrainingHealth(vocab_size=256)                                                  # a healthy run
    assert all(h.observe(s, {"loss": 5.0 - 0.1 * s, "grad_norm": 0.5}) is None for s in range(1, 9))


# ---- model inputs and generation arguments -----------------------------------------------------------------------

def test_api_refuses_out_of_range_inputs():
    pre = _tiny_model()
    ok = random_ids(1, 4, vocab=256)
    for ids, words in ((np.array([[1, 256]]), "token id 256, outside the vocabulary [0, 256)"),
                       (np.array([[-1, 2]]), "token id -1"),
                       (np.ones((1, 65), np.int32), "65 tokens exceed the model's max_position_embeddings (64)")):
        with pytest.raises(InputError, match=words.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
            pre.logits(ids)
    for kw, words in ((dict(max_new_tokens=-5), "max_new_tokens=-5"), (dict(temperature=-1.0), "temperature"),
                      (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
                      (dict(max_new_tokens=61), "4 tokens \\+ 61 new tokens exceed")):
        args = {"max_new_tokens": 2, **kw}
        with pytest.raises(InputError, match=words):
            pre.generate(ok, args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize("argv,words", [
    (["--seq-len", "0"], "argument --seq-len: 0 must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--domains", "wikii"], "unknown bundled domain 'wikii'"),
    (["--seq-len", "512"], "seq_len=512 exceeds model 'm''s max_position_embeddings (256"),
])
def test_evaluate_cli_arguments(tmp_path, capsys, monkeypatch, argv, words):
    model = _tiny_model(vocab_size=4096, max_position_embeddings=256).save_pretrained(tmp_path / "m", format="hf")
    monkeypatch.setattr(sys, "argv", ["btx evaluate", "--model", f"m={model}",
                                      "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
