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


def test_tensorboard_reads_the_logged_scalars(tmp_path):
    """The event files are what `tensorboard --logdir` shows: read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, total_steps=3, start_step=0)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        log.step(step, {"loss": np.float32(loss), "tokens": 64.0, "aux": {"lb_loss": np.float32(loss / 10)}},
                 log=step != 2)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "aux/lb_loss", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (3, 2.0)]
    assert [round(e.value, 6) for e in events.Scalars("aux/lb_loss")] == [0.3, 0.2]
