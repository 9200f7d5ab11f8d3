"""mergoo LoRA-MoE interop: the shared reference fixture (mergoo 0.0.10's own logits), export round trips,
router_layers_index subsets, routers on down_proj, missing gates, seed expert refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import btx_jax
from btx_jax.checkpoint.mergoo import MERGOO_KEYS
from conftest import random_ids, safetensors_dict
from test_lora import random_lora

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mergoo_top2_of3"
TOL = 1e-4
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"{FIXTURE} not present (the shared/ folder "
                                   "comes with CI, not with the repository)")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE / "ref.npz"))


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@needs_fixture
def test_fixture_moe_matches_mergoo(ref):
    moe = btx_jax.load_pretrained(FIXTURE / "moe")
    spec = moe.config.adapter
    assert (len(spec.experts), spec.top_k, spec.targets, spec.router_layers) == (3, 2, ("gate_proj", "up_proj"), None)
    d = _diff(moe.logits(ref["input_ids"]), ref["logits"])
    print(f"mergoo fixture LoRA-MoE logits: max abs diff {d:.2e}")
    assert d <= TOL


@needs_fixture
def test_fixture_base_and_each_expert(ref):
    d = _diff(btx_jax.load_pretrained(FIXTURE / "base").logits(ref["input_ids"]), ref["base_logits"])
    print(f"fixture base logits: max abs diff {d:.2e}")
    assert d <= TOL
    for i in range(3):
        pre = btx_jax.load_pretrained(FIXTURE / "base", adapter=FIXTURE / f"expert{i}")
        d = _diff(pre.logits(ref["input_ids"]), ref[f"expert{i}_logits"])
        print(f"fixture expert{i} (PEFT) logits: max abs diff {d:.2e}")
        assert d <= TOL


@needs_fixture
def test_fixture_compose_then_copy_routers(ref):
    composed = btx_jax.compose(FIXTURE / "base", [FIXTURE / f"expert{i}" for i in range(3)],
                               btx_jax.LoraMoESpec(top_k=2))
    mergoo = btx_jax.load_pretrained(FIXTURE / "moe")
    assert composed.config == mergoo.config
    flat, theirs = composed.flat_numpy(), mergoo.flat_numpy()
    assert set(flat) == set(theirs)
    assert all(np.array_equal(flat[k], theirs[k]) for k in flat if not k.endswith("/router"))
    flat.update({k: v for k, v in theirs.items() if k.endswith("/router")})
    logits = btx_jax.Pretrained.from_arrays(composed.config, flat).logits(ref["input_ids"])
    assert np.array_equal(logits, mergoo.logits(ref["input_ids"]))
    print(f"compose + mergoo routers: max abs diff vs mergoo {_diff(logits, ref['logits']):.2e}")


@needs_fixture
def test_fixture_export_same_layout(tmp_path, ref):
    moe = btx_jax.load_pretrained(FIXTURE / "moe")
    out = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    ours, theirs = json.loads((out / "config.json").read_text()), json.loads((FIXTURE / "moe/config.json").read_text())
    for key in MERGOO_KEYS:
        if key != "adapter_configs":
            assert ours[key] == theirs[key], key
    for a, b in zip(ours["adapter_configs"], theirs["adapter_configs"]):
        assert {k: a[k] for k in ("r", "lora_alpha", "use_rslora", "lora_dropout", "use_dora")} == \
               {k: b[k] for k in ("r", "lora_alpha", "use_rslora", "lora_dropout", "use_dora")}
    mine, ref_tensors = safetensors_dict(out), safetensors_dict(FIXTURE / "moe")
    assert set(mine) == set(ref_tensors)
    assert all(np.array_equal(mine[k], ref_tensors[k]) for k in mine)
    assert _diff(btx_jax.load_pretrained(out).logits(ref["input_ids"]), ref["logits"]) <= TOL


@pytest.fixture(scope="module")
def tiny_base(hf_llama):
    return btx_jax.load_pretrained(hf_llama())


def _experts(base, targets=("gate_proj", "up_proj", "down_proj")):
    return [random_lora(base, rank=2, alpha=4.0, targets=targets, seed=1),
            random_lora(base, rank=3, alpha=3.0, targets=targets, seed=2, rslora=True),
            random_lora(base, rank=4, alpha=8.0, targets=targets, seed=3, rank_pattern=(("up_proj", 1),))]


def test_mergoo_round_trip_with_down_proj(tiny_base, tmp_path):
    moe = btx_jax.compose(tiny_base, _experts(tiny_base), btx_jax.LoraMoESpec(top_k=2, router_seed=3))
    out = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    cfg = json.loads((out / "config.json").read_text())
    assert set(MERGOO_KEYS) <= set(cfg)
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["router_layers"], cfg["router_layers_index"]) == \
           (3, 2, ["gate_proj", "up_proj", "down_proj"], [0, 1])
    assert [c["r"] for c in cfg["adapter_configs"]] == [2, 3, 4]
    tensors = safetensors_dict(out)
    c = moe.config
    # the router sits on the layer's own input width: [E, intermediate] for down_proj (stock mergoo: hidden)
    assert tensors["model.layers.0.mlp.down_proj.gate.weight"].shape == (3, c.intermediate_size)
    assert tensors["model.layers.1.mlp.up_proj.lora_A.2.weight"].shape == (1, c.hidden_size)
    assert "model.layers.0.mlp.gate_proj.base_layer.weight" in tensors
    assert "model.layers.0.mlp.gate_proj.weight" not in tensors
    back = btx_jax.load_pretrained(out)
    assert back.config == moe.config
    ids = random_ids(2, 7)
    d = _diff(back.logits(ids), moe.logits(ids))
    print(f"mergoo export round trip: max abs diff {d:.2e}")
    assert d == 0.0


def test_router_layers_subset(tiny_base, tmp_path):
    moe = btx_jax.compose(tiny_base, _experts(tiny_base)[:2],
                          btx_jax.LoraMoESpec(top_k=1, router_layers=[1], router_seed=1))
    flat = moe.flat_numpy()
    assert not flat["layers/mlp/gate_proj/lora_a"][0].any() and not flat["layers/mlp/down_proj/router"][0].any()
    out = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["router_layers_index"] == [1]
    tensors = safetensors_dict(out)
    layer0 = sorted(k for k in tensors if k.startswith("model.layers.0.mlp."))
    assert layer0 == [f"model.layers.0.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]
    back = btx_jax.load_pretrained(out)
    ids = random_ids(2, 7, seed=2)
    assert back.config.adapter.router_layers == (1,)
    assert _diff(back.logits(ids), moe.logits(ids)) == 0.0
    # mergoo's own composer writes the PEFT state dict: base_layer + LoRA tensors in unrouted layers too.
    # mergoo's model ignores them there (plain nn.Linear); so does btx_jax.
    stock = tmp_path / "stock"
    stock.mkdir()
    shutil.copy(out / "config.json", stock / "config.json")
    t = dict(tensors)
    rng = np.random.default_rng(0)
    for p in ("gate_proj", "up_proj", "down_proj"):
        t[f"model.layers.0.mlp.{p}.base_layer.weight"] = t.pop(f"model.layers.0.mlp.{p}.weight")
        for e in range(2):
            for ab in ("A", "B"):
                like = t[f"model.layers.1.mlp.{p}.lora_{ab}.{e}.weight"]
                t[f"model.layers.0.mlp.{p}.lora_{ab}.{e}.weight"] = rng.standard_normal(like.shape).astype(np.float32)
    save_file(t, str(stock / "model.safetensors"))
    stock_pre = btx_jax.load_pretrained(stock)
    assert _diff(stock_pre.logits(ids), moe.logits(ids)) == 0.0
    assert not stock_pre.flat_numpy()["layers/mlp/gate_proj/lora_a"][0].any()


def test_missing_gates_are_initialised(tiny_base, tmp_path):
    moe = btx_jax.compose(tiny_base, _experts(tiny_base, ("gate_proj", "up_proj"))[:2], btx_jax.LoraMoESpec(top_k=2))
    out = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    t = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in t.items() if not k.endswith("gate.weight")}, str(out / "model.safetensors"))
    with pytest.warns(UserWarning, match="no router"):
        back = btx_jax.load_pretrained(out)
    router = back.flat_numpy()["layers/mlp/gate_proj/router"]
    assert router.shape == (2, 48, 2) and 0.005 < router.std() < 0.05
    save_file({k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.gate.weight"},
              str(out / "model.safetensors"))
    with pytest.raises(btx_jax.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.gate"):
        btx_jax.load_pretrained(out)


def test_seed_expert_and_plain_lora_refused(tiny_base, tmp_path):
    experts = _experts(tiny_base)[:2]
    moe = btx_jax.compose(tiny_base, experts, btx_jax.LoraMoESpec(top_k=2, seed_expert=True))
    with pytest.raises(btx_jax.CheckpointError, match="seed") as e:
        moe.save_pretrained(tmp_path / "s", format="mergoo")
    assert "\n" not in str(e.value)
    with pytest.raises(btx_jax.CheckpointError, match="format='hf' or 'peft'"):
        experts[0].save_pretrained(tmp_path / "p", format="mergoo")
    assert not (tmp_path / "s").exists()


def test_bad_mergoo_config(tiny_base, tmp_path):
    moe = btx_jax.compose(tiny_base, _experts(tiny_base, ("gate_proj",))[:2], btx_jax.LoraMoESpec(top_k=1))
    out = moe.save_pretrained(tmp_path / "moe", format="mergoo")
    cfg = json.loads((out / "config.json").read_text())
    for change, message in [({"num_experts_per_tok": 3}, "top_k=3"), ({"num_experts": 3}, "num_experts=3"),
                            ({"router_layers": ["c_fc"]}, "'c_fc'")]:
        (out / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(btx_jax.ConfigError, match=message) as e:
            btx_jax.load_pretrained(out)
        assert str(e.value).startswith(str(out / "config.json")) and "\n" not in str(e.value)
