"""btx_jax.mix.compose: experts (PEFT dirs, btx LoRA checkpoints, Pretrained) -> LoRA-MoE; router init, router_layers,
and bad input (one clear line each).  The scripts/compose.py CLI: test_compose_cli.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

import btx_jax
from conftest import random_ids
from test_lora import random_lora


@pytest.fixture(scope="module")
def setup(hf_llama, tmp_path_factory):
    """(base dir, base Pretrained, [expert Pretrained], [expert PEFT dirs])."""
    base_dir = hf_llama()
    base = btx_jax.load_pretrained(base_dir)
    root = tmp_path_factory.mktemp("experts")
    experts = [random_lora(base, rank=2 + i, alpha=4.0 + i, seed=10 + i) for i in range(3)]
    dirs = [e.save_pretrained(root / f"e{i}", format="peft") for i, e in enumerate(experts)]
    return base_dir, base, experts, dirs


def test_single_expert_top1_equals_lora(setup):
    base_dir, base, experts, dirs = setup
    ids = random_ids(2, 8)
    for source in (dirs[1], experts[1]):
        moe = btx_jax.compose(base_dir, [source], btx_jax.LoraMoESpec(top_k=1))
        assert np.abs(moe.logits(ids) - experts[1].logits(ids)).max() <= 1e-5


def test_compose_sources_agree(setup, tmp_path):
    base_dir, base, experts, dirs = setup
    btx_dir = experts[2].save_pretrained(tmp_path / "btx_lora", format="btx")
    a = btx_jax.compose(base_dir, dirs, btx_jax.LoraMoESpec(top_k=2, router_seed=5))
    b = btx_jax.compose(base, [experts[0], dirs[1], btx_dir], btx_jax.LoraMoESpec(top_k=2, router_seed=5))
    assert a.config == b.config
    assert a.config.adapter.ranks("gate_proj") == (2, 3, 4)
    fa, fb = a.flat_numpy(), b.flat_numpy()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert fa["layers/mlp/gate_proj/lora_a"].shape == (2, 48, 9)


def test_router_init(setup):
    base_dir, base, experts, _ = setup
    zeros = btx_jax.compose(base, experts, btx_jax.LoraMoESpec(top_k=2, router_init="zeros")).flat_numpy()
    assert not zeros["layers/mlp/up_proj/router"].any()
    normal = btx_jax.compose(base, experts, btx_jax.LoraMoESpec(top_k=2, router_init="normal",
                                                         router_seed=1)).flat_numpy()
    assert 0.015 < normal["layers/mlp/up_proj/router"].std() < 0.025
    # zero router: ties -> experts 0 and 1 at 1/2 each for every token (documented), expert 2 unused
    moe = btx_jax.compose(base, experts, btx_jax.LoraMoESpec(top_k=2, router_init="zeros"))
    two = btx_jax.compose(base, experts[:2], btx_jax.LoraMoESpec(top_k=2, router_init="zeros"))
    ids = random_ids(1, 6)
    assert np.abs(moe.logits(ids) - two.logits(ids)).max() <= 1e-5


def test_router_layers_subset_matches_masked_lora(setup):
    base_dir, base, experts, _ = setup
    moe = btx_jax.compose(base, [experts[0]], btx_jax.LoraMoESpec(top_k=1, router_layers=[1]))
    assert moe.config.adapter.router_layers == (1,)
    flat = experts[0].flat_numpy()
    for k in flat:
        if k.endswith("lora_b"):
            flat[k] = flat[k].copy()
            flat[k][0] = 0.0
    ref = btx_jax.Pretrained.from_arrays(experts[0].config, flat)
    ids = random_ids(2, 6, seed=4)
    assert np.abs(moe.logits(ids) - ref.logits(ids)).max() <= 1e-5


def test_seed_expert(setup):
    _, base, experts, _ = setup
    moe = btx_jax.compose(base, experts[:2], btx_jax.LoraMoESpec(top_k=3, seed_expert=True))
    assert moe.config.adapter.num_choices == 3
    assert moe.flat_numpy()["layers/mlp/gate_proj/router"].shape == (2, 48, 3)
    assert np.isfinite(moe.logits(random_ids(1, 4))).all()


def _line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input(setup, hf_llama, tmp_path):
    base_dir, base, experts, dirs = setup
    with pytest.raises(btx_jax.ConfigError, match=r"top_k=4 must be between 1 and the number of experts \(3\)") as e:
        btx_jax.compose(base_dir, dirs, btx_jax.LoraMoESpec(top_k=4))
    _line(e)
    # expert for a differently shaped base
    other = btx_jax.load_pretrained(hf_llama(hidden_size=32, head_dim=8))
    wrong = random_lora(other, seed=3).save_pretrained(tmp_path / "wrong", format="peft")
    with pytest.raises(btx_jax.CheckpointError, match=rf"{tmp_path / 'wrong'}.*lora_A\.weight.*shape") as e:
        btx_jax.compose(base_dir, [dirs[0], wrong], btx_jax.LoraMoESpec(top_k=1))
    _line(e)
    with pytest.raises(btx_jax.ConfigError, match="hidden_size=32 does not match") as e:
        btx_jax.compose(base, [experts[0], random_lora(other)], btx_jax.LoraMoESpec(top_k=1))
    _line(e)
    # mismatched target modules
    attn = random_lora(base, targets=("q_proj", "v_proj"), seed=4).save_pretrained(tmp_path / "attn", format="peft")
    with pytest.raises(btx_jax.ConfigError, match=r"attn: targets \['q_proj', 'v_proj'\] differ") as e:
        btx_jax.compose(base_dir, [dirs[0], attn], btx_jax.LoraMoESpec(top_k=1))
    _line(e)
    # a target module the model does not have
    bad = tmp_path / "bad_target"
    bad.mkdir()
    cfg = json.loads((dirs[0] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["gate_proj", "fc1"]}))
    with pytest.raises(btx_jax.ConfigError, match="'fc1' does not exist") as e:
        btx_jax.compose(base_dir, [dirs[0], bad], btx_jax.LoraMoESpec(top_k=1))
    assert _line(e).startswith(str(bad))
    # no adapter_config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(btx_jax.CheckpointError, match="no adapter_config.json") as e:
        btx_jax.compose(base_dir, [tmp_path / "empty"], btx_jax.LoraMoESpec(top_k=1))
    _line(e)
    with pytest.raises(btx_jax.ConfigError, match="compose needs at least one expert"):
        btx_jax.compose(base_dir, [])
    with pytest.raises(btx_jax.ConfigError, match=r"router_layers \[5\] out of range for 2 layers"):
        btx_jax.compose(base, [experts[0]], btx_jax.LoraMoESpec(top_k=1, router_layers=[5]))
    with pytest.raises(btx_jax.ConfigError, match="already has an adapter"):
        btx_jax.compose(experts[0], dirs, btx_jax.LoraMoESpec(top_k=1))


@pytest.mark.parametrize("cls, field, value, needle", [
    (btx_jax.LoraMoESpec, "top_k", 0, "top_k=0: must be an integer >= 1"),
    (btx_jax.LoraMoESpec, "top_k", 1.5, "top_k=1.5: must be an integer >= 1"),
    (btx_jax.LoraMoESpec, "router_init", "uniform", "router_init='uniform': must be one of zeros, normal"),
    (btx_jax.LoraMoESpec, "router_std", -1.0, "router_std=-1.0: must be a finite number >= 0"),
    (btx_jax.LoraMoESpec, "router_seed", -1, "router_seed=-1: must be an integer >= 0"),
    (btx_jax.LoraMoESpec, "router_layers", "0,1", "router_layers='0,1': must be a list of layer indices"),
    (btx_jax.LoraMoESpec, "allow_other_base", "yes", "allow_other_base='yes': must be true or false"),
    (btx_jax.FfnMoESpec, "shared", "mean", "shared='mean': must be one of average, seed"),
    (btx_jax.FfnMoESpec, "max_drift", 0, "max_drift=0: must be a number > 0"),
])
def test_spec_checks_every_field(cls, field, value, needle):
    with pytest.raises(btx_jax.ConfigError) as e:
        cls(**{field: value})
    assert _line(e).startswith(needle), _line(e)


def test_make_spec_names_the_option():
    from btx_jax.mix.compose import make_spec
    assert make_spec("lora", {"router_layers": [3, 1, 1]}).router_layers == (1, 3)
    assert make_spec("ffn", {"shared": "seed", "router_seed": 4}) == btx_jax.FfnMoESpec(shared="seed", router_seed=4)
    flag = lambda field: "--" + field.replace("_", "-")  # noqa: E731
    for mode, options, needle in [
            ("ffn", {"router_layers": [0]}, "--router-layers: not an option of mode 'ffn' (only of mode 'lora')"),
            ("ffn", {"allow_other_base": True}, "--allow-other-base: not an option of mode 'ffn' (only of mode 'lora')"),
            ("lora", {"shared": "seed"}, "--shared: not an option of mode 'lora' (only of mode 'ffn')"),
            ("lora", {"topk": 2}, "--topk: not an option of mode 'lora' (its options: top_k, "),
            ("lora", {"top_k": -2}, "--top-k=-2: must be an integer >= 1"),
            ("moe", {}, "--mode='moe': must be one of lora, ffn")]:
        with pytest.raises(btx_jax.ConfigError) as e:
            make_spec(mode, options, flag)
        assert _line(e).startswith(needle), _line(e)


def test_the_package_exports_the_function_and_the_module_keeps_its_name():
    """btx_jax.compose is the function (of the module btx_jax.mix.compose); inside the package nothing imports it
    through the package's attribute."""
    import ast
    import sys
    from pathlib import Path
    assert callable(btx_jax.compose) and sys.modules["btx_jax.mix.compose"].compose is btx_jax.compose
    through_attribute = []
    for path in Path(btx_jax.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "btx_jax" and \
                    any(a.name == "compose" for a in node.names) and path.name != "__init__.py":
                through_attribute.append(str(path))
            if isinstance(node, ast.Import) and any(a.name == "btx_jax.mix.compose" and a.asname for a in node.names):
                through_attribute.append(str(path))
    assert not through_attribute


def test_model_compose_config_makes_the_spec(setup):
    """The router phase's model.compose.* make the mode's spec: router_seed defaults to the run's seed and
    an option of the other mode is refused, named by its config key."""
    from btx_jax.train.model_init import initial_source
    base_dir, base, _, dirs = setup
    src = initial_source({"init": str(base_dir), "compose": {"experts": [str(d) for d in dirs], "top_k": 2}}, 5)
    want = btx_jax.compose(base_dir, dirs, btx_jax.LoraMoESpec(top_k=2, router_seed=5)).flat_numpy()
    got = src.load().flat_numpy()
    assert np.array_equal(got["layers/mlp/up_proj/router"], want["layers/mlp/up_proj/router"])
    for compose_cfg, needle in [({"mode": "ffn", "router_layers": [0]},
                                 "model.compose.router_layers: not an option of mode 'ffn' (only of mode 'lora')"),
                                ({"top_k": 0}, "model.compose.top_k=0: must be an integer >= 1"),
                                ({"experts": []}, "model.compose.experts: needs at least one expert directory")]:
        with pytest.raises(btx_jax.ConfigError) as e:
            initial_source({"init": str(base_dir), "compose": {"experts": [str(dirs[0])], **compose_cfg}}, 0)
        assert _line(e).startswith(needle), _line(e)
