"""The Flax Llama against transformers' PyTorch LlamaForCausalLM, config.json variants, segment ids, and the
parameter path table."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import btx_jax
from btx_jax import param_paths
from btx_jax.config import ALL_TARGETS, AdapterSpec, ExpertSpec, LlamaConfig, MoESpec
from btx_jax.model import abstract_params
from conftest import LLAMA3_ROPE, hf_logits, random_ids, write_config

# name -> transformers.LlamaConfig overrides of TINY_LLAMA (hidden 48, 4 heads, 2 layers, vocab 128).
PARITY_CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4, head_dim=None),                    # head_dim = 48 / 4
    "gqa_tied_llama3": dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                            rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mqa_linear_rope": dict(num_key_value_heads=1, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gqa_untied_default_rope": dict(num_key_value_heads=2, head_dim=24, rope_theta=1000.0),
}
SEQ = 24        # > llama3's original_max_position_embeddings (16): every frequency band is exercised


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers_fp32(hf_llama, name):
    directory = hf_llama(**PARITY_CONFIGS[name])
    ids = random_ids(2, SEQ, seed=1)
    ref = hf_logits(directory, ids)
    pre = btx_jax.load_pretrained(directory)
    ours = pre.logits(ids)
    diff = float(np.max(np.abs(ours - ref)))
    print(f"{name}: fp32 max|diff| = {diff:.2e} (max|logit| = {np.max(np.abs(ref)):.2f})")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert diff <= 1e-4
    # the config that was read is the one transformers used
    c = pre.config
    assert (c.num_heads, c.num_kv_heads) == (4, PARITY_CONFIGS[name]["num_key_value_heads"])
    assert c.head_dim == (PARITY_CONFIGS[name]["head_dim"] or 12)
    assert c.tie_word_embeddings == PARITY_CONFIGS[name].get("tie_word_embeddings", False)
    assert ("lm_head" in pre.params) != c.tie_word_embeddings


def test_bf16_compute_close_to_fp32(hf_llama):
    directory = hf_llama(**PARITY_CONFIGS["gqa_tied_llama3"])
    ids = random_ids(2, SEQ, seed=1)
    fp32 = btx_jax.load_pretrained(directory).logits(ids)
    pre16 = btx_jax.load_pretrained(directory, dtype=jnp.bfloat16)
    assert pre16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(pre16.params))
    bf16 = pre16.logits(ids)
    assert bf16.dtype == np.float32
    scale = float(np.max(np.abs(fp32)))
    diff = float(np.max(np.abs(bf16 - fp32)))
    print(f"bf16 vs fp32: max|diff| = {diff:.3e}, max|logit| = {scale:.2f}, relative {diff / scale:.2e}")
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.4%); a few roundings through 2 layers stay within ~3% of the
    # logit scale, while any real bug (wrong dtype path, overflow) is O(100%).
    assert diff <= 0.03 * scale
    # the prediction itself barely moves
    assert np.mean(np.argmax(bf16, -1) == np.argmax(fp32, -1)) >= 0.9


# ---- config.json variants ----

LLAMA2_HUB = {   # meta-llama/Llama-2-7b-hf style, shrunk
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 48, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 4096, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
    "use_cache": True, "vocab_size": 128,
}
LLAMA31_HUB = {  # meta-llama/Llama-3.1-8B-Instruct style, shrunk (rope_theta + rope_scaling at top level)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 48, "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "head_dim": 24, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LINEAR_OLD = {**LLAMA2_HUB, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 20000.0}


def _to_rope_parameters(classic: dict) -> dict:
    """The transformers-5 spelling of a classic config: rope_theta/rope_scaling folded into rope_parameters."""
    new = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    scaling = dict(classic.get("rope_scaling") or {"rope_type": "default"})
    if "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    new["rope_parameters"] = {**scaling, "rope_theta": classic.get("rope_theta", 10000.0)}
    return new


@pytest.mark.parametrize("classic", [LLAMA2_HUB, LLAMA31_HUB, LINEAR_OLD], ids=["llama2", "llama3.1", "linear_type"])
def test_classic_and_rope_parameters_configs_agree(classic):
    import transformers
    ours_classic = LlamaConfig.from_hf(classic)
    ours_new = LlamaConfig.from_hf(_to_rope_parameters(classic))
    assert ours_classic == ours_new
    # ... and both agree with how transformers itself reads the classic file
    theirs = transformers.LlamaConfig.from_dict(classic).rope_parameters
    assert ours_classic.rope_theta == theirs["rope_theta"]
    if theirs.get("rope_type", "default") == "default":
        assert ours_classic.rope_scaling is None
    else:
        expected = {k: v for k, v in theirs.items() if k not in ("rope_theta", "type")}   # legacy alias
        assert ours_classic.rope_scaling_dict == expected
    # export -> import is the identity on LlamaConfig
    assert LlamaConfig.from_hf(ours_classic.to_hf()) == ours_classic


def test_llama31_hub_config_fields():
    c = LlamaConfig.from_hf(LLAMA31_HUB)
    assert (c.vocab_size, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (128256, 48, 4, 2, 24)
    assert c.rope_theta == 500000.0 and c.tie_word_embeddings
    assert c.rope_scaling_dict == {**LLAMA31_HUB["rope_scaling"]}
    assert c.eos_token_id == (128001, 128008, 128009)
    assert c.to_hf()["eos_token_id"] == [128001, 128008, 128009]
    c2 = LlamaConfig.from_hf(LLAMA2_HUB)
    assert c2.head_dim == 12 and c2.rope_theta == 10000.0 and c2.rope_scaling is None and c2.num_kv_heads == 4


@pytest.mark.parametrize("change, needle", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"), ({"hidden_size": None}, "hidden_size"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
], ids=["attention_bias", "mlp_bias", "gelu", "yarn_rope", "heads_not_multiple", "missing_key", "mistral"])
def test_unsupported_config_is_refused(change, needle):
    hf = {k: v for k, v in {**LLAMA2_HUB, **change}.items() if v is not None}
    with pytest.raises(btx_jax.ConfigError, match=needle) as info:
        LlamaConfig.from_hf(hf, source="some/dir/config.json")
    assert str(info.value).startswith("some/dir/config.json: ")


def test_classic_config_file_loads_same_model(hf_llama, tmp_path):
    """A checkpoint whose config.json is hand-written in the Llama 3.x hub style gives the same config and
    logits as the transformers-5 file, and as transformers on the classic file."""
    src = hf_llama(**PARITY_CONFIGS["gqa_tied_llama3"])
    new_style = json.loads((src / "config.json").read_text())
    assert "rope_parameters" in new_style
    classic = {k: v for k, v in new_style.items() if k != "rope_parameters"}
    classic["rope_theta"] = new_style["rope_parameters"]["rope_theta"]
    classic["rope_scaling"] = {k: v for k, v in new_style["rope_parameters"].items() if k != "rope_theta"}
    dst = tmp_path / "classic"
    shutil.copytree(src, dst)
    write_config(dst, classic)
    a, b = btx_jax.load_pretrained(src), btx_jax.load_pretrained(dst)
    assert a.config == b.config
    ids = random_ids(1, SEQ, seed=3)
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    assert np.max(np.abs(b.logits(ids) - hf_logits(dst, ids))) <= 1e-4


# ---- segment ids (packed rows) ----

def test_packed_segments_equal_separate_documents(hf_llama):
    pre = btx_jax.load_pretrained(hf_llama(**PARITY_CONFIGS["gqa_tied_llama3"]))
    model = pre.model()
    apply = jax.jit(lambda ids, pos=None, seg=None: model.apply({"params": pre.params}, ids, pos, seg))
    lengths = [7, 5, 4]
    total = sum(lengths)
    docs = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = np.concatenate(docs)[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    packed = np.asarray(apply(ids, positions, segments))
    # each document alone, one per row, starting at position 0 (trailing filler cannot reach back: causal)
    alone_ids = np.zeros((len(docs), total), np.int32)
    for row, doc in enumerate(docs):
        alone_ids[row, :len(doc)] = doc
    alone = np.asarray(apply(alone_ids))
    start = 0
    for row, n in enumerate(lengths):
        diff = np.max(np.abs(packed[0, start:start + n] - alone[row, :n]))
        assert diff <= 1e-5, f"document {row + 1}: max|diff| {diff}"
        start += n
    # without segment ids the later documents do see the earlier ones
    unpacked = np.asarray(apply(ids, positions, np.ones_like(segments)))
    assert np.max(np.abs(unpacked[0, lengths[0]:] - packed[0, lengths[0]:])) > 1e-2


# ---- parameter path table ----

def _variants():
    base = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    lora = base.replace(adapter=AdapterSpec(targets=ALL_TARGETS, experts=(ExpertSpec(rank=4, alpha=8.0),)))
    moe = base.replace(adapter=AdapterSpec(
        targets=ALL_TARGETS, experts=(ExpertSpec(rank=4, alpha=8.0), ExpertSpec(rank=2, alpha=4.0)),
        router=True, top_k=2, seed_expert=True))
    return {"base": base, "base_tied": base.replace(tie_word_embeddings=True), "lora_all_targets": lora,
            "lora_moe_seed_expert": moe, "ffn_moe": base.replace(moe=MoESpec(num_experts=3, top_k=2))}


@pytest.mark.parametrize("name", ["base", "base_tied", "lora_all_targets", "lora_moe_seed_expert", "ffn_moe"])
def test_param_table_covers_every_leaf(name):
    config = _variants()[name]
    flat = param_paths.flatten(abstract_params(config))
    used = set()
    for path, leaf in flat.items():
        rules = param_paths.matching_rules(path)
        assert len(rules) == 1, f"{path} matches {len(rules)} rules"
        assert len(rules[0].axes) == leaf.ndim, f"{path}: axes {rules[0].axes} vs shape {leaf.shape}"
        used.add(rules[0].pattern)
        # every leaf maps to HF tensor names (one per layer for stacked leaves)
        experts = config.moe.num_experts if config.moe else 0
        keys = list(param_paths.hf_keys(path, config.num_layers, experts))
        per_layer = experts if "expert" in rules[0].axes else 1        # FFN-MoE: one HF tensor per expert
        assert len(keys) == (config.num_layers * per_layer if rules[0].axes[0] == "layers" else 1)
        assert len({k for _, k in keys}) == len(keys)
    n_targets = len(ALL_TARGETS)
    expected = {"base": 5 + n_targets, "base_tied": 4 + n_targets, "lora_all_targets": 5 + 3 * n_targets,
                "lora_moe_seed_expert": 5 + 4 * n_targets, "ffn_moe": 5 + 4 + 4}[name]
    assert len(flat) == expected
    if name == "lora_moe_seed_expert":   # router has one output per LoRA expert + the seed expert
        assert flat["layers/mlp/down_proj/router"].shape == (2, 64, 3)
        assert flat["layers/attn/q_proj/lora_a"].shape == (2, 32, 6)
    # logical_axes works on the whole tree
    axes = param_paths.logical_axes(abstract_params(config))
    assert jax.tree_util.tree_structure(axes, is_leaf=lambda x: isinstance(x, tuple)).num_leaves == len(flat)
