"""Model-state memory benchmark: model bytes vs peak host RSS vs checkpoint bytes of a LoRA expert run.

    python scripts/bench_memory.py --sizes 68M,271M --out docs/bench_memory.json

For each size it writes a random bf16 HF Llama (safetensors) once, then runs `scripts/train.py
--config=configs/expert.py:synthetic` on it (LoRA r=8 on gate/up/down_proj, 8 virtual devices, 2 steps, a
checkpoint every step; the preset's batch 8 x 64 tokens) in a
fresh process, and reports that process's peak RSS, the size of each checkpoint
step and of `final`.  `--repo DIR` runs another checkout's scripts/train.py (e.g. an older commit, for a
before/after table in one run); `--remat none,full` runs each remat policy.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# hidden, intermediate, layers, heads (vocab 32000, head_dim 64): about 68M and 271M parameters.
SIZES = {"68M": (512, 1408, 8, 8), "271M": (1024, 2816, 16, 16)}

CHILD = """
import resource, sys, runpy

from btx_jax.command_line import ArgumentParser
sys.argv = {argv!r}
try:       # host peak up to the first step (compile, loading, state init), before that step runs
    from btx_jax.train import trainer
    compile_step = trainer.compile_step
    def reporting(*args):
        compiled, first = compile_step(*args), []
        def step(*a):
            if not first:
                first.append(print("PRE_STEP_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True))
            return compiled(*a)
        return step
    trainer.compile_step = reporting
except (ImportError, AttributeError):     # an older checkout (--repo) without compile_step
    pass
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def write_model(size: str, directory: Path) -> int:
    """A random bf16 HF Llama of `size` at `directory` (written by a child process); returns its bytes."""
    hidden, inter, layers, heads = SIZES[size]
    arch = dict(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                num_kv_heads=heads, head_dim=64)
    code = ("import btx_jax, sys\n"
            "from btx_jax.pretrained import random_source\n"
            f"src = random_source(btx_jax.LlamaConfig(**{arch!r}), 0)\n"
            f"src.load(dtype='bfloat16').save_pretrained({str(directory)!r}, format='hf')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return du(directory)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_expert(repo: Path, model: Path, workdir: Path, remat: str | None = None) -> dict:
    argv = [str(repo / "scripts" / "train.py"), "--config=configs/expert.py:synthetic", f"--workdir={workdir}",
            f"--config.model.init={model}", "--config.train.steps=2", "--config.train.ckpt_every=1",
            "--config.train.keep_checkpoints=2", "--config.train.frozen_dtype=bfloat16"]
    if remat:
        argv.append(f"--config.train.remat={remat}")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(repo),
           "JAX_PLATFORMS": "cpu"}     # a CPU run: an installed libtpu would otherwise be initialised (~0.1 GiB)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(argv=argv)], cwd=repo, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed in {repo}:\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0]) * 1024
    pre = proc.stdout.split("PRE_STEP_RSS_KB")
    temp = re.search(r"([\d.]+) GiB temporaries", proc.stdout)
    steps = sorted((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return {"peak_rss_bytes": peak,
            "peak_rss_before_step_bytes": int(pre[1].split()[0]) * 1024 if len(pre) > 1 else None,
            "step_temp_bytes_per_device": int(float(temp.group(1)) * 2**30) if temp else None,
            "checkpoint_step_bytes": [du(p) for p in steps],
            "final_bytes": du(workdir / "finals")}     # the one version this run wrote


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="68M,271M", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--repo", action="append", default=None,
                   help="checkout whose scripts/train.py runs (repeat to compare; default: this one)")
    p.add_argument("--remat", default="", help="comma-separated train.remat values to run (default: the preset's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    repos = [Path(r).resolve() for r in (args.repo or [REPO])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            if size not in SIZES:
                raise SystemExit(f"error: unknown size {size!r} (choose from {', '.join(SIZES)})")
            model = Path(tmp) / f"llama_{size}"
            model_bytes = write_model(size, model)
            for (i, repo), remat in itertools.product(enumerate(repos), args.remat.split(",")):
                r = {"size": size, "repo": str(repo), "remat": remat or "preset", "model_bytes": model_bytes,
                     **run_expert(repo, model, Path(tmp) / f"run_{size}_{i}_{remat}", remat or None)}
                results.append(r)
                gib = 2 ** 30
                print(f"{size:>5} {repo.name:>12} remat {r['remat']:>6}: model {model_bytes / gib:.2f} GiB  peak RSS "
                      f"{r['peak_rss_bytes'] / gib:.2f} GiB (before the first step "
                      f"{(r['peak_rss_before_step_bytes'] or 0) / gib:.2f} GiB; step temporaries "
                      f"{(r['step_temp_bytes_per_device'] or 0) / 2**20:.0f} MiB/device)  checkpoint steps "
                      f"{[round(b / 2**20, 1) for b in r['checkpoint_step_bytes']]} MiB  final "
                      f"{r['final_bytes'] / 2**20:.1f} MiB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
