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

from btx_jax.cli import compose as compose_cli, convert
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
    real = tensor_files._ShardWriter.close          # where a safetensors file is written

    def save_and_signal(self):
        os.kill(os.getpid(), signum)
        return real(self)
    monkeypatch.setattr(tensor_files._ShardWriter, "close", save_and_signal)


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


def test_sigterm_during_an_orbax_write_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp
    real = ocp.Checkpointer.save

    def save_and_signal(self, *a, **k):          # the signal arrives while orbax may still be writing
        out = real(self, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(ocp.Checkpointer, "save", save_and_signal)
    assert convert.main(["hf-to-btx", str(models / "llama"), str(tmp_path / "btx")]) == 143
    one_line_error(capsys, "interrupted by SIGTERM", str(tmp_path / "btx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_sigterm_during_compose_exits_143_with_one_line(hf_llama, tmp_path, capsys, monkeypatch):
    base = hf_llama()
    one, two = _peft_expert(base, tmp_path / "one"), _peft_expert(base, tmp_path / "two", seed=2)
    capsys.readouterr()
    _signal_while_writing(monkeypatch, signal.SIGTERM)
    out = tmp_path / "moe"
    assert compose_cli.main([str(base), str(one), str(two), "--out", str(out), "--top-k", "1",
                             "--format", "mergoo"]) == 143
    one_line_error(capsys, "interrupted by SIGTERM", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


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
            "real = t._ShardWriter.close\n"
            "def slow(self):\n    print('writing', flush=True); time.sleep(60); return real(self)\n"
            "t._ShardWriter.close = slow\n"
            "from btx_jax.cli.convert import main\n"
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


# ---- files that point elsewhere ----

@pytest.fixture
def sharded_outside(hf_llama, tmp_path):
    """tmp/ckpt: an HF Llama whose index.json names its one shard as ../outside/model.safetensors."""
    from safetensors import safe_open
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    shutil.copytree(hf_llama(), ckpt)
    outside.mkdir()
    (ckpt / "model.safetensors").rename(outside / "model.safetensors")
    with safe_open(str(outside / "model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../outside/model.safetensors" for n in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


def test_index_json_naming_a_shard_outside_the_checkpoint_is_refused(sharded_outside, tmp_path, capsys,
                                                                      monkeypatch):
    before = digest(tmp_path)
    assert convert.main(["hf-to-btx", str(sharded_outside), str(tmp_path / "btx")]) == 2
    one_line_error(capsys, f"{sharded_outside / 'model.safetensors.index.json'}: weight_map entry",
                   "'../outside/model.safetensors', outside", "BTX_ALLOW_EXTERNAL_FILES=1")
    assert digest(tmp_path) == before
    index = sharded_outside / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"] = {n: str(tmp_path / "outside" / "model.safetensors") for n in raw["weight_map"]}
    index.write_text(json.dumps(raw))                   # an absolute path
    assert convert.main(["hf-to-btx", str(sharded_outside), str(tmp_path / "btx")]) == 2
    one_line_error(capsys, "weight_map entry", "outside")
    monkeypatch.setenv("BTX_ALLOW_EXTERNAL_FILES", "1")                # the user's explicit consent
    assert convert.main(["hf-to-btx", str(sharded_outside), str(tmp_path / "btx")]) == 0


def _lean(base: Path, out: Path, path: Path | None = None) -> Path:
    """A lean btx checkpoint as training writes it: lm_head stored, the rest named in frozen_from (`path`,
    default `base`) with the digest of those weights."""
    import btx_jax
    from btx_jax import param_paths
    from btx_jax.checkpoint import btx
    flat = param_paths.flatten(btx_jax.load_pretrained(base).params)
    linked = {k: v for k, v in flat.items() if k != "lm_head"}
    out.mkdir()
    btx.save(out, btx_jax.load_pretrained(base).config, {"lm_head": flat["lm_head"]},
             {"path": str(path or base), "digest": btx.digest(linked), "digest_paths": sorted(linked)})
    return out


def _edit_reference(lean: Path, **changes) -> None:
    file = lean / "btx_config.json"
    raw = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            raw["frozen_from"].pop(key, None)
        else:
            raw["frozen_from"][key] = value
    file.write_text(json.dumps(raw))


def test_lean_final_control_loads(hf_llama, tmp_path, capsys):
    lean = _lean(hf_llama(), tmp_path / "lean")
    assert convert.main(["btx-to-btx", str(lean), str(tmp_path / "full"), "--self-contained"]) == 0


@pytest.mark.parametrize("changes, words", [
    ({"digest": None}, ["without the 'digest'", "BTX_ALLOW_EXTERNAL_FILES=1"]),
    ({"path": "relative/base"}, ["'path' 'relative/base' is not an absolute directory path"]),
    ({"experts": ["../x"]}, ["'experts[0]' '../x' is not an absolute"]),
    ({"digest": "0" * 32}, ["changed since it was written"]),
])
def test_a_redirected_or_unverifiable_frozen_from_is_refused(hf_llama, tmp_path, capsys, changes, words):
    lean = _lean(hf_llama(), tmp_path / "lean")
    _edit_reference(lean, **changes)
    before = digest(tmp_path)
    assert convert.main(["btx-to-btx", str(lean), str(tmp_path / "full"), "--self-contained"]) == 2
    one_line_error(capsys, *words)
    assert digest(tmp_path) == before


def test_redirected_to_another_base_is_refused_and_allowed_only_without_digest_on_request(hf_llama, tmp_path,
                                                                                         capsys, monkeypatch):
    lean, other = _lean(hf_llama(), tmp_path / "lean"), hf_llama(seed=1)
    capsys.readouterr()                                      # transformers' progress bar while building `other`
    _edit_reference(lean, path=str(other))
    assert convert.main(["btx-to-btx", str(lean), str(tmp_path / "full"), "--self-contained"]) == 2
    one_line_error(capsys, "the frozen weights it was trained on", "changed")
    _edit_reference(lean, digest=None)
    monkeypatch.setenv("BTX_ALLOW_EXTERNAL_FILES", "1")
    assert convert.main(["btx-to-btx", str(lean), str(tmp_path / "full"), "--self-contained"]) == 0


def test_frozen_from_cycles_are_one_line_naming_the_cycle(hf_llama, tmp_path, capsys):
    import time
    a = _lean(hf_llama(), tmp_path / "a")
    b = _lean(hf_llama(), tmp_path / "b")
    _edit_reference(a, path=str(a))                          # itself
    t0 = time.perf_counter()
    assert convert.main(["btx-to-btx", str(a), str(tmp_path / "full"), "--self-contained"]) == 2
    one_line_error(capsys, "frozen_from forms a cycle", f"{a} -> {a}")
    _edit_reference(a, path=str(b))
    _edit_reference(b, path=str(a))                          # a -> b -> a
    assert convert.main(["btx-to-btx", str(a), str(tmp_path / "full"), "--self-contained"]) == 2
    one_line_error(capsys, "frozen_from forms a cycle", f"{a} -> {b} -> {a}")
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "full").exists()


@pytest.mark.parametrize("key, value, words", [
    ("num_attention_heads", 0, "num_attention_heads (num_heads)=0 must be a positive integer"),
    ("hidden_size", -48, "hidden_size=-48 must be a positive integer"),
    ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("num_key_value_heads", 0, "num_key_value_heads (num_kv_heads)=0 must be a positive integer"),
    ("vocab_size", None, "vocab_size=None is not an integer"),
    ("intermediate_size", "big", "intermediate_size='big' is not an integer"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps=-1e-05 must be a positive number"),
    ("head_dim", 0, "head_dim=0 must be a positive integer"),
])
def test_bad_model_config_values_name_the_key(hf_llama, tmp_path, capsys, key, value, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_llama(), ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw[key] = value
    (ckpt / "config.json").write_text(json.dumps(raw))
    before = digest(tmp_path)
    assert convert.main(["hf-to-btx", str(ckpt), str(tmp_path / "btx")]) == 2
    one_line_error(capsys, f"{ckpt / 'config.json'}: {words}")
    assert digest(tmp_path) == before


def test_composing_the_same_expert_twice_warns(hf_llama, tmp_path, capsys):
    import btx_jax
    base = hf_llama()
    one, two = _peft_expert(base, tmp_path / "one"), _peft_expert(base, tmp_path / "two", seed=2)
    capsys.readouterr()
    btx_jax.compose(base, [one, two], btx_jax.LoraMoESpec(top_k=1))
    assert "warning" not in capsys.readouterr().err
    btx_jax.compose(base, [one, two, str(one) + "/"], btx_jax.LoraMoESpec(top_k=1))
    assert capsys.readouterr().err == f"warning: expert 2 ({one}/) is the same as expert 0: the mixture holds two " \
                                      "identical experts\n"


def test_a_peft_adapter_naming_another_base_warns_in_one_line(hf_llama, tmp_path, capsys):
    from btx_jax.pretrained import open_model
    base, other = hf_llama(), hf_llama(seed=1)
    adapter = _peft_expert(base, tmp_path / "adapter")
    config = adapter / "adapter_config.json"

    def name_base(named: str) -> None:
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": named}))

    def warning(named: str) -> str:
        return (f"warning: {config}: base_model_name_or_path is {named!r}, but the adapter is applied to {base} "
                "(trained on another base? the shapes fit)")
    capsys.readouterr()
    for named, warns in ((str(base), False), (str(base) + "/", False), (str(other), True)):
        name_base(named)
        open_model(base, adapter=adapter)
        assert capsys.readouterr().err == (warning(named) + "\n" if warns else "")
    name_base("meta-llama/Llama-2-7b-hf")                        # a hub name: not part of the base's path
    run = _script("convert.py", "peft-to-btx", str(adapter), str(tmp_path / "btx"), "--base", str(base))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert [line for line in run.stderr.splitlines() if "warning" in line] == [warning("meta-llama/Llama-2-7b-hf")]
