"""Versioned finals (btx_jax/checkpoint/btx.py, trainer.save_final, btx_jax/cli/chain.py, docs/finals.md): expert ->
router -> SFT on a tiny model; continuing the expert writes a new version and leaves the SFT model loadable on
the weights it was trained on; the chain listing shows both expert versions; a self-contained export needs no
upstream directory; a missing link is reported with the chain and the listing command, nothing written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import btx_jax
from btx_jax.cli import chain, convert
from btx_jax.checkpoint import btx
from btx_jax.checkpoint.tensor_files import CheckpointError
from btx_jax.train.trainer import train
from btx_jax.configs import router, sft
from conftest import build_hf_llama, random_ids
from test_lean_checkpoints import ARCH, expert_run

IDS = random_ids(2, 16, vocab=256)


def phase_run(preset, init: Path, workdir: Path, **model) -> None:
    c = preset.get_config("tiny")
    c.model.init = str(init)
    c.model.update(model)
    c.data = dict(kind="synthetic")
    c.train.update(steps=1, global_batch_size=8, seq_len=32, ckpt_every=1, log_every=1)
    train(c, workdir)


@pytest.fixture(scope="module")
def btx_chain(tmp_path_factory):
    """(root, sft logits before the expert was continued, the expert's first version)."""
    root = tmp_path_factory.mktemp("finals")
    base = build_hf_llama(root / "base", **ARCH)
    expert_run(base, root / "expert")
    phase_run(router, base, root / "router", compose=dict(experts=[str(root / "expert" / "final")] * 2, top_k=1))
    phase_run(sft, root / "router" / "final", root / "sft")
    before = btx_jax.load_pretrained(root / "sft" / "final").logits(IDS)
    first = btx.resolve(root / "expert" / "final")
    expert_run(base, root / "expert", steps=4)          # "train the expert a little longer"
    return root, before, first


def test_continuing_an_expert_keeps_what_is_built_on_it(btx_chain, capsys):
    root, before, first = btx_chain
    latest = btx.resolve(root / "expert" / "final")
    assert latest != first and first.is_dir() and latest.name.startswith("4-") and first.name.startswith("2-")
    assert sorted(p.name for p in (root / "expert" / "finals").iterdir()) == sorted([first.name, latest.name])
    np.testing.assert_array_equal(btx_jax.load_pretrained(root / "sft" / "final").logits(IDS), before)
    router_version = btx.resolve(root / "router" / "final")
    assert btx.read_config(router_version)[1]["experts"] == [str(first)] * 2     # the version, not final/
    assert btx.dependents(first) == [router_version] and btx.dependents(latest) == []
    assert chain.main([str(root / "sft" / "final")]) == 0
    out = capsys.readouterr().out
    assert f"{first}: present, digest ok, older version ({root / 'expert' / 'final'} now names {latest.name})" in out
    assert f"{router_version}: present, digest ok, latest" in out and "MISSING" not in out


def test_a_final_others_are_built_on_is_not_replaced(btx_chain):
    root, _, first = btx_chain
    pre = btx_jax.load_pretrained(first)
    with pytest.raises(CheckpointError, match="not replaced: 1 lean checkpoint"):
        pre.save_pretrained(first, format="btx", overwrite=True)
    assert btx.read_config(first)[1] is not None                # still the lean version


def moved_away(root: Path, names, attic: Path):
    attic.mkdir()
    for name in names:
        shutil.move(str(root / name), str(attic / name))


def put_back(root: Path, names, attic: Path):
    for name in names:
        shutil.move(str(attic / name), str(root / name))


def test_self_contained_export_needs_no_upstream(btx_chain, tmp_path):
    root, before, _ = btx_chain
    out = tmp_path / "sft_archive"
    assert convert.main(["btx-to-btx", str(root / "sft" / "final"), str(out), "--self-contained",
                         "--no-progress"]) == 0
    assert btx.read_config(out)[1] is None
    upstream = ["base", "expert", "router", "sft"]
    moved_away(root, upstream, tmp_path / "attic")
    try:
        np.testing.assert_array_equal(btx_jax.load_pretrained(out).logits(IDS), before)
    finally:
        put_back(root, upstream, tmp_path / "attic")


def test_missing_link_names_the_chain_and_the_listing_command(btx_chain, tmp_path, capsys):
    root, _, first = btx_chain
    sft_final, router_version = root / "sft" / "final", btx.resolve(root / "router" / "final")
    moved_away(root, ["expert"], tmp_path / "attic")
    try:
        rc = convert.main(["btx-to-btx", str(sft_final), str(tmp_path / "out"), "--self-contained", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and not (tmp_path / "out").exists()
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"{btx.resolve(sft_final)} -> {router_version} -> {root / 'base'} -> {first}" in err
        assert f"btx chain {btx.resolve(sft_final)}" in err and "not found" in err, err
        assert chain.main([str(sft_final)]) == 1
        out = capsys.readouterr().out
        assert f"{first}: MISSING" in out and "digest not checked (a link is missing)" in out
    finally:
        put_back(root, ["expert"], tmp_path / "attic")
