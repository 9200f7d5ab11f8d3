"""PEFT interop: load_pretrained(base, adapter=peft_dir) reproduces PEFT's logits (plain, rsLoRA, rank/alpha
patterns, attention targets), save_pretrained(format="peft") is loaded by PEFT, merge_lora folds into HF, and
bad adapter configs fail with one clear line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import btx_jax
from btx_jax.checkpoint.peft import parse_adapter_config
from conftest import hf_logits, hf_model, random_ids

TOL = 1e-4


def make_peft_adapter(base_dir, out_dir, seed=0, **lora_kwargs):
    """Save a PEFT LoRA adapter with random non-zero A and B on `base_dir`; return (dir, PEFT logits fn)."""
    import peft
    import torch
    torch.manual_seed(seed)
    kw = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"], init_lora_weights=False)
    kw.update(lora_kwargs)
    model = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape))
    model.save_pretrained(str(out_dir))
    return out_dir, model


@pytest.mark.parametrize("case", [
    dict(),
    dict(use_rslora=True, lora_alpha=6),
    dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], rank_pattern={"o_proj": 2, "down_proj": 6},
         alpha_pattern={"v_proj": 3}),
], ids=["plain", "rslora", "patterns_attention"])
def test_peft_adapter_logits_match(hf_llama, tmp_path, case):
    base = hf_llama()
    adapter, model = make_peft_adapter(base, tmp_path / "adapter", **case)
    ids = random_ids(2, 10)
    pre = btx_jax.load_pretrained(base, adapter=adapter)
    diff = np.abs(pre.logits(ids) - hf_logits(model, ids)).max()
    print(f"PEFT {case}: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert np.abs(hf_logits(base, ids) - hf_logits(model, ids)).max() > 1e-2      # the adapter matters


def test_peft_export_round_trip(hf_llama, tmp_path):
    import peft
    base = hf_llama()
    adapter, _ = make_peft_adapter(base, tmp_path / "adapter", use_rslora=True, rank_pattern={"up_proj": 2},
                                   target_modules=["gate_proj", "up_proj", "down_proj", "k_proj"])
    pre = btx_jax.load_pretrained(base, adapter=adapter)
    out = pre.save_pretrained(tmp_path / "exported", format="peft")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ids = random_ids(2, 9, seed=1)
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_model(base), str(out)).eval(), ids)
    diff = np.abs(pre.logits(ids) - theirs).max()
    print(f"PEFT export round trip: max abs diff {diff:.2e}")
    assert diff <= TOL
    again = btx_jax.load_pretrained(base, adapter=out)
    assert again.config == pre.config


def test_merge_lora_into_hf(hf_llama, tmp_path):
    base = hf_llama()
    adapter, model = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    pre = btx_jax.load_pretrained(base, adapter=adapter)
    with pytest.raises(btx_jax.CheckpointError, match="merge_lora=True"):
        pre.save_pretrained(tmp_path / "no", format="hf")
    merged = pre.save_pretrained(tmp_path / "merged", format="hf", merge_lora=True)
    ids = random_ids(1, 8)
    diff = np.abs(hf_logits(merged, ids) - hf_logits(model, ids)).max()
    print(f"merge_lora: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_merged_export_folds_one_layer_at_a_time():
    """A `--merge-lora` export holds one layer's fold at a time, not every folded kernel: the host memory it
    allocates while the tensors stream out (tracemalloc sees numpy's buffers) stays below one target's stacked
    fp32 kernel (the earlier fold of whole [layers, in, out] kernels allocated 3x that per target, and kept
    every folded kernel until the write ended), and the values are those of the whole-kernel fold."""
    import tracemalloc

    from btx_jax.checkpoint.hf import export_tensors
    from btx_jax.checkpoint.peft import folded, merged_kernels
    from btx_jax.config import AdapterSpec, ExpertSpec, LlamaConfig
    from btx_jax.model.lora import expert_columns
    from btx_jax.pretrained import random_source

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=512, num_layers=8, num_heads=4,
                         num_kv_heads=4, head_dim=16,
                         adapter=AdapterSpec(experts=(ExpertSpec(rank=16, alpha=32.0),), router=False))
    flat = {k: np.array(v) for k, v in random_source(config, 0).load(dtype="float32").flat_numpy().items()}
    stacked = flat["layers/mlp/up_proj/kernel"]
    tracemalloc.start()
    try:
        tensors = {}
        for key, t in export_tensors(merged_kernels(flat, config), config.replace(adapter=None), lambda p: True):
            if key == "model.layers.3.mlp.up_proj.weight":
                tensors[key] = t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"merged export: {peak:,} bytes allocated at the peak; one stacked fp32 kernel {stacked.nbytes:,}")
    assert peak < stacked.nbytes
    whole = folded(stacked, flat["layers/mlp/up_proj/lora_a"], flat["layers/mlp/up_proj/lora_b"],
                   expert_columns(config.adapter, "up_proj")[1], np.ones(8, np.float32))
    np.testing.assert_array_equal(tensors["model.layers.3.mlp.up_proj.weight"], whole[3].T)


def test_merge_refuses_moe(hf_llama, tmp_path):
    base = btx_jax.load_pretrained(hf_llama())
    from test_lora import random_lora
    moe = btx_jax.compose(base, [random_lora(base, seed=1), random_lora(base, seed=2)], btx_jax.LoraMoESpec(top_k=1))
    with pytest.raises(btx_jax.CheckpointError, match="not a linear fold"):
        moe.save_pretrained(tmp_path / "m", format="hf", merge_lora=True)
    with pytest.raises(btx_jax.CheckpointError, match="format='mergoo'"):
        moe.save_pretrained(tmp_path / "p", format="peft")
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("target_modules, expected", [
    (["gate_proj", "up_proj"], ("gate_proj", "up_proj")),
    ("{'up_proj', 'gate_proj'}", ("gate_proj", "up_proj")),         # mergoo's str(set)
    (["mlp.down_proj", "self_attn.q_proj"], ("q_proj", "down_proj")),
    (r".*\.(k_proj|v_proj)", ("k_proj", "v_proj")),                  # a regex string
    ("all-linear", btx_jax.config.ALL_TARGETS),
])
def test_target_modules_forms(target_modules, expected):
    _, targets, _ = parse_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": target_modules}, 3, "x")
    assert targets == expected


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ["gate_proj", "c_fc"]}, "'c_fc' does not exist"),
    ({"target_modules": ["layers.0.mlp.gate_proj"]}, "only some layers"),
    ({"rank_pattern": {"layers.1.mlp.gate_proj": 2}}, "different values in different layers"),
    ({"peft_type": "IA3"}, "not LORA"),
])
def test_bad_adapter_config(change, message):
    raw = {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"], **change}
    with pytest.raises(btx_jax.ConfigError, match=message) as e:
        parse_adapter_config(raw, 2, "adapter_config.json")
    assert _one_line(e).startswith("adapter_config.json: ")


def test_bad_adapter_directories(hf_llama, tmp_path):
    base = hf_llama()
    adapter, _ = make_peft_adapter(base, tmp_path / "adapter")
    # no adapter_config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(btx_jax.CheckpointError, match="no adapter_config.json") as e:
        btx_jax.load_pretrained(base, adapter=tmp_path / "empty")
    _one_line(e)
    # an adapter made for a differently shaped base: names the tensor
    other = hf_llama(intermediate_size=64)
    with pytest.raises(btx_jax.CheckpointError, match=r"gate_proj\.lora_B\.weight.*shape") as e:
        btx_jax.load_pretrained(other, adapter=adapter)
    _one_line(e)
    # config and weights disagree (weights for a module the config does not target)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["gate_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(btx_jax.CheckpointError, match="up_proj.lora_A.weight") as e:
        btx_jax.load_pretrained(base, adapter=bad)
    _one_line(e)
    # the adapter dir given as the model
    with pytest.raises(btx_jax.CheckpointError, match="adapter="):
        btx_jax.load_pretrained(adapter)


def test_btx_expert_lora_is_read_once_per_placement_and_not_kept(hf_llama, tmp_path, monkeypatch):
    """Experts' LoRA from btx checkpoints, composed into a LoRA-MoE source and loaded over 8 devices: each stored
    leaf is restored once (not once per device) and no host copy outlives the load, though the source (which
    the trainer holds for the whole run) is still alive; the result is the in-memory composition's."""
    import gc
    import weakref

    from btx_jax import mesh as mesh_lib
    from btx_jax.checkpoint import btx
    from btx_jax.mix.compose import LoraMoESpec, compose_source
    from btx_jax.pretrained import load_pretrained, memory_source
    from btx_jax.train.model_init import lora_spec, with_fresh_lora

    base_dir = hf_llama(vocab_size=256)
    base = load_pretrained(base_dir)
    experts = []
    for i in range(2):
        with_fresh_lora(memory_source(base), lora_spec({"rank": 8, "alpha": 8.0}), seed=i).load() \
            .save_pretrained(tmp_path / f"e{i}", format="btx")
        experts.append(str(tmp_path / f"e{i}"))
    restored, real = [], btx.restore

    def recording(directory, target):
        out = real(directory, target)
        restored.extend((str(directory), path, weakref.ref(a)) for path, a in out.items() if "lora_" in path)
        return out
    monkeypatch.setattr(btx, "restore", recording)
    src = compose_source(base_dir, experts, LoraMoESpec(top_k=1))
    mesh = mesh_lib.make_mesh({"fsdp": -1})
    assert mesh.devices.size == 8
    loaded = src.load(mesh=mesh)
    gc.collect()
    keys = [(d, p) for d, p, _ in restored]
    n_leaves = sum(1 for p in btx.stored_shapes(experts[0]) if "lora_" in p)
    assert n_leaves and len(keys) == len(set(keys)) == len(experts) * n_leaves
    assert all(ref() is None for _, _, ref in restored), "a host copy of an expert's LoRA is still alive"
    ids = random_ids(1, 8, vocab=256)
    np.testing.assert_allclose(loaded.logits(ids),
                               compose_source(base, experts, LoraMoESpec(top_k=1)).load().logits(ids),
                               atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_directories_get_the_mode_the_umask_gives(hf_llama, tmp_path, umask):
    """Exports are written into a temporary directory that is renamed into place: it has the umask's mode
    (0755 under 022), not mkdtemp's 0700, which locked everyone else out of shared exports."""
    import os
    import stat

    from btx_jax.pretrained import memory_source
    from btx_jax.train.model_init import lora_spec, with_fresh_lora

    pre = with_fresh_lora(memory_source(btx_jax.load_pretrained(hf_llama())), lora_spec({"rank": 4, "alpha": 8.0}),
                          seed=0).load()
    old = os.umask(umask)
    try:
        for fmt, kw in (("peft", {}), ("hf", {"merge_lora": True}), ("btx", {})):
            out = pre.save_pretrained(tmp_path / f"{fmt}-{umask:o}", format=fmt, **kw)
            assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, fmt
    finally:
        os.umask(old)


def test_lora_merge_costs_about_one_matmul_per_layer():
    """Folding a LoRA at the seed's rank (r=640) into its kernels (what `--merge-lora` exports run per target)
    takes at most 2x one [in, r] @ [r, out] matmul per layer, timed side by side in this process (the earlier
    einsum took ~70x)."""
    import time

    from btx_jax.checkpoint.peft import folded

    rng = np.random.default_rng(0)
    layers, d_in, d_out, r = 2, 1024, 2816, 640
    kernel = rng.standard_normal((layers, d_in, d_out), np.float32)
    a = rng.standard_normal((layers, d_in, r), np.float32)
    b = rng.standard_normal((layers, r, d_out), np.float32)
    routed, scale_R = np.ones(layers, np.float32), np.full(r, 32 / 640, np.float32)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return min(times)

    fold, matmul = [], []
    for _ in range(2):                  # interleaved, so that the machine's load hits both alike
        fold.append(best(lambda: folded(kernel, a, b, scale_R, routed)))
        matmul.append(best(lambda: np.matmul(a, b)))
    assert min(fold) <= 2 * min(matmul), (fold, matmul)
