"""Training output: a start-up summary, a tqdm bar with tokens/s and ETA, `metrics.jsonl` (one JSON object
per logged step), and TensorBoard event files in the work directory (written with tensorboard's own event
writer: tensorboardX would import torch where it is installed, ~0.2 GiB of host RAM in every training run)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from flax import traverse_util
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from btx_jax.checkpoint import btx
from btx_jax.train.hooks import Hook, Loop


def _scalars(metrics: dict) -> dict:
    """{"a/b": float} of nested metrics; a vector (expert load [experts]) becomes one scalar per entry, "a/b/i"."""
    out = {}
    for k, v in traverse_util.flatten_dict(metrics, sep="/").items():
        if np.ndim(v) == 0:
            out[k] = float(v)
        else:
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(np.ravel(v))})
    return out


class MetricsLog(Hook):
    def __init__(self, workdir: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.tokens = 0.0
        self.t0 = time.perf_counter()
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = EventFileWriter(str(self.workdir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)   # logs: a line every 30 s

    def header(self, cfg: dict, info: dict, mesh) -> None:
        if not self.enabled:
            return
        gib = info["state_bytes_per_device"] / 2**30
        print(f"[btx] phase={cfg['phase']} mesh={dict(mesh.shape)} devices={mesh.devices.size}\n"
              f"[btx] parameters: total {info['params_total']:,}  trainable {info['params_trainable']:,}  "
              f"frozen {info['params_frozen']:,}\n"
              f"[btx] params+optimizer state per device: {gib:.3f} GiB", flush=True)
        (self.workdir / btx.RUN_INFO).write_text(json.dumps({"config": cfg, **info}, indent=2))

    def on_metrics(self, loop: Loop, step: int, metrics: dict) -> None:
        self.step(step, metrics, log=loop.logged(step))

    def on_end(self, loop: Loop) -> None:
        self.footer(loop.last)

    def step(self, step: int, metrics: dict, log: bool) -> None:
        self.tokens += float(metrics.get("tokens", 0.0))
        if not self.enabled:
            return
        self.bar.update(1)
        if not log:
            return
        elapsed = time.perf_counter() - self.t0
        row = _scalars(metrics)
        row["tokens_per_s"] = self.tokens / max(elapsed, 1e-9)
        self.tokens, self.t0 = 0.0, time.perf_counter()
        self.write(step, row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

    def write(self, step: int, scalars: dict) -> None:
        """One row {**scalars, "step": step} in metrics.jsonl and one TensorBoard event with a tag per scalar
        (process 0 only)."""
        if not self.enabled:
            return
        row = {**scalars, "step": step}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items() if k != "step"]
        self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

    def footer(self, last: dict) -> None:
        if self.enabled:
            self.bar.close()
            if last.get("step") is None:       # nothing was trained in this run (it had already finished)
                return
            print(f"[btx] done: step {last.get('step')} loss {float(last.get('loss', float('nan'))):.4f}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()
