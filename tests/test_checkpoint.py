"""Checkpoint conversion: HF -> btx -> HF round trips (bit-identical tensors, equivalent config), sharded
writing / reading, and bad input through both the Python API and scripts/convert.py (exit code 2, one stderr
line, nothing left at DST)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import btx_jax
from btx_jax import CheckpointError, ConfigError
from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
from btx_jax.model import init_params
from btx_jax.pretrained import Pretrained
from conftest import LLAMA3_ROPE, REPO_ROOT, hf_logits, hf_model, random_ids, safetensors_dict

LLAMA3_TIED = dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope_theta=500000.0,
                   rope_scaling=LLAMA3_ROPE)


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = safetensors_dict(a_dir), safetensors_dict(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def assert_same_config(a_dir: Path, b_dir: Path) -> None:
    import transformers
    ja, jb = (json.loads((d / "config.json").read_text()) for d in (a_dir, b_dir))
    assert LlamaConfig.from_hf(ja) == LlamaConfig.from_hf(jb)
    ta, tb = (transformers.LlamaConfig.from_dict(j) for j in (ja, jb))   # ... and so does transformers
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
        assert getattr(ta, field) == getattr(tb, field), field
    strip = lambda p: {k: v for k, v in p.items() if k != "type"}    # noqa: E731
    assert strip(ta.rope_parameters) == strip(tb.rope_parameters)


# ---- round trips ----

def _record_limits(monkeypatch, module) -> list[dict]:
    """The host-memory limits of every orbax PyTreeCheckpointHandler `module` makes from now on."""
    limits, real = [], module.ocp.PyTreeCheckpointHandler

    def recording(*args, **kwargs):
        limits.append({k: v for k, v in kwargs.items() if k.endswith("concurrent_gb")})
        return real(*args, **kwargs)
    monkeypatch.setattr(module.ocp, "PyTreeCheckpointHandler", recording)
    return limits


def test_btx_save_and_restore_bound_the_bytes_in_flight_and_still_move_a_leaf_above_the_bound(hf_llama, tmp_path,
                                                                                            monkeypatch):
    """orbax moves every leaf at once unless told otherwise (at 1.1B: restore 11.95 GiB peak for 7.73 GiB of fp32
    params, 10.01 GiB bounded); the bound is HOST_BUDGET, raised to the largest leaf so that one still moves:
    orbax refuses a write or read above its limit (a 1.1B save on one device failed on its 352 MiB q_proj)."""
    from btx_jax.checkpoint import btx
    src = btx_jax.load_pretrained(hf_llama())
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(src.params))
    monkeypatch.setattr(btx, "HOST_BUDGET", 1024)                     # below every leaf of the tiny model
    limits = _record_limits(monkeypatch, btx)
    src.save_pretrained(tmp_path / "btx", format="btx")
    back = btx_jax.load_pretrained(tmp_path / "btx")
    bound = btx.concurrent_gb(largest)
    assert limits == [dict.fromkeys(("save_concurrent_gb", "save_device_host_concurrent_gb",
                                     "restore_concurrent_gb"), bound)] * 2, (limits, largest)
    for path, leaf in src.flat_numpy().items():
        np.testing.assert_array_equal(back.flat_numpy()[path], leaf, err_msg=path)


def test_training_checkpoints_save_and_restore_a_shard_above_the_bound(tmp_path, monkeypatch):
    """A one-device run whose largest trainable shard is above HOST_BUDGET (at 7B on one GPU: lora_a of r=640 is
    320 MiB) saves and resumes it: the manager's limits follow the state's largest shard."""
    from btx_jax.checkpoint import btx
    from btx_jax.train import checkpoints
    monkeypatch.setattr(btx, "HOST_BUDGET", 1024)
    monkeypatch.setattr(checkpoints, "HOST_BUDGET", 1024)
    state = {"w": jax.numpy.arange(64 * 64, dtype=np.float32).reshape(64, 64), "step": jax.numpy.int32(3)}
    ckpt = checkpoints.Checkpointer(tmp_path / "c", every=1, keep=1)
    assert ckpt.save(1, state, {"pos": 1}, {}, "digest", force=True)
    ckpt.close()
    again = checkpoints.Checkpointer(tmp_path / "c", every=1, keep=1)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    step, back, data_state, digest = again.resume(abstract, lambda saved: None)
    again.close()
    assert (step, data_state, digest) == (1, {"pos": 1}, "digest")
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(state["w"]))


@pytest.mark.parametrize("kind", ["untied", "tied_llama3"])
def test_hf_btx_hf_roundtrip_bit_identical(hf_llama, tmp_path, kind):
    src = hf_llama() if kind == "untied" else hf_llama(**LLAMA3_TIED)
    btx_jax.load_pretrained(src).save_pretrained(tmp_path / "btx", format="btx")
    assert (tmp_path / "btx" / "btx_config.json").is_file()
    back = btx_jax.load_pretrained(tmp_path / "btx")
    back.save_pretrained(tmp_path / "hf", format="hf")
    assert_same_tensors(src, tmp_path / "hf")
    assert_same_config(src, tmp_path / "hf")
    # the re-exported directory is a working transformers checkpoint
    ids = random_ids(1, 12, seed=5)
    np.testing.assert_array_equal(hf_logits(tmp_path / "hf", ids), hf_logits(src, ids))


def test_cli_roundtrip_bf16_checkpoint(tmp_path, convert_script):
    """A bf16 HF checkpoint survives hf-to-btx / btx-to-hf bit for bit with --dtype bfloat16."""
    import torch
    from conftest import build_hf_llama
    src = build_hf_llama(tmp_path / "src", torch_dtype=torch.bfloat16)
    assert next(iter(safetensors_dict(src).values())).dtype.name == "bfloat16"
    assert convert_script.main(["hf-to-btx", str(src), str(tmp_path / "btx"), "--dtype", "bfloat16"]) == 0
    assert convert_script.main(["btx-to-hf", str(tmp_path / "btx"), str(tmp_path / "hf"),
                                "--dtype", "bfloat16"]) == 0
    assert_same_tensors(src, tmp_path / "hf")
    assert_same_config(src, tmp_path / "hf")


def test_sharded_write_then_transformers_and_btx_read(hf_llama, tmp_path):
    src = hf_llama(**LLAMA3_TIED)
    pre = btx_jax.load_pretrained(src)
    dst = pre.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (dst / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in safetensors_dict(src).values())
    assert all(s.stat().st_size < 40_000 + 30_000 for s in shards)       # largest tensor is 128x48x4 B
    assert_same_tensors(src, dst)
    # transformers reads the sharded directory and computes the same logits
    ids = random_ids(2, 20, seed=6)
    ref = hf_logits(src, ids)
    np.testing.assert_array_equal(hf_logits(dst, ids), ref)
    # and so does btx_jax (sharded reading)
    again = btx_jax.load_pretrained(dst)
    for path, leaf in pre.flat_numpy().items():
        np.testing.assert_array_equal(np.asarray(again.flat_numpy()[path]), leaf)
    assert np.max(np.abs(again.logits(ids) - ref)) <= 1e-4


def test_cli_sharded_btx_to_hf(hf_llama, tmp_path, convert_script):
    src = hf_llama()
    assert convert_script.main(["hf-to-btx", str(src), str(tmp_path / "btx")]) == 0
    assert convert_script.main(["btx-to-hf", str(tmp_path / "btx"), str(tmp_path / "hf"),
                                "--max-shard-size", "50KB"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) >= 2
    assert_same_tensors(src, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []       # no temp dirs left


# ---- bad input: each case builds a broken checkpoint next to a good one ----

def _rewrite_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "bad"))


def case_missing_dir(src, tmp_path):
    return tmp_path / "does-not-exist", CheckpointError, ["does-not-exist", "not found"]


def case_missing_config(src, tmp_path):
    bad = _copy(src, tmp_path)
    (bad / "config.json").unlink()
    return bad, CheckpointError, [str(bad), "config.json"]


def _foreign(arch, model_type):
    def case(src, tmp_path):
        bad = _copy(src, tmp_path)
        cfg = json.loads((bad / "config.json").read_text())
        cfg.update(architectures=[arch], model_type=model_type)
        (bad / "config.json").write_text(json.dumps(cfg))
        return bad, ConfigError, [str(bad / "config.json"), arch]
    return case


def case_missing_tensor(src, tmp_path):
    bad = _copy(src, tmp_path)
    _rewrite_tensors(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return bad, CheckpointError, ["'model.layers.1.mlp.up_proj.weight'", "missing"]


def case_wrong_shape(src, tmp_path):
    bad = _copy(src, tmp_path)
    key = "model.layers.0.self_attn.k_proj.weight"          # [2 kv heads * 24, 48] -> [3 * 24, 48]

    def edit(t):
        t[key] = np.zeros((72, 48), np.float32)
    _rewrite_tensors(bad, edit)
    return bad, CheckpointError, [f"'{key}'", "[72, 48]", "[48, 48]"]


def case_corrupt_header(src, tmp_path):
    bad = _copy(src, tmp_path)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" + b"#" * (n - 1) + data[8 + n:])   # same length, header no longer JSON
    return bad, CheckpointError, [str(path), "corrupt"]


def case_truncated_file(src, tmp_path):
    bad = _copy(src, tmp_path)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return bad, CheckpointError, [str(path)]


def case_pickle_refused(src, tmp_path):
    import torch
    bad = _copy(src, tmp_path)
    torch.save(hf_model(src).state_dict(), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    return bad, CheckpointError, [str(bad / "pytorch_model.bin"), "pickle", "allow"]


def case_missing_shard(src, tmp_path):
    bad = tmp_path / "bad"
    btx_jax.load_pretrained(src).save_pretrained(bad, max_shard_bytes=40_000)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    return bad, CheckpointError, [shard.name, "not found"]


BAD_CASES = {
    "missing_dir": case_missing_dir, "missing_config": case_missing_config,
    "mistral_architecture": _foreign("MistralForCausalLM", "mistral"),
    "gpt2_architecture": _foreign("GPT2LMHeadModel", "gpt2"),
    "missing_tensor": case_missing_tensor, "wrong_shape": case_wrong_shape,
    "corrupt_header": case_corrupt_header, "truncated_file": case_truncated_file,
    "pickle_without_allow": case_pickle_refused, "missing_shard": case_missing_shard,
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_python_api(hf_llama, tmp_path, case):
    bad, exc, needles = BAD_CASES[case](hf_llama(), tmp_path)
    with pytest.raises(exc) as info:
        btx_jax.load_pretrained(bad)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n" not in message


def _assert_cli_failed(rc, err, dst: Path, needles=()):
    assert rc == 2
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"stderr was {err!r}"
    assert "Traceback" not in err and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not dst.exists(), "a failed conversion left DST behind"
    assert [p.name for p in dst.parent.glob(f".{dst.name}*")] == [], "temporary directory left behind"


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_cli(hf_llama, tmp_path, capsys, convert_script, case):
    bad, _, needles = BAD_CASES[case](hf_llama(), tmp_path)
    capsys.readouterr()
    dst = tmp_path / "out" / "dst"
    rc = convert_script.main(["hf-to-btx", str(bad), str(dst)])
    captured = capsys.readouterr()
    _assert_cli_failed(rc, captured.err, dst, needles)
    assert captured.out == ""


def test_pickle_loads_with_allow_flag(hf_llama, tmp_path, capsys, convert_script):
    src = hf_llama()
    bad, _, _ = case_pickle_refused(src, tmp_path)
    ids = random_ids(1, 10, seed=2)
    pre = btx_jax.load_pretrained(bad, allow_pickle=True)
    np.testing.assert_array_equal(pre.logits(ids), btx_jax.load_pretrained(src).logits(ids))
    assert convert_script.main(["hf-to-btx", str(bad), str(tmp_path / "btx"), "--allow-pickle"]) == 0
    assert convert_script.main(["btx-to-hf", str(tmp_path / "btx"), str(tmp_path / "hf")]) == 0
    assert_same_tensors(src, tmp_path / "hf")


def test_cli_refuses_existing_dst_and_wrong_source_format(hf_llama, tmp_path, capsys, convert_script):
    src = hf_llama()
    dst = tmp_path / "btx"
    assert convert_script.main(["hf-to-btx", str(src), str(dst)]) == 0
    marker = dst / "btx_config.json"
    before = marker.read_bytes()
    capsys.readouterr()
    assert convert_script.main(["hf-to-btx", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert marker.read_bytes() == before
    assert convert_script.main(["hf-to-btx", str(src), str(dst), "--overwrite"]) == 0
    # a btx checkpoint given to hf-to-btx, an HF one to btx-to-hf
    other = tmp_path / "other"
    rc = convert_script.main(["hf-to-btx", str(dst), str(other)])
    _assert_cli_failed(rc, capsys.readouterr().err, other, ["btx"])
    rc = convert_script.main(["btx-to-hf", str(src), str(other)])
    _assert_cli_failed(rc, capsys.readouterr().err, other, ["hf"])
    rc = convert_script.main(["btx-to-hf", str(dst), str(other), "--max-shard-size", "lots"])
    _assert_cli_failed(rc, capsys.readouterr().err, other, ["lots"])


def _lora_btx(directory: Path, router: bool = False) -> Pretrained:
    experts = (ExpertSpec(4, 8.0), ExpertSpec(2, 4.0)) if router else (ExpertSpec(4, 8.0),)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8,
                         adapter=AdapterSpec(targets=("q_proj", "v_proj", "down_proj"), experts=experts,
                                             router=router, top_k=len(experts)))
    params = init_params(config, jax.random.PRNGKey(1))
    params = jax.tree_util.tree_map_with_path(      # non-zero lora_b so that the adapter matters
        lambda kp, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(kp) else x, params)
    pre = Pretrained(config, params)
    pre.save_pretrained(directory, format="btx")
    return pre


def test_failure_while_writing_leaves_nothing(tmp_path, capsys, convert_script):
    """An error raised after DST's temporary directory exists (a LoRA model saved as plain HF without
    merging) removes the temporary directory and leaves no DST; the CLI names --merge-lora."""
    pre = _lora_btx(tmp_path / "lora_btx")
    dst = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="merge_lora"):
        pre.save_pretrained(dst, format="hf")
    assert not dst.exists() and [p.name for p in tmp_path.glob(".hf*")] == []
    capsys.readouterr()
    rc = convert_script.main(["btx-to-hf", str(tmp_path / "lora_btx"), str(dst)])
    _assert_cli_failed(rc, capsys.readouterr().err, dst, ["--merge-lora"])


def test_cli_peft_and_mergoo_conversions(hf_llama, tmp_path, convert_script):
    """The adapter subcommands: PEFT adapter -> btx -> PEFT is bit-identical and --merge-lora export equals
    PEFT's merged model; a LoRA-MoE btx checkpoint -> mergoo -> btx keeps every parameter."""
    import peft
    import torch
    base = hf_llama()
    model = peft.get_peft_model(hf_model(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    run = convert_script.main
    assert run(["peft-to-btx", str(tmp_path / "adapter"), str(tmp_path / "btx"), "--base", str(base)]) == 0
    assert run(["btx-to-peft", str(tmp_path / "btx"), str(tmp_path / "adapter2")]) == 0
    a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapter2" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert run(["btx-to-hf", str(tmp_path / "btx"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    ids = random_ids(1, 12, seed=4)
    with torch.no_grad():
        ref = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.max(np.abs(hf_logits(tmp_path / "merged", ids) - ref)) <= 1e-4

    moe = _lora_btx(tmp_path / "moe_btx", router=True)
    assert run(["btx-to-mergoo", str(tmp_path / "moe_btx"), str(tmp_path / "mergoo")]) == 0
    assert run(["mergoo-to-btx", str(tmp_path / "mergoo"), str(tmp_path / "moe_btx2")]) == 0
    again = btx_jax.load_pretrained(tmp_path / "moe_btx2")
    assert again.config == moe.config
    for path, leaf in moe.flat_numpy().items():
        np.testing.assert_array_equal(again.flat_numpy()[path], leaf, err_msg=path)


def test_cli_subprocess_from_repo_root(hf_llama, tmp_path):
    """`python scripts/convert.py ...` works from the repo root: success exits 0, bad input exits 2 with
    exactly one stderr line and no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    script = ["python", "scripts/convert.py"]
    ok = subprocess.run(script + ["hf-to-btx", str(hf_llama()), str(tmp_path / "btx")], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "btx" / "btx_config.json").is_file()
    bad = subprocess.run(script + ["hf-to-btx", str(tmp_path / "missing"), str(tmp_path / "dst")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    _assert_cli_failed(bad.returncode, bad.stderr, tmp_path / "dst", ["missing"])
    usage = subprocess.run(script + ["--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert usage.returncode == 0 and "hf-to-btx" in usage.stdout and "btx-to-mergoo" in usage.stdout


def test_write_tensors_streams_each_array_and_reads_back_as_safetensors(tmp_path):
    """write_tensors keeps no array after writing it (host memory: one tensor, not a 5 GB shard), and its files
    are what safetensors (and so transformers / torch) read: every dtype, shape and value, shards + index."""
    import weakref

    import ml_dtypes

    from btx_jax.checkpoint.tensor_files import write_tensors

    rng = np.random.default_rng(0)
    want = {"a.bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16), "b.f32": rng.normal(size=(7,)).astype(
        np.float32), "c.i64": np.arange(6, dtype=np.int64).reshape(2, 3), "d.f16": np.ones((2, 2), np.float16),
        "e.scalar": np.array(3.5, np.float32), "f.bool": np.array([True, False])}
    alive = []

    def tensors():
        for name, arr in want.items():
            assert all(ref() is None for ref in alive), "an earlier array is still held"
            arr = arr.copy()
            alive.append(weakref.ref(arr))
            yield name, arr
            del arr

    for sub, max_shard in (("one", 2**30), ("sharded", 64)):
        (tmp_path / sub).mkdir()
        alive.clear()
        write_tensors(tmp_path / sub, tensors(), max_shard_bytes=max_shard)
        files = sorted(p.name for p in (tmp_path / sub).iterdir())
        got = {}
        for f in files:
            if f.endswith(".safetensors"):
                got.update(load_file(str(tmp_path / sub / f)))
        assert set(got) == set(want)
        for name, arr in want.items():
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
            np.testing.assert_array_equal(got[name], arr)
        if sub == "one":
            assert files == ["model.safetensors"]
        else:
            index = json.loads((tmp_path / sub / "model.safetensors.index.json").read_text())
            assert len(files) > 2 and set(index["weight_map"]) == set(want)
            assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())


def test_a_lazy_leaf_indexes_like_numpy():
    """Slices and integers (negative ones too; an integer drops its dimension), reading only what is asked for:
    exports index stacked leaves per layer (`leaf[i]`) and per layer and expert (`leaf[i, e]`)."""
    from btx_jax.checkpoint.lazy import LazyLeaf
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    asked = []
    leaf = LazyLeaf(a.shape, a.dtype, lambda idx: asked.append(idx) or a[idx])
    for index in (1, (1, 2), -1, (slice(0, 1),), (slice(None), 1), (0, slice(1, 3), -2)):
        np.testing.assert_array_equal(leaf[index], a[index], err_msg=str(index))
    assert asked[1] == (slice(1, 2), slice(2, 3), slice(0, 4))
