"""End to end: the demo pipeline (seed -> 3 experts -> compose -> router -> SFT, and the FFN-BTX branch -> evaluate
-> export) on the tiny model with the bundled data, with a tenth of the steps (`--quick`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from btx_jax import load_pretrained

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_writes_report_models_and_exports(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}     # one CPU device, like a laptop
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text(encoding="utf-8")
    models = {"seed", "expert_wiki", "expert_math", "expert_novel", "moe_before_router", "moe_router", "sft",
              "ffn_expert_wiki", "ffn_expert_math", "ffn_expert_novel", "ffn_moe_before_router", "ffn_moe_router"}
    for model in models:
        assert f"| {model} |" in report
    for png in ("loss_curves.png", "routing_moe_router.png", "routing_moe_before_router.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    results = json.loads((out / "results.json").read_text())
    # downstream tasks through lm-evaluation-harness: one model of each kind scored, table + chart in the report
    assert "## Downstream tasks" in report and "near chance" in report
    assert (out / "downstream.png").stat().st_size > 1000
    assert set(results["downstream"]) == {"seed", "expert_wiki", "moe_router", "sft", "ffn_moe_router"}  # --quick
    for model, tasks in results["downstream"].items():
        assert set(tasks) == {"btx_jcommonsenseqa", "btx_jsquad"}, model
        assert 0.0 <= tasks["btx_jcommonsenseqa"]["value"] <= 1.0 and tasks["btx_jcommonsenseqa"]["n"] == 20
    for model, per_domain in results["results"].items():
        for domain, r in per_domain.items():
            assert np.isfinite(r["loss"]) and r["tokens"] > 0, (model, domain)
    routing = results["results"]["moe_router"]["wiki"]["routing"]
    assert set(routing) == {"gate_proj", "up_proj", "down_proj"}
    np.testing.assert_allclose(np.sum(routing["down_proj"], axis=-1), 1.0, rtol=1e-5)   # gate weights per layer
    # each phase trained only its own parameters: counts printed at start match the phase definition
    info = {p: json.loads((out / p / "run_info.json").read_text()) for p in ("seed", "expert_math", "router", "sft")}
    assert info["seed"]["params_frozen"] == 0
    moe = load_pretrained(out / "router" / "final")
    flat = moe.flat_numpy()
    routers = sum(v.size for k, v in flat.items() if k.endswith("router"))
    assert info["router"]["params_trainable"] == routers + flat["lm_head"].size
    assert info["expert_math"]["params_trainable"] == sum(
        v.size for k, v in flat.items() if k.endswith("lora_a") or k.endswith("lora_b")) // 3
    # exports: PEFT adapter, merged HF, mergoo LoRA-MoE, loadable again with the same logits
    assert (out / "export" / "expert_wiki_peft" / "adapter_config.json").is_file()
    assert (out / "export" / "expert_wiki_merged_hf" / "config.json").is_file()
    ids = np.arange(1, 17)[None]
    np.testing.assert_allclose(load_pretrained(out / "export" / "moe_router_mergoo").logits(ids),
                               moe.logits(ids), atol=1e-4)
    # the FFN-BTX branch: an FFN-MoE whose routing is reported per layer and which exports as Mixtral
    ffn_routing = np.asarray(results["results"]["ffn_moe_router"]["math"]["routing"]["router"])
    np.testing.assert_allclose(ffn_routing.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(load_pretrained(out / "export" / "ffn_moe_router_mixtral").logits(ids),
                               load_pretrained(out / "ffn_router" / "final").logits(ids), atol=1e-5)

