"""The whole Branch-Train-MiX pipeline on a tiny Llama with the bundled real data, on a laptop CPU:

  seed      pretrain a small Llama from scratch on wiki + math + novel          pretrain:tiny
  experts   three LoRA experts, one per domain                                   expert:DOMAIN,tiny
  compose   seed + experts -> LoRA-MoE (top-2 of 3 on gate/up/down_proj)          btx_jax.mix.compose
  router    train routers + lm_head on the mixed corpus                          router:tiny
  sft       instruction tuning with the experts frozen                          sft:tiny
  ffn BTX   the paper's variant beside it, same seed and data: three full-FFN experts
            (expert:DOMAIN,tiny,ffn), mixed into an FFN-MoE (top-2 of 3, Mixtral architecture),
            routers + lm_head trained                                          router:tiny,ffn
  evaluate  per-domain loss table, routing heatmaps, loss curves, samples -> OUT/report.md
  tasks     JCommonsenseQA / JSQuAD through lm-evaluation-harness (`.[eval]`) -> table + OUT/downstream.png
  export    PEFT adapters, merged HF model, mergoo LoRA-MoE, Mixtral FFN-MoE  OUT/export/

    btx demo --out=runs/demo [--quick]          # python scripts/demo.py from a checkout is the same

Each phase is the same code as `btx train --config=...`; a finished phase is skipped when the demo is
run again, an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from btx_jax.command_line import ArgumentParser, run_cli
from btx_jax.configs.expert import DOMAINS  # the demo trains one expert per domain

SAMPLE_PROMPTS = {"wiki": "The history of the city", "math": "Question: Tom has 3 apples and buys 5 more.",
                  "novel": "吾輩は"}
DOWNSTREAM = {"btx_jcommonsenseqa": (100, 20), "btx_jsquad": (50, 5)}     # task: documents (full, --quick)
# --quick scores one model of each kind on the tasks (the full run scores every model)
QUICK_DOWNSTREAM = ("seed", "expert_wiki", "moe_router", "sft", "ffn_moe_router")
NEAR_CHANCE = ("These scores are near chance, and that is expected: the demo model has about two million "
               "parameters trained for minutes on a CPU. The table shows that every phase's checkpoint (seed, "
               "experts, LoRA-MoE, SFT) runs through lm-evaluation-harness unchanged, not that BTX helps at this "
               "scale; read any difference between rows against its standard error.")
SFT_PROMPTS = ["日本の首都はどこですか？", "主に子ども向けのもので、イラストのついた物語が書かれているものはどれ？"]


def phase_configs(out: Path, quick: bool):
    from btx_jax.configs import expert, pretrain, router, sft
    plan = [("seed", pretrain.get_config("tiny"))]
    plan += [(f"expert_{d}", expert.get_config(f"{d},tiny")) for d in DOMAINS]
    plan += [("router", router.get_config("tiny")), ("sft", sft.get_config("tiny"))]
    plan += [(f"ffn_expert_{d}", expert.get_config(f"{d},tiny,ffn")) for d in DOMAINS]
    plan += [("ffn_router", router.get_config("tiny,ffn"))]
    for name, c in plan:
        if name != "seed":
            c.model.init = str(out / ("router" if name == "sft" else "seed") / "final")
        if name in ("router", "ffn_router"):
            prefix = "ffn_expert" if name == "ffn_router" else "expert"
            c.model.compose.experts = [str(out / f"{prefix}_{d}" / "final") for d in DOMAINS]
        if quick:
            c.train.steps = max(c.train.steps // 10, 4)
            c.train.ckpt_every = c.train.steps // 2
            c.train.log_every = 2
    return plan


def run(args) -> None:
    from btx_jax.eval import evaluate, report
    from btx_jax.mix.compose import compose, make_spec
    from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, load_tokenizer
    from btx_jax.eval.textgen import complete
    from btx_jax.train.trainer import train

    out = Path(args.out)
    t0 = time.time()
    import jax    # the three experts compile the same step: share compilations across phases
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    timings = {}
    plan = phase_configs(out, args.quick)
    for name, cfg in plan:
        if (out / name / "final").is_dir():
            print(f"[demo] {name}: already trained ({out / name / 'final'})", flush=True)
            continue
        print(f"\n[demo] ===== {name} ({cfg.phase} phase, {cfg.train.steps} steps) =====", flush=True)
        tic = time.time()
        train(cfg, out / name)
        timings[name] = time.time() - tic
    for init, router_phase in (("moe_init", "router"), ("ffn_moe_init", "ffn_router")):
        if not (out / init).is_dir():         # the MoE before router training, for the comparison
            router_cfg = dict(plan)[router_phase].model.compose
            spec = make_spec(router_cfg.get("mode", "lora"),
                             {"top_k": router_cfg.top_k, "router_init": router_cfg.router_init})
            compose(str(out / "seed" / "final"), list(router_cfg.experts), spec).save_pretrained(out / init,
                                                                                             format="btx")

    print("\n[demo] ===== evaluate =====", flush=True)
    tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    models = {"seed": out / "seed" / "final", **{f"expert_{d}": out / f"expert_{d}" / "final" for d in DOMAINS},
              "moe_before_router": out / "moe_init", "moe_router": out / "router" / "final",
              "sft": out / "sft" / "final", **{f"ffn_expert_{d}": out / f"ffn_expert_{d}" / "final" for d in DOMAINS},
              "ffn_moe_before_router": out / "ffn_moe_init", "ffn_moe_router": out / "ffn_router" / "final"}
    sources = {**{d: bundled_source(d) for d in DOMAINS},          # + held-out instructions, response-only loss
               "sft": {"kind": "sft", "sources": [bundled_source("sft")]}}
    loaded = {}                       # tiny models: all kept, for the samples, the downstream tasks and the exports
    results = evaluate.evaluate_models({k: str(v) for k, v in models.items()}, sources, tokenizer, seq_len=128,
                                       batch_size=16, max_batches=4 if args.quick else 12,
                                       each=lambda name, pre, tok, r: loaded.__setitem__(name, pre))
    routing, heatmaps, labels = {}, {}, {}
    for name in ("moe_before_router", "moe_router", "sft", "ffn_moe_before_router", "ffn_moe_router"):
        labels[name] = [f"{'ffn_' if name.startswith('ffn') else ''}expert_{d}" for d in DOMAINS]
        routing[name] = evaluate.routing_matrix(results[name], list(DOMAINS))
        heatmaps[name] = report.plot_routing_heatmap(routing[name], list(DOMAINS), labels[name],
                                                     out / f"routing_{name}.png")
    findings, checks = evaluate.btx_findings(results, list(DOMAINS), "seed",
                                             {d: f"expert_{d}" for d in DOMAINS}, "moe_router",
                                             routing["moe_router"])
    ffn_findings, ffn_checks = evaluate.btx_findings(results, list(DOMAINS), "seed",
                                                     {d: f"ffn_expert_{d}" for d in DOMAINS}, "ffn_moe_router",
                                                     routing["ffn_moe_router"])
    findings += ["FFN-BTX (the paper's variant): " + line for line in ffn_findings]
    checks.update(ffn_checks)
    sft_gain = results["moe_router"]["sft"]["loss"] - results["sft"]["sft"]["loss"]
    checks["sft improves the instruction (response) loss"] = sft_gain > 0
    findings.append(f"SFT on held-out instructions (response tokens only): {results['sft']['sft']['loss']:.3f} vs "
                    f"{results['moe_router']['sft']['loss']:.3f} before SFT; its domain losses rise because SFT "
                    "retrains embeddings, attention and lm_head on instruction data only")
    curves = report.plot_loss_curves({name: out / name for name, _ in plan}, out / "loss_curves.png")
    samples = {name: list(zip(SAMPLE_PROMPTS.values(),
                              complete(loaded[name], tokenizer, list(SAMPLE_PROMPTS.values()), max_new_tokens=32,
                                       temperature=0.7, top_p=0.9)))
               for name in ("seed", "moe_router", "ffn_moe_router")}
    samples["sft (chat)"] = list(zip(SFT_PROMPTS, complete(loaded["sft"], tokenizer, SFT_PROMPTS, chat=True,
                                                           max_new_tokens=32, temperature=0.7, top_p=0.9)))

    downstream, scores = None, {}
    try:
        from btx_jax.eval import downstream as ds
    except ImportError:              # lm-eval is the optional extra `.[eval]`
        downstream = ["lm-eval is not installed: `pip install -e .[eval]` adds this section."]
    else:
        print("\n[demo] ===== downstream tasks (lm-evaluation-harness) =====", flush=True)
        scored = {k: v for k, v in loaded.items() if k in QUICK_DOWNSTREAM} if args.quick else loaded
        for task, (full, quick) in DOWNSTREAM.items():
            for name, r in ds.run_tasks(scored, [task], tokenizer=tokenizer, limit=quick if args.quick else full,
                                        batch_size=16, max_gen_toks=32).items():
                scores.setdefault(name, {}).update(r)
        downstream = ds.report_section(scores, out, note=NEAR_CHANCE)

    print("\n[demo] ===== export =====", flush=True)
    exports = {"expert_wiki_peft": ("expert_wiki", dict(format="peft")),
               "expert_wiki_merged_hf": ("expert_wiki", dict(format="hf", merge_lora=True)),
               "moe_router_mergoo": ("moe_router", dict(format="mergoo")),
               "sft_mergoo": ("sft", dict(format="mergoo")),
               "ffn_moe_router_mixtral": ("ffn_moe_router", dict(format="mixtral"))}
    for dst, (name, kw) in exports.items():
        loaded[name].save_pretrained(out / "export" / dst, overwrite=True, **kw)
        print(f"[demo] wrote {out / 'export' / dst}", flush=True)

    findings.append("checks: " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    findings.append(f"phase wall times this run (s): {json.dumps({k: round(v) for k, v in timings.items()})}; "
                    f"total {time.time() - t0:.0f} s")
    header = f"btx-jax demo: Branch-Train-MiX on a tiny Llama ({'quick' if args.quick else 'full'} run)"
    path = report.write_report(out, results=results, domains=[*DOMAINS, "sft"], routing=routing, experts=labels,
                               loss_curves=curves, heatmaps=heatmaps, samples=samples, findings=findings,
                               header=header, downstream=downstream)
    (out / "results.json").write_text(json.dumps({"results": results, "checks": checks, "downstream": scores},
                                                 indent=1))
    print("\n" + report.loss_table(results, [*DOMAINS, "sft"]))
    print("\n".join(findings))
    print(f"\n[demo] report: {path}  ({time.time() - t0:.0f} s)")


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="btx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a tenth of the steps (CI's end-to-end test)")
    args = p.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    run_cli(lambda: run(args))
    return 0
