"""btx_jax/train/metrics_log.py: nested step metrics become one flat JSON row per logged step ("a/b" keys, a
vector such as the expert load one key per entry), with the step and tokens/s."""
from __future__ import annotations

import json

import numpy as np

from btx_jax.train.metrics_log import MetricsLog


def test_logged_rows_are_flat_scalars(tmp_path):
    log = MetricsLog(tmp_path, total_steps=2, start_step=0)
    metrics = {"loss": np.float32(2.5), "tokens": 64.0,
               "aux": {"lb_loss": np.float32(0.25), "expert_frac": {"up_proj": np.array([0.75, 0.25])}}}
    log.step(1, metrics, log=False)
    log.step(2, metrics, log=True)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row.pop("tokens_per_s") > 0
    assert row == {"loss": 2.5, "tokens": 64.0, "aux/lb_loss": 0.25, "aux/expert_frac/up_proj/0": 0.75,
                   "aux/expert_frac/up_proj/1": 0.25, "step": 2}
