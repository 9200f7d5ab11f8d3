"""Hugging Face Mixtral interop (btx_jax/checkpoint/mixtral.py): exported FFN-MoE logits equal transformers'
MixtralForCausalLM (GQA, several expert counts and top-k), Mixtral -> btx -> Mixtral is bit-exact, bad input is
one line + exit 2 with nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import btx_jax
from btx_jax.config import LlamaConfig, MoESpec
from btx_jax.model import init_params
from btx_jax.pretrained import Pretrained
from conftest import random_ids, safetensors_dict

TOL = 1e-4
ARCH = dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=12, rms_norm_eps=1e-5, max_position_embeddings=256)


def random_moe(num_experts: int, top_k: int, seed: int = 0, **arch) -> Pretrained:
    """A random FFN-MoE with routers scaled up so tokens are routed decisively (distinct experts per token)."""
    import jax
    config = LlamaConfig(**{**ARCH, **arch}, moe=MoESpec(num_experts, top_k))
    params = init_params(config, jax.random.PRNGKey(seed))
    params["layers"]["moe"]["router"]["kernel"] = params["layers"]["moe"]["router"]["kernel"] * 50.0
    return Pretrained(config, params)


def torch_mixtral(path):
    import torch
    import transformers
    return transformers.MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def torch_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("num_experts,top_k,arch", [
    (4, 2, {}),
    (3, 1, {"num_kv_heads": 1}),
    (5, 3, {"num_kv_heads": 4, "tie_word_embeddings": True}),
])
def test_exported_mixtral_logits_match_transformers(tmp_path, num_experts, top_k, arch):
    moe = random_moe(num_experts, top_k, **arch)
    out = moe.save_pretrained(tmp_path / "mixtral", format="mixtral")
    raw = json.loads((out / "config.json").read_text())
    assert (raw["architectures"], raw["num_local_experts"], raw["num_experts_per_tok"]) == (
        ["MixtralForCausalLM"], num_experts, top_k)
    ids = random_ids(2, 24)
    ref = torch_logits(torch_mixtral(out), ids)
    d = float(np.abs(moe.logits(ids) - ref).max())
    print(f"E={num_experts} k={top_k} {arch}: max |btx - transformers| = {d:.2e}")
    assert d <= TOL
    assert np.abs(ref).max() > 0.1          # the comparison is not between two near-zero outputs


def test_transformers_mixtral_round_trips_bit_exactly(tmp_path):
    import torch
    import transformers
    hf_cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "src")
    pre = btx_jax.load_pretrained(tmp_path / "src")
    assert pre.config.moe == MoESpec(num_experts=3, top_k=2)
    assert pre.config.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    ids = random_ids(2, 16, vocab=96)
    assert float(np.abs(pre.logits(ids) - torch_logits(model, ids)).max()) <= TOL
    pre.save_pretrained(tmp_path / "btx", format="btx")
    again = btx_jax.load_pretrained(tmp_path / "btx")
    again.save_pretrained(tmp_path / "dst", format="mixtral")
    src, dst = safetensors_dict(tmp_path / "src"), safetensors_dict(tmp_path / "dst")
    assert sorted(src) == sorted(dst)
    assert any(".block_sparse_moe.experts.2.w2." in k for k in src)
    for k in src:
        assert src[k].dtype == dst[k].dtype and np.array_equal(src[k], dst[k]), k
    assert btx_jax.load_pretrained(tmp_path / "dst").config == pre.config


def _expect_exit_2(convert_script, capsys, argv, needle, dst):
    assert convert_script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not dst.exists()


def test_bad_mixtral_input_is_one_line_and_exit_2(tmp_path, convert_script, capsys):
    moe = random_moe(3, 2)
    src = moe.save_pretrained(tmp_path / "src", format="mixtral")
    tensors = load_file(str(src / "model.safetensors"))
    missing = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del tensors[missing]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _expect_exit_2(convert_script, capsys, ["mixtral-to-btx", str(src), str(tmp_path / "a")], missing,
                   tmp_path / "a")
    bad = tmp_path / "window"
    shutil.copytree(moe.save_pretrained(tmp_path / "ok", format="mixtral"), bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "sliding_window": 16}))
    _expect_exit_2(convert_script, capsys, ["mixtral-to-btx", str(bad), str(tmp_path / "b")], "sliding_window",
                   tmp_path / "b")
    (bad / "config.json").write_text(json.dumps({**raw, "num_experts_per_tok": 4}))
    _expect_exit_2(convert_script, capsys, ["mixtral-to-btx", str(bad), str(tmp_path / "c")], "top_k=4",
                   tmp_path / "c")
    moe.save_pretrained(tmp_path / "btx", format="btx")
    assert convert_script.main(["btx-to-mixtral", str(tmp_path / "btx"), str(tmp_path / "d")]) == 0
    assert np.array_equal(btx_jax.load_pretrained(tmp_path / "d").logits(random_ids(1, 8)),
                          moe.logits(random_ids(1, 8)))
    with pytest.raises(btx_jax.CheckpointError, match="format='mixtral'"):
        moe.save_pretrained(tmp_path / "e", format="hf")
    assert not (tmp_path / "e").exists()
