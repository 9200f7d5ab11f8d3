"""Lean checkpoints (btx_jax/checkpoint/btx.py, btx_jax/train/trainer.py save_final, checkpoints.py): training
steps and a phase's `final` hold what trained, not the frozen base; the final loads back to exactly the trained
model, feeds the next phase (compose + router) and exports as PEFT; a base that changed on disk is reported."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import btx_jax
from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.config import ConfigError
from btx_jax.train.trainer import train
from btx_jax.configs import expert, router
from conftest import build_hf_llama, random_ids

ARCH = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def expert_run(base: Path, workdir: Path, steps: int = 2):
    c = expert.get_config("synthetic")
    c.model.init = str(base)
    c.model.lora = dict(targets=("gate_proj", "up_proj", "down_proj"), rank=2, alpha=4.0, dropout=0.0)
    c.train.update(steps=steps, global_batch_size=8, seq_len=32, ckpt_every=1, keep_checkpoints=5, log_every=1,
                   lr=1e-2, warmup_steps=0)
    train(c, workdir)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    base = build_hf_llama(root / "base", **ARCH)
    expert_run(base, root / "expert")
    return root, base


def test_checkpoints_and_final_hold_only_what_trained(trained):
    root, base = trained
    model_bytes = du(base)
    steps = [p for p in (root / "expert" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 2
    # trainable 3,840 parameters + Adam state + orbax's files (120-240 KB, varying with write timing) of a
    # 159,808-parameter model: the frozen weights (fp32 here) would add the whole model's bytes
    for step in steps:
        assert du(step) < model_bytes / 2, (du(step), model_bytes)
        saved = (step / "state" / "_METADATA").read_text()
        assert "lora_a" in saved and "embed_tokens" not in saved and "kernel" not in saved
    final = btx.resolve(root / "expert" / "final")     # the version final/ names
    assert du(final) < model_bytes / 4, (du(final), model_bytes)
    stored = btx.stored_shapes(final)
    assert stored and all("lora_" in p for p in stored)


def test_final_loads_as_base_plus_trained_lora_and_exports(trained, tmp_path):
    root, base = trained
    final = root / "expert" / "final"
    pre = btx_jax.load_pretrained(final)
    plain = btx_jax.load_pretrained(base)
    lora = btx.restore(final, btx.stored_shapes(final))
    for path, leaf in pre.flat_numpy().items():
        want = lora[path] if path in lora else plain.flat_numpy()[path]
        np.testing.assert_array_equal(leaf, np.asarray(want, leaf.dtype), err_msg=path)
    assert np.abs(lora["layers/mlp/down_proj/lora_b"]).max() > 0       # it trained
    pre.save_pretrained(tmp_path / "peft", format="peft")
    again = btx_jax.load_pretrained(base, adapter=tmp_path / "peft")
    ids = random_ids(2, 16, vocab=256)
    np.testing.assert_allclose(again.logits(ids), pre.logits(ids), atol=1e-5)
    full = pre.save_pretrained(tmp_path / "full", format="btx")
    assert not (btx.read_config(full)[1])          # self-contained on request


def test_router_phase_composes_lean_experts(trained):
    root, base = trained
    c = router.get_config("tiny")
    c.model.init = str(base)
    c.model.compose.experts = [str(root / "expert" / "final")] * 2
    c.data = dict(kind="synthetic")
    c.train.update(steps=1, global_batch_size=8, seq_len=32, ckpt_every=1, log_every=1)
    train(c, root / "router")
    moe = btx_jax.load_pretrained(root / "router" / "final")
    stored = btx.stored_shapes(root / "router" / "final")
    assert set(stored) == {p for p in moe.flat_numpy() if p.endswith("/router") or p == "lm_head"}
    assert np.isfinite(moe.logits(random_ids(1, 8, vocab=256))).all()


def test_changed_base_is_reported(trained, tmp_path):
    root, base = trained
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    work = tmp_path / "run"
    expert_run(moved, work, steps=1)
    build_hf_llama(moved, seed=7, **ARCH)                    # the same files, other weights
    with pytest.raises(CheckpointError, match="changed since it was written"):
        btx_jax.load_pretrained(work / "final")
    with pytest.raises(ConfigError, match="frozen weights .* changed"):
        expert_run(moved, work, steps=2)


def test_compose_refuses_experts_of_another_base(trained, tmp_path):
    root, base = trained
    other = build_hf_llama(tmp_path / "other", seed=3, **ARCH)
    final = root / "expert" / "final"
    with pytest.raises(ConfigError, match="trained on another base"):
        btx_jax.compose(other, [final, final], btx_jax.LoraMoESpec(top_k=1))
    moe = btx_jax.compose(other, [final, final], btx_jax.LoraMoESpec(top_k=1, allow_other_base=True))
    assert np.isfinite(moe.logits(random_ids(1, 8, vocab=256))).all()
    btx_jax.compose(base, [final, final], btx_jax.LoraMoESpec(top_k=1))          # its own base passes
