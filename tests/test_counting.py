"""count_params from abstract shapes: the seed's Llama-2-7B BTX configuration (3 experts r=640 on the MLP),
phase masks, router_layers subsets, and agreement with real initialised parameters on a tiny model; the model-FLOPs
counts of the benchmarks against the model's parameter count."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from btx_jax import count_params, param_paths
from btx_jax.config import MLP_TARGETS, AdapterSpec, ExpertSpec, LlamaConfig, MoESpec
from btx_jax.counting import ffn_moe_flops_per_token, leaf_counts, lora_flops_per_token
from btx_jax.model import init_params
from btx_jax.configs.common import ARCHS

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128)
EXPERT = ExpertSpec(rank=640, alpha=32.0)
ROUTER_PHASE = [r"layers/mlp/\w+/router|lm_head"]
SFT_PHASE = [r"embed_tokens|lm_head|final_norm/scale|layers/\w+_norm/scale|layers/attn/\w+/kernel",
             r"layers/mlp/\w+/router"]


def _moe(**kw):
    return LLAMA2_7B.replace(adapter=AdapterSpec(targets=MLP_TARGETS, experts=(EXPERT,) * 3, router=True, top_k=2,
                                                 **kw))


def test_llama2_7b_btx_counts():
    base = count_params(LLAMA2_7B)
    assert base == {"total": 6_738_415_616, "trainable": 6_738_415_616, "frozen": 0}
    lora = count_params(LLAMA2_7B.replace(adapter=AdapterSpec(targets=MLP_TARGETS, experts=(EXPERT,))))
    per_expert = lora["total"] - base["total"]
    # gate/up: 4096*640 + 640*11008; down: 11008*640 + 640*4096; x 32 layers
    assert per_expert == 32 * 3 * (4096 * 640 + 640 * 11008) == 927_989_760          # "928M"
    moe = _moe()
    total = count_params(moe)["total"]
    routers = 32 * 3 * (4096 + 4096 + 11008)            # routers on each projection's own input width
    assert routers == 1_843_200
    assert total == base["total"] + 3 * per_expert + routers == 9_524_228_096      # "9.52B"
    router_phase = count_params(moe, ROUTER_PHASE)
    assert router_phase["trainable"] == routers + 4096 * 32000 == 132_915_200      # "133M"
    assert router_phase["frozen"] == total - router_phase["trainable"]
    sft = count_params(moe, SFT_PHASE)
    attn = 32 * 4 * 4096 * 4096
    norms = 32 * 2 * 4096 + 4096
    assert sft["trainable"] == 2 * 4096 * 32000 + attn + norms + routers == 2_411_737_088     # "2.41B"
    print(f"\nLlama-2-7B: base {base['total']:,}; per expert {per_expert:,}; routers {routers:,}; "
          f"merged {total:,}; router phase {router_phase['trainable']:,}; SFT {sft['trainable']:,}")


def test_router_layers_subset_counts_routed_layers_only():
    full, half = count_params(_moe()), count_params(_moe(router_layers=tuple(range(0, 32, 2))))
    adapter = full["total"] - count_params(LLAMA2_7B)["total"]
    assert half["total"] == count_params(LLAMA2_7B)["total"] + adapter // 2
    assert count_params(_moe(router_layers=(3,)), ROUTER_PHASE)["trainable"] == 1_843_200 // 32 + 4096 * 32000


def test_counts_match_real_params():
    tiny = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                       adapter=AdapterSpec(targets=("q_proj", "down_proj"), experts=(ExpertSpec(2, 4.0),
                                           ExpertSpec(3, 4.0, rank_pattern=(("q_proj", 5),))), router=True,
                                           top_k=1, seed_expert=True))
    params = init_params(tiny, jax.random.PRNGKey(0))
    real = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert count_params(tiny)["total"] == real
    lora = {k: v.size for k, v in param_paths.flatten(params).items() if "lora" in k}
    assert count_params(tiny, [r".*/lora_[ab]"])["trainable"] == sum(lora.values())
    assert count_params(tiny, r"nothing")["trainable"] == 0


def test_llama2_7b_ffn_btx_counts_paper_style():
    """The BTX paper's setup: Llama-2-7B seed + 3 FFN experts, the seed's FFN kept as a 4th expert, top-2."""
    ffn = 32 * 3 * 4096 * 11008                        # one FFN copy over all layers
    counts = count_params(LLAMA2_7B.replace(moe=MoESpec(num_experts=4, top_k=2, seed_expert=True)))
    routers = 32 * 4096 * 4
    assert counts["total"] == 6_738_415_616 + 3 * ffn + routers == 19_724_505_088          # "19.7B"
    assert counts["active"] == counts["total"] - 2 * ffn == 11_067_461_632                  # "11.1B"
    moe_router = count_params(LLAMA2_7B.replace(moe=MoESpec(4, 2)), [r"layers/moe/router/kernel", "lm_head"])
    assert moe_router["trainable"] == routers + 4096 * 32000


@pytest.mark.parametrize("phase", ["expert", "router", "sft"])
def test_model_flops_follow_the_parameter_count(phase):
    arch, rank, experts, top_k, seq = ARCHS["bench"], 8, 3, 2, 64
    n_exp = 1 if phase == "expert" else experts
    spec = AdapterSpec(targets=MLP_TARGETS, experts=(ExpertSpec(rank=rank, alpha=16.0),) * n_exp,
                       router=phase != "expert", top_k=top_k if phase != "expert" else 1)
    counts = leaf_counts(LlamaConfig(**arch, adapter=spec))
    matmul = {p: n for p, n in counts.items() if not p.endswith("scale") and p != "embed_tokens"}
    lora = sum(n for p, n in matmul.items() if "/lora_" in p)
    n_all = sum(matmul.values()) - lora + lora * (top_k if phase != "expert" else 1) // n_exp  # active experts
    trainable = {"expert": lora,
                 "router": sum(n for p, n in matmul.items() if p.endswith("router") or p == "lm_head"),
                 "sft": sum(n for p, n in matmul.items() if "/attn/" in p or p.endswith("router") or p == "lm_head")}
    attn = 3 * 2 * seq * arch["num_heads"] * arch["head_dim"] * arch["num_layers"]
    expected = 4 * n_all + 2 * trainable[phase] + attn
    got = lora_flops_per_token(arch, seq, MLP_TARGETS, rank, experts, top_k, phase != "expert", phase)
    assert got == expected


def test_ffn_moe_flops_follow_the_parameter_count():
    """Everything trains (6N), N over the top_k active of the FFN experts, plus the causal attention scores."""
    arch, experts, top_k, seq = ARCHS["bench"], 4, 2, 64
    counts = leaf_counts(LlamaConfig(**arch, moe=MoESpec(experts, top_k)))
    matmul = {p: n for p, n in counts.items() if not p.endswith("scale") and p != "embed_tokens"}
    ffn = sum(n for p, n in matmul.items() if p.startswith("layers/moe/") and p.endswith("_proj"))
    assert ffn == 3 * arch["hidden_size"] * arch["intermediate_size"] * arch["num_layers"] * experts
    active = sum(matmul.values()) - ffn + ffn * top_k // experts
    attn = 3 * 2 * seq * arch["num_heads"] * arch["head_dim"] * arch["num_layers"]
    assert ffn_moe_flops_per_token(arch, seq, experts, top_k) == 6 * active + attn
