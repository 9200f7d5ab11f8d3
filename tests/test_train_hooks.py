"""The training loop's hooks (btx_jax/train/hooks.py) and held-out evaluation (train.eval_every,
btx_jax/train/held_out.py): a user's hook sees every step, eval/loss per domain lands in metrics.jsonl and
TensorBoard and equals the loss of the final weights computed by btx_jax/eval/evaluate.py; signals are opt-in."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from btx_jax.eval import evaluate
from btx_jax.command_line import deferred_stops, stopping_cleanly
from btx_jax.config import ConfigError
from btx_jax.data.synthetic import SyntheticPipeline
from btx_jax.pretrained import load_pretrained
from btx_jax.train import trainer
from btx_jax.train.hooks import Hook
from test_reliability import ARCH, compilation_cache, config  # noqa: F401 - the module's cache fixture


class Recorder(Hook):
    def __init__(self):
        self.steps, self.metrics, self.ends, self.closed = [], [], 0, 0

    def on_step(self, loop):
        self.steps.append((loop.step, int(loop.state["step"])))

    def on_metrics(self, loop, step, metrics):
        self.metrics.append((step, float(metrics["loss"])))

    def on_end(self, loop):
        self.ends += 1

    def close(self):
        self.closed += 1


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_logs_the_held_out_loss_of_the_weights(tmp_path):
    workdir = tmp_path / "run"
    hook = Recorder()
    last = trainer.train(config(eval_every=1, eval_batches=3), workdir, hooks=[hook])
    # the user's hook: every step once, in order, its metrics one by one, the end once
    assert hook.steps == [(s, s) for s in range(1, 5)]
    logged = {r["step"]: r["loss"] for r in rows(workdir) if "loss" in r}
    assert hook.metrics == [(s, pytest.approx(logged[s])) for s in range(1, 5)]
    assert (hook.ends, hook.closed) == (1, 1) and last["step"] == 4
    evals = {r["step"]: r for r in rows(workdir) if "eval/loss" in r}
    assert sorted(evals) == [1, 2, 3, 4]                      # every step; the last is not evaluated twice
    for r in evals.values():
        assert set(r) == {"eval/loss", "eval/loss/synthetic", "step"} and np.isfinite(r["eval/loss"])
        assert r["eval/loss"] == r["eval/loss/synthetic"]       # one domain
    assert len({r["eval/loss"] for r in evals.values()}) == 4   # the weights change: so does the loss
    # an independent path: the final weights, loaded from workdir/final and evaluated by btx_jax/eval/evaluate.py
    # on the same held-out batches (synthetic tokens of seed train.seed + 1)
    c = config()
    held_out = SyntheticPipeline(vocab_size=ARCH["vocab_size"], seq_len=c.train.seq_len,
                                 global_batch_size=c.train.global_batch_size, seed=c.train.seed + 1)
    want = evaluate.evaluate_domain(load_pretrained(workdir / "final"), [next(held_out) for _ in range(3)])["loss"]
    np.testing.assert_allclose(evals[4]["eval/loss"], want, rtol=1e-5)
    # TensorBoard has the tags, at the evaluated steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert {"eval/loss", "eval/loss/synthetic", "loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss/synthetic")] == [1, 2, 3, 4]
    np.testing.assert_allclose(events.Scalars("eval/loss")[-1].value, want, rtol=1e-5)


def test_eval_every_without_held_out_data_is_one_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 10)
    c = config(eval_every=5).to_dict()
    c["data"] = {"kind": "pretrain", "sources": [{"path": str(corpus)}],
                 "tokenizer": "bundled:tokenizer/tokenizer.model"}
    with pytest.raises(ConfigError) as e:
        trainer.train(c, tmp_path / "w")
    assert str(e.value) == ("train.eval_every=5: no held-out data (set data.sources[i].eval_path to held-out files of "
                            "that source, or train.eval_every=0)")
    assert not (tmp_path / "w").exists()


def test_eval_every_may_change_on_resume(tmp_path):
    workdir = tmp_path / "run"
    trainer.train(config(steps=2), workdir)
    trainer.train(config(steps=4, eval_every=3), workdir)
    assert [r["step"] for r in rows(workdir) if "eval/loss" in r] == [3, 4]   # every 3 steps and the last


def test_a_hook_error_stops_training_and_every_hook_is_closed(tmp_path):
    class Failing(Recorder):
        def on_step(self, loop):
            super().on_step(loop)
            if loop.step == 3:
                raise RuntimeError("hook failed")
    hook = Failing()
    with pytest.raises(RuntimeError, match="hook failed"):
        trainer.train(config(), tmp_path / "run", hooks=[hook])
    assert [s for s, _ in hook.steps] == [1, 2, 3] and hook.closed == 1 and hook.ends == 0
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / ".lock").exists()


def test_stop_signals_are_opt_in(python_sigint):
    """deferred_stops installs nothing: without stopping_cleanly a signal acts as usual (here Python's
    KeyboardInterrupt); inside it the signal is recorded for the loop, and the handlers are restored after."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), deferred_stops() as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum is None and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(SystemExit) as e, stopping_cleanly("out"):
        with deferred_stops() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM             # recorded, not raised
        os.kill(os.getpid(), signal.SIGTERM)                 # outside the deferral: raised
    assert e.value.code == 143 and signal.getsignal(signal.SIGINT) is before


def test_eval_per_domain_of_a_mixture(tmp_path):
    """Two bundled domains (their eval_path files): eval/loss/<name> of each, and eval/loss the token-weighted
    mean; each equals btx_jax/eval/evaluate.py's loss of the final weights on the domain's held-out batches."""
    from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, eval_batches, load_tokenizer
    from btx_jax.configs import pretrain
    c = pretrain.get_config("tiny")
    c.data.sources = [dict(bundled="wiki", ratio=0.5), dict(bundled="math", ratio=0.5)]
    c.data.cache_dir = str(tmp_path / "cache")
    c.model.arch.num_layers = 1
    c.mesh.update(dict(fsdp=1, num_devices=1))
    c.train.update(steps=2, ckpt_every=2, log_every=1, seq_len=32, global_batch_size=4, eval_every=2, eval_batches=2)
    trainer.train(c, tmp_path / "run")
    (r,) = [r for r in rows(tmp_path / "run") if "eval/loss" in r]
    assert r["step"] == 2 and set(r) == {"step", "eval/loss", "eval/loss/wiki", "eval/loss/math"}
    final, tok = load_pretrained(tmp_path / "run" / "final"), load_tokenizer(BUNDLED_TOKENIZER)
    got = {d: evaluate.evaluate_domain(final, eval_batches(bundled_source(d), tok, 32, 4, 2,
                                                           cache_dir=tmp_path / "cache")) for d in ("wiki", "math")}
    for d in ("wiki", "math"):
        np.testing.assert_allclose(r[f"eval/loss/{d}"], got[d]["loss"], rtol=1e-5)
    overall = sum(g["loss"] * g["tokens"] for g in got.values()) / sum(g["tokens"] for g in got.values())
    np.testing.assert_allclose(r["eval/loss"], overall, rtol=1e-5)
    domains = [r["eval/loss/wiki"], r["eval/loss/math"]]
    assert min(domains) < r["eval/loss"] < max(domains)
