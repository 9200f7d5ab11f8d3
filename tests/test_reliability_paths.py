"""Faults of issue 24 items 2, 8 and 9: destinations that would destroy their source or cannot be written,
interrupted writes, and files that point elsewhere.  Each case asserts the exit code, one line and no traceback,
that nothing was half-written and that what existed before is byte-identical."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from btx_jax import compose_cli, convert
from conftest import REPO_ROOT


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (symlinks not followed), plus the directories."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def models(hf_llama, tmp_path):
    """tmp/models/llama (an HF Llama) beside tmp/models/other; returns tmp/models."""
    root = tmp_path / "models"
    shutil.copytree(hf_llama(), root / "llama")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("keep me")
    return root


def test_overwrite_onto_the_directory_holding_the_source_is_refused(models, capsys):
    before = digest(models)
    assert convert.main(["hf-to-btx", str(models / "llama"), str(models), "--overwrite"]) == 2
    one_line_error(capsys, "contains the source", str(models / "llama"))
    assert digest(models) == before


@pytest.mark.parametrize("dst", ["llama", "llama/inner"])
def test_overwrite_onto_the_source_or_inside_it_is_refused(models, capsys, dst):
    before = digest(models)
    assert convert.main(["hf-to-btx", str(models / "llama"), str(models / dst), "--overwrite"]) == 2
    one_line_error(capsys, "the source")
    assert digest(models) == before


def test_a_symlink_to_the_source_is_refused(models, capsys):
    (models / "link").symlink_to(models / "llama")
    before = digest(models)
    assert convert.main(["hf-to-btx", str(models / "llama"), str(models / "link"), "--overwrite"]) == 2
    one_line_error(capsys, "is a symlink")
    assert digest(models) == before and (models / "link").is_symlink()


@pytest.mark.parametrize("dst", ["other/notes.txt", "other/notes.txt/out"])
def test_a_file_or_a_path_below_a_file_is_refused_before_any_work(models, capsys, monkeypatch, dst):
    monkeypatch.setattr(convert, "open_model", lambda *a, **k: pytest.fail("read the source before the check"))
    before = digest(models)
    assert convert.main(["hf-to-btx", str(models / "llama"), str(models / dst), "--overwrite"]) == 2
    one_line_error(capsys, str(models / dst), "file")
    assert digest(models) == before


def test_compose_out_onto_an_expert_is_refused(hf_llama, tmp_path, capsys):
    base = hf_llama()
    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "adapter_config.json").write_text("{}")
    before = digest(tmp_path)
    assert compose_cli.main([str(base), str(expert), "--out", str(tmp_path), "--overwrite"]) == 2
    one_line_error(capsys, "contains the source", str(expert))
    assert digest(tmp_path) == before


def _script(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def test_train_workdir_and_evaluate_out_that_are_files_are_refused(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("keep me")
    train = _script("train.py", "--config=configs/pretrain.py:tiny", f"--workdir={file}")
    evaluate = _script("evaluate.py", "--model", f"m={tmp_path}", "--out", str(file))
    for run, flag in ((train, "--workdir"), (evaluate, "--out")):
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines() == [f"error: {flag} {file}: is a file, not a directory"]
    assert file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ---- interrupted writes ----

def _signal_while_writing(monkeypatch, signum):
    """Send `signum` to this process as the first tensor file is written (then finish writing it)."""
    from btx_jax.checkpoint import tensor_files
    real = tensor_files.save_file

    def save_and_signal(*a, **k):
        os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(tensor_files, "save_file", save_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_convert_leaves_no_temp_dir_and_the_old_output(models, tmp_path, capsys, monkeypatch,
                                                                        signum):
    dst = tmp_path / "hf"
    assert convert.main(["hf-to-btx", str(models / "llama"), str(tmp_path / "btx")]) == 0
    assert convert.main(["btx-to-hf", str(tmp_path / "btx"), str(dst)]) == 0
    before, listing = digest(dst), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    _signal_while_writing(monkeypatch, signum)
    assert convert.main(["btx-to-hf", str(tmp_path / "btx"), str(dst), "--overwrite"]) == 128 + signum
    err = one_line_error(capsys, f"interrupted by {signal.Signals(signum).name}", str(dst), "not written")
    assert "wrote" not in err and capsys.readouterr().out == ""
    assert digest(dst) == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL         # the handlers are restored


def test_sigterm_during_compose_exits_143_with_one_line(hf_llama, tmp_path, capsys, monkeypatch):
    base = hf_llama()
    expert = tmp_path / "expert"
    _peft_expert(base, expert)
    _signal_while_writing(monkeypatch, signal.SIGTERM)
    out = tmp_path / "moe"
    assert compose_cli.main([str(base), str(expert), str(expert), "--out", str(out), "--top-k", "1",
                             "--format", "mergoo"]) == 143
    one_line_error(capsys, "interrupted by SIGTERM", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def _peft_expert(base: Path, out: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter on `base` (random A and B), written by btx_jax."""
    import jax

    import btx_jax
    from btx_jax.config import AdapterSpec
    from btx_jax.model import init_params
    pre = btx_jax.load_pretrained(base)
    config = pre.config.replace(adapter=AdapterSpec())
    params = init_params(config, jax.random.PRNGKey(seed))
    btx_jax.Pretrained(config, params).save_pretrained(out, format="peft")
    return out


def test_stale_temp_dirs_of_dead_writers_on_this_host_are_removed(models, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".btx.tmp-{dead.pid}-0123abcd-{host}"
    alive = tmp_path / f".btx.tmp-{os.getpid()}-0123abcd-{host}"
    elsewhere = tmp_path / f".btx.tmp-{dead.pid}-0123abcd-{host}x"
    for d in (stale, alive, elsewhere):
        d.mkdir()
        (d / "params").write_text("partial")
    assert convert.main(["hf-to-btx", str(models / "llama"), str(tmp_path / "btx")]) == 0
    assert not stale.exists() and alive.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["btx", "models", alive.name, elsewhere.name])


def test_sigterm_to_the_convert_script_leaves_no_temp_dir(models, tmp_path):
    """The real signal from outside: the process ends 143 with one line, nothing beside the old output."""
    code = ("import os, signal, sys, time; sys.argv[1:] = []\n"
            "from btx_jax.checkpoint import tensor_files as t\n"
            "real = t.save_file\n"
            "def slow(*a, **k):\n    print('writing', flush=True); time.sleep(60); return real(*a, **k)\n"
            "t.save_file = slow\n"
            "from btx_jax.convert import main\n"
            f"sys.exit(main(['btx-to-hf', {str(tmp_path / 'btx')!r}, {str(tmp_path / 'hf')!r}]))\n")
    assert convert.main(["hf-to-btx", str(models / "llama"), str(tmp_path / "btx")]) == 0
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and err.count("\n") == 1, err
    assert "interrupted by SIGTERM" in err and "wrote" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["btx", "models"]
