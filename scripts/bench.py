#!/usr/bin/env python
"""Train-step throughput and MFU of each phase, side by side with PyTorch baselines, in one run.

    python scripts/bench.py [--arch bench] [--batch 4] [--seq 512] [--steps 5] [--quick] [--out bench.json]

JAX (this engine's jitted step, `btx_jax.train.trainer.build_step`, one device):
    expert  LoRA r on the MLP (gate/up/down), only LoRA A/B train
    router  LoRA-MoE: --experts LoRA experts of rank r, top-k router on each MLP linear; routers + lm_head train
    sft     the same LoRA-MoE; attention, norms, embeddings, lm_head, routers train
PyTorch (same shape, batch, sequence, fp32, same threads):
    expert  HF transformers LlamaForCausalLM + PEFT LoRA (sdpa attention), AdamW on the LoRA parameters
    router  HF Llama whose MLP linears are a faithful small reimplementation of mergoo's LoRA-MoE layer
            (base linear + bias-free router on the layer's input width + top-k + softmax over the k logits +
            a Python loop over experts gathering each expert's tokens with torch.where), AdamW on routers+lm_head

Model FLOPs per token (btx_jax/counting.py `lora_flops_per_token`; remat recomputation not counted): forward 2N
over every matmul weight (LoRA-MoE: the k active experts' LoRA only), backward input gradients 2N again, weight
gradients 2N over trainable matmul weights only, attention 2*T*d per layer forward (causal: half the T x T
scores), x3 for forward+backward.  MFU is against the peak measured in the same run: the best of a large fp32
matmul in XLA and in torch.  Steps, timing and the peak probe are btx_jax/train/throughput.py's.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from btx_jax.command_line import ArgumentParser
from btx_jax.config import MLP_TARGETS
from btx_jax.counting import lora_flops_per_token
from btx_jax.train import throughput


# ---------------------------------------------------------------- PyTorch side
def _hf_llama(arch: dict):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"], head_dim=arch["head_dim"], rms_norm_eps=arch["rms_norm_eps"],
        max_position_embeddings=arch["max_position_embeddings"], tie_word_embeddings=False,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().train()


def _torch_loop(model, params, args, vocab: int) -> dict:
    import torch
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return throughput.first_step(step)


def torch_peft_expert(arch: dict, args) -> dict:
    import peft
    model = _hf_llama(arch)
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=["gate_proj", "up_proj", "down_proj"], bias="none")
    model = peft.get_peft_model(model, lcfg)
    for n, p in model.named_parameters():       # B non-zero, like the JAX side
        if "lora_B" in n:
            p.data += 0.01
    params = [p for p in model.parameters() if p.requires_grad]
    return _torch_loop(model, params, args, arch["vocab_size"])


def mergoo_lora_moe_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MergooLoraMoeLinear(nn.Module):
        """mergoo's LoRA-MoE linear, reimplemented for timing: base always on, a bias-free gate on the input
        width, top-k over the logits, softmax over the k selected, then for each expert the tokens that chose
        it (torch.where) get weight * B(A(x)) * scaling added."""

        def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int, alpha: float):
            super().__init__()
            self.base = base
            self.top_k = top_k
            self.scaling = alpha / rank
            self.gate = nn.Linear(base.in_features, num_experts, bias=False)
            self.lora_A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False) for _ in range(num_experts))
            self.lora_B = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False) for _ in range(num_experts))
            for b in self.lora_B:
                nn.init.constant_(b.weight, 0.01)

        def forward(self, x):
            result = self.base(x)
            gate_logits = self.gate(x)
            weights, selected = torch.topk(gate_logits, self.top_k)
            weights = F.softmax(weights, dim=-1, dtype=torch.float).to(x.dtype)
            for i in range(len(self.lora_A)):
                batch_idx, tok_idx, nth = torch.where(selected == i)
                if batch_idx.numel() == 0:
                    continue
                xi = x[batch_idx, tok_idx]
                delta = self.lora_B[i](self.lora_A[i](xi)) * self.scaling
                result[batch_idx, tok_idx] += weights[batch_idx, tok_idx, nth, None] * delta
            return result

    return MergooLoraMoeLinear


def torch_mergoo_router(arch: dict, args) -> dict:
    model = _hf_llama(arch)
    cls = mergoo_lora_moe_class()
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, cls(getattr(layer.mlp, name), args.experts, args.top_k, args.rank,
                                         2.0 * args.rank))
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".gate.weight") or n.startswith("lm_head"))
    params = [p for p in model.parameters() if p.requires_grad]
    return _torch_loop(model, params, args, arch["vocab_size"])


def attention_fwd_bwd(arch: dict, args) -> dict:
    """ms per forward+backward of causal attention alone at the bench shape (all layers' worth is
    num_layers times this): btx_jax's blocked attention, the full-mask jax.nn.dot_product_attention, and
    torch's scaled_dot_product_attention(is_causal=True), interleaved."""
    import jax
    import jax.numpy as jnp
    import torch

    from btx_jax.model.attention import causal_attention
    B, T, N, K, H = args.batch, args.seq, arch["num_heads"], arch["num_kv_heads"], arch["head_dim"]
    q, w = (jax.random.normal(jax.random.PRNGKey(i), (B, T, N, H)) for i in (0, 1))
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, K, H)) for i in (2, 3))
    seg = jnp.ones((B, T), jnp.int32)
    steps = {}
    for impl in ("blocked", "xla"):
        g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(causal_attention(q, k, v, seg, impl) * w), (0, 1, 2)))
        steps[f"btx_jax {impl}"] = lambda g=g: jax.block_until_ready(g(q, k, v))
    tq, tw = (torch.randn(B, N, T, H, requires_grad=True) for _ in range(2))
    tk, tv = (torch.randn(B, K, T, H, requires_grad=True) for _ in range(2))

    def torch_step():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=K != N)
        (o * tw).sum().backward()
    steps["torch sdpa"] = torch_step
    times = throughput.interleaved(steps, 2, 7)
    return {impl: 1e3 * statistics.median(t) for impl, t in times.items()}


# ---------------------------------------------------------------- main
def data_pipeline_throughput(args, step_tokens_per_s: float) -> dict:
    """Tokens/s of the real data pipeline (packing + mixture + batching; tokenisation is cached once), to
    check that loading is never the bottleneck (it must be >= 10x the train step)."""
    from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer, make_pipeline, measure_throughput, mixture_config
    pipe = make_pipeline(mixture_config({"wiki": 1, "math": 1, "novel": 1}), load_tokenizer(BUNDLED_TOKENIZER),
                         seq_len=args.seq, global_batch_size=args.batch)
    tps = measure_throughput(pipe, num_batches=200)["tokens_per_s"]
    return {"tokens_per_s": tps, "ratio_vs_slowest_step": tps / step_tokens_per_s}


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="bench", help="configs/common.py ARCHS name")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="blocked", choices=("blocked", "xla"),
                   help="btx_jax/model/attention.py implementation")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--phases", default="expert,router,sft")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--quick", action="store_true", help="3 timed steps after the first (warm-up) step")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 0      # the first (compiling) step is the warm-up
    with throughput.cpu_threads(args.threads):       # this process's XLA / torch threads
        return run(args)


def run(args) -> int:
    import jax
    import torch
    torch.set_num_threads(args.threads)
    from btx_jax.configs.common import ARCHS, base_config
    arch = dict(ARCHS[args.arch])

    ta = torch.randn(2048, 2048)
    rates = throughput.matmul_peak(2048, "float32", reps=5, warmup=2, others={"torch": lambda: torch.mm(ta, ta)})
    peak = {"n": 2048, "xla_gflops": rates["xla"] / 1e9, "torch_gflops": rates["torch"] / 1e9,
            "peak_gflops": max(rates.values()) / 1e9}
    tokens = args.batch * args.seq
    print(f"[bench] arch {args.arch} {arch}; batch {args.batch} x seq {args.seq} = {tokens} tokens/step, "
          f"{args.dtype}, remat {args.remat}, attention {args.attention}", flush=True)
    print(f"[bench] threads: XLA intra_op_parallelism_threads={args.threads}, torch.set_num_threads("
          f"{torch.get_num_threads()}) on {os.cpu_count()} cores; jax {jax.__version__} ({jax.devices()[0]}), "
          f"torch {torch.__version__}", flush=True)
    print(f"[bench] measured fp32 matmul peak ({peak['n']}^3): XLA {peak['xla_gflops']:.1f} GFLOP/s, "
          f"torch {peak['torch_gflops']:.1f} GFLOP/s -> peak {peak['peak_gflops']:.1f} GFLOP/s", flush=True)

    baselines = {"expert": ("HF+PEFT", torch_peft_expert), "router": ("mergoo-style", torch_mergoo_router)}
    rows = []
    for phase in args.phases.split(","):
        router = phase != "expert"
        fpt = lora_flops_per_token(arch, args.seq, MLP_TARGETS, args.rank, args.experts, args.top_k, router, phase)
        entries = [("btx_jax", lambda: throughput.lora_step(
            base_config(), phase, arch, rank=args.rank, experts=args.experts, top_k=args.top_k,
            global_batch_size=args.batch, seq_len=args.seq, dtype=args.dtype, frozen_dtype=args.dtype,
            remat=args.remat, attention=args.attention))]
        if phase in baselines and not args.no_torch:
            name, fn = baselines[phase]
            entries.append((name, lambda fn=fn: fn(arch, args)))
        built = {impl: fn() for impl, fn in entries}
        times = throughput.interleaved({impl: b["step"] for impl, b in built.items()}, args.warmup, args.steps)
        for impl, r in built.items():
            med = statistics.median(times[impl])
            tps = tokens / med
            row = {"phase": phase, "impl": impl, "step_s": med, "tokens_per_s": tps,
                   "model_gflops_per_step": fpt * tokens / 1e9, "achieved_gflops": fpt * tps / 1e9,
                   "mfu": fpt * tps / (peak["peak_gflops"] * 1e9), "times": times[impl],
                   "first_step_s": r["compile_s"]}
            rows.append(row)
            print(f"[bench] {phase:6s} {impl:12s} median {med * 1e3:8.1f} ms/step  {tps:8.0f} tok/s  "
                  f"MFU {row['mfu']:.1%}  (first step {r['compile_s']:.1f}s)", flush=True)

    by = {(r["phase"], r["impl"]): r for r in rows}
    for r in rows:
        base = [b for (ph, impl), b in by.items() if ph == r["phase"] and impl != "btx_jax"]
        if r["impl"] == "btx_jax" and base:
            r["speedup_vs_" + base[0]["impl"]] = r["tokens_per_s"] / base[0]["tokens_per_s"]
    data = data_pipeline_throughput(args, min(r["tokens_per_s"] for r in rows if r["impl"] == "btx_jax"))
    attn = attention_fwd_bwd(arch, args)
    print()
    print(table(rows, peak))
    print("\ncausal attention alone, forward+backward of one layer (median ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in attn.items()))
    print(f"\ndata pipeline (bundled wiki+math+novel mixture, seq {args.seq}, batch {args.batch}): "
          f"{data['tokens_per_s']:,.0f} tokens/s = {data['ratio_vs_slowest_step']:,.0f}x the slowest train step")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "arch": arch, "peak": peak, "rows": rows,
                                              "data_pipeline": data, "attention_ms": attn,
                                              "cpu": _cpu()}, indent=2))
    return 0


def _cpu() -> str:
    try:
        import subprocess
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def table(rows, peak) -> str:
    lines = [f"measured matmul peak: {peak['peak_gflops']:.1f} GFLOP/s (fp32)", "",
             "| phase | implementation | ms/step (median) | tokens/s | model GFLOP/step | GFLOP/s | MFU | btx_jax speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = next((f"{v:.2f}x vs {k[len('speedup_vs_'):]}" for k, v in r.items() if k.startswith("speedup_vs_")),
                  "")
        lines.append(f"| {r['phase']} | {r['impl']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['model_gflops_per_step']:.0f} | {r['achieved_gflops']:.1f} | {r['mfu']:.1%} | {sp} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
