"""btx_jax/train/plan.py and `btx plan` (btx_jax/cli/plan.py): the abstract plan agrees with the memory of the real state on 8 virtual
devices, its FLOPs grow ~linearly with the batch, and the CLI end to end on `--target cpu:N` and, through XLA's deviceless
GPU compiler, `--target gpu:h100-8` (bad input: one line, exit 2).  (conftest.py sets XLA_FLAGS to 8 host
devices.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from btx_jax.cli import plan as plan_cli
from btx_jax.train import aot, plan as plan_mod

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)
needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason='jax_cuda12_plugin is not installed (pip install "jax[cuda12]"): no GPU compiler')


def small_cfg():
    from btx_jax.train.trainer import resolved
    from btx_jax.configs import expert
    c = expert.get_config("synthetic")
    c.model.arch = ARCH
    c.train.update(global_batch_size=8, seq_len=32)
    return resolved(c)


def real_state_bytes_on_device0(cfg) -> dict:
    """Build the state like train() does and sum the device-0 shards of each part."""
    import jax.numpy as jnp
    from btx_jax.train.trainer import initial_state, wire
    t = cfg["train"]
    state, _ = initial_state(wire(cfg), 0)
    dev0 = jax.devices()[0]

    def on_dev0(tree):
        return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
                   if s.device == dev0)
    return {"params": on_dev0(state["trainable"]) + on_dev0(state["frozen"]),
            "optimizer": on_dev0(state["opt_state"]), "frozen_dtype": jnp.dtype(t["frozen_dtype"])}


def test_plan_bytes_match_real_state_shards():
    assert jax.device_count() == 8
    cfg = small_cfg()
    planned = plan_mod.plan(cfg, phase="expert")
    real = real_state_bytes_on_device0(cfg)
    assert planned["devices"] == 8
    got = planned["bytes"]["params"] + planned["bytes"]["optimizer"]
    want = real["params"] + real["optimizer"]
    assert abs(got - want) <= 0.03 * want, (planned["bytes"], real)
    assert abs(planned["bytes"]["optimizer"] - real["optimizer"]) <= 0.03 * real["optimizer"]
    # the compiled step's arguments are the state + batch: the same bytes, give or take the batch
    assert planned["bytes"]["argument"] >= want
    assert planned["bytes"]["temp"] > 0 and planned["bytes"]["peak"] >= planned["bytes"]["argument"]


def test_planned_flops_positive_and_linear_in_batch():
    cfg = small_cfg()
    f8 = plan_mod.plan(cfg, phase="expert", batch=8)["flops_global"]
    f16 = plan_mod.plan(cfg, phase="expert", batch=16)["flops_global"]
    assert f8 > 0
    assert 1.8 <= f16 / f8 <= 2.05, (f8, f16)



def test_plan_cli_cpu_target_and_bad_target(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["--config", "configs/expert.py:synthetic", "--target", "cpu:8", "--batch", "8", "--seq-len", "32",
            "--loss-chunk", "16", "--out", str(out)]
    assert plan_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "cpu:8 = 8 cpu devices" in text and "| expert | 8 |" in text
    with pytest.raises(SystemExit) as exited:
        plan_cli.main(argv[:2] + ["--target", "tpu:v9-8"])
    assert exited.value.code == 2
    err = capsys.readouterr()
    assert "expected cpu:N" in (err.out + err.err) and "Traceback" not in err.err
    with pytest.raises(SystemExit) as exited:
        plan_cli.main(argv[:2] + ["--device-memory", "12XB"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --device-memory: '12XB' is not a size" in err
    with pytest.raises(SystemExit) as exited:
        plan_cli.main(argv[:2] + ["--mesh", "fsdp8"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --mesh 'fsdp8': expected axis=size pairs separated by commas, e.g. data=1,fsdp=8,tensor=1\n"
    assert plan_cli.mesh_axes("data=1, fsdp=8,tensor=-1") == {"data": 1, "fsdp": 8, "tensor": -1}


def test_max_batch_secant_search_finds_the_largest_fitting_multiple(monkeypatch):
    """The search ends with adjacent batches on both sides of the budget (peak bytes superlinear in the batch,
    as the TPU compiler reports at large batches), reusing a known plan and compiling few others."""
    from btx_jax import mesh as mesh_lib

    peak = lambda b: int((10 + 0.5 * b + 0.004 * b * b) * 2**30)
    compiled = []

    def fake_plan(cfg, *, batch, **_):
        compiled.append(batch)
        return {"global_batch": batch, "fits": True, "bytes": {"peak": peak(batch)}, "compile_s": 0.0}

    monkeypatch.setattr(plan_mod, "plan", fake_plan)
    mesh = mesh_lib.make_mesh({"fsdp": 4, "num_devices": 4})
    cfg = {"mesh": {"fsdp": 4}, "mesh_rules": (), "train": {"microbatches": 1}}
    known = ({"global_batch": 64, "fits": True, "bytes": {"peak": peak(64)}, "compile_s": 0.0},)
    best, runs = plan_mod.max_batch(cfg, 95 * 2**30, phase="expert", experts=3, top_k=2, mesh=mesh, known=known,
                                    log=lambda _: None)
    budget = 0.9 * 95 * 2**30
    assert best % 4 == 0 and peak(best) <= budget < peak(best + 4)
    assert 64 not in compiled and len(compiled) <= 5, compiled


def refusal(capsys, argv) -> str:
    """The one stderr line of a plan CLI run refused with exit 2."""
    with pytest.raises(SystemExit) as exited:
        plan_cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_plan_cli_refuses_unknown_gpus_and_malformed_target_files(tmp_path, capsys):
    base = ["--config", "configs/expert.py:synthetic", "--seq-len", "32"]
    assert "unknown GPU 'b200'" in refusal(capsys, base + ["--target", "gpu:b200-8"])
    (tmp_path / "no_memory.txtpb").write_text("name: 1\n")
    err = refusal(capsys, base + ["--target", f"gpu:{tmp_path}/no_memory.txtpb"])
    assert "no_memory.txtpb is not a GpuTargetConfigProto" in err


@needs_cuda
def test_plan_cli_refuses_a_config_xla_cannot_parse_and_a_batch_off_the_gpu_count(tmp_path, capsys):
    base = ["--config", "configs/expert.py:synthetic", "--seq-len", "32"]
    bogus = tmp_path / "bogus.txtpb"
    bogus.write_text((aot.GPU_TARGETS_DIR / "h100_sxm.txtpb").read_text() + "bogus_field: 3\n")
    err = refusal(capsys, base + ["--target", f"gpu:{bogus}"])
    assert "bogus.txtpb: XLA cannot use this GPU target config" in err and 'no field named "bogus_field"' in err
    err = refusal(capsys, base + ["--target", "gpu:h100-8", "--batch", "12"])
    assert "global_batch_size/microbatches=12 is not divisible by the data-parallel size 8" in err


@needs_cuda
def test_plan_cli_on_8_h100s_reports_gpu_memory_fit_and_model_count_flops(tmp_path, capsys):
    """A tiny expert step compiled for 8 compile-only H100s with a 5 MB device (budget 4.5 MB): batch 8 fits,
    16 does not, so the search compiles those two and the JSON row carries the TPU rows' fields."""
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--config", "configs/expert.py:synthetic", "--seq-len", "32", "--loss-chunk", "16",
                          "--batch", "8", "--target", "gpu:h100-8", "--search", "--device-memory", "5MB",
                          "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gpu:h100-8 = 8 NVIDIA H100 80GB HBM3 devices" in text and "XLA has no GPU cost model" in text
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["target"], row["devices"], row["fits"], row["attention"]) == ("gpu:h100-8", 8, True, "auto")
    assert 0 < row["bytes"]["peak"] <= 0.9 * 5e6
    assert row["flops_xla_raw"] is None and row["flops_source"].startswith("model count")
    assert row["flops_per_device"] > 0 and row["cost"] == {}
    peaks = {r["batch"]: r["peak"] for r in row["search"]}
    assert row["max_batch"] == 8 and peaks[16] > 0.9 * 5e6, peaks
