"""scripts/rehearse.py: the seed-scale presets through every phase, each a subprocess of the real scripts, measured;
a failing step is a row with its exit code and makes rehearse exit 1; bad input is one line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from btx_jax.rehearse import Step, run_step, table

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "rehearse.py"
STEPS = ["model", "prepare expert:wiki", "prepare expert:math", "prepare expert:novel", "prepare router",
         "prepare sft", "expert wiki", "expert math", "expert novel", "router", "sft", "sft resume (+1 step)",
         "evaluate", "generate", "export peft (expert wiki)", "export merged hf (expert wiki)", "export mergoo (sft)",
         "compose ffn -> mixtral"]


@pytest.mark.slow           # 18 processes, ~10 min on 2 cores: `pytest -m slow tests/test_rehearse.py`
def test_tiny_rehearsal_runs_every_phase(tmp_path):
    out = tmp_path / "reh"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape=tiny", "--steps=1", "--seq-len=64", "--batch=8",
                           "--devices=2", "--rows=16", "--compile-cache", f"--out={out}"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "rehearsal.json").read_text())
    rows = {r["name"]: r for r in result["steps_run"]}
    assert list(rows) == STEPS
    assert all(r["ok"] and r["rc"] == 0 and r["peak_rss_bytes"] > 50 * 2**20 for r in rows.values())
    for name in ("expert wiki", "router", "sft", "sft resume (+1 step)"):       # what the trainer printed
        assert rows[name]["state_gib_per_device"] > 0 and rows[name]["temporaries_gib_per_device"] > 0, name
        assert rows[name]["final_bytes"] > 0, name
    assert len(rows["sft"]["checkpoint_bytes"]) == 1 and len(rows["sft resume (+1 step)"]["checkpoint_bytes"]) == 2
    assert "resumed" in (out / "logs" / "sft resume (+1 step).log").read_text()
    for exported in ("expert_wiki_peft/adapter_config.json", "expert_wiki_hf/config.json", "sft_mergoo/config.json",
                     "ffn_moe_mixtral/config.json"):
        assert (out / "export" / exported).is_file(), exported
    md = (out / "rehearsal.md").read_text()
    assert all(f"| {name} |" in md for name in STEPS) and "exit" not in md


def test_a_failing_step_is_a_row_with_its_exit_code(tmp_path):
    ok = run_step(Step("fine", [sys.executable, "-c", "print('[btx] step compiled in 1s: per device 0.500 GiB "
                                                      "state+batch, 0.250 GiB temporaries')"]), tmp_path, None, tmp_path)
    bad = run_step(Step("broken", [sys.executable, "-c", "import sys; print('error: it broke'); sys.exit(3)"]),
                   tmp_path, None, tmp_path)
    assert (ok.rc, ok.state_gib_per_device, ok.temporaries_gib_per_device, ok.bound_bytes(8)) == (0, 0.5, 0.25, 6 * 2**30)
    assert (bad.rc, bad.ok, bad.last_line) == (3, False, "error: it broke")
    md = table([ok, bad], 8)
    assert "| fine |" in md and "| 6.00 |" in md and "**exit 3**: error: it broke |" in md


def test_a_non_empty_out_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--out={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}: exists and is not empty (pass --overwrite to replace it)"]
    assert (tmp_path / "keep.txt").is_file()


def test_a_tokenizer_that_does_not_fit_the_shape_is_one_line_before_any_work(tmp_path):
    """The 1.1B shape has 32,000 ids, the bundled tokenizer 4,096: evaluate and generate would refuse it at
    the end, so rehearse refuses it first."""
    out = tmp_path / "reh"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape=1.1b", f"--out={out}"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and not out.exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: tokenizer ") and "has 4096 tokens" in line and "--vocab 4096" in line
