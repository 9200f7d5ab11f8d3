"""Data pipeline benchmark: preparation and loading of a large jsonl corpus through `make_pipeline`.

    python scripts/bench_data.py --sizes 200,2000 --workdir /tmp/btx_bench_data --out bench_data.json

For each corpus size (MB; built by repeating the bundled wiki train split into --workdir) it runs, each in a
fresh Python process so peak RSS is its own:
  fresh   make_pipeline on an empty cache_dir (tokenising the store) + the first batch: time to first batch,
          preparation tokens/s, peak RSS of the main process and of the largest worker (datasets map process)
  reuse   make_pipeline on the same store + the first batch (time to first batch), then loading tokens/s
          over --batches batches; with --workers 1 also the peak RSS of the grain worker process
The first size is prepared with each of --procs (preparation scaling, e.g. 1 vs 2 processes). The corpus and
the stores are deleted at the end unless --keep. Prints a markdown table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from btx_jax.command_line import ArgumentParser


GIB = 1 << 30


def build_corpus(path: Path, mb: int) -> int:
    """Repeat the bundled wiki train split until the file holds `mb` MB; its size in bytes."""
    from btx_jax.data import bundled_source

    if path.exists() and path.stat().st_size >= mb << 20:
        return path.stat().st_size
    block = Path(bundled_source("wiki")["path"]).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(-(-(mb << 20) // len(block))):
            f.write(block)
    return path.stat().st_size


class ChildPeak:
    """Largest RSS of any descendant process, sampled every 0.1 s (RUSAGE_CHILDREN would also count the
    parent's pages inherited by short fork+exec helpers)."""

    def __init__(self):
        import psutil

        self.peak, self._stop = 0, threading.Event()
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            for child in self._me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except Exception:  # the child ended between listing and reading
                    pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(args) -> dict:
    """One measured run (in its own process); the result as a dict."""
    from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer, make_pipeline, measure_throughput

    tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    cfg = {"sources": [{"path": args.corpus, "name": "wiki"}], "cache_dir": args.cache, "num_proc": args.num_proc,
           "workers": args.workers}
    peaks = ChildPeak()
    start = time.perf_counter()
    pipe = make_pipeline(cfg, tokenizer, seq_len=args.seq, global_batch_size=args.batch)
    next(pipe)
    first = time.perf_counter() - start
    out = {"first_batch_s": first}
    store = pipe.stores[0].docs.reopen
    out["tokens"] = int(store[1]["tokens"])
    out["prepare_s"] = store[1]["seconds"]
    if args.batches:
        out["load_tokens_per_s"] = measure_throughput(pipe, num_batches=args.batches, warmup=1)["tokens_per_s"]
    del pipe
    out["main_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["worker_peak_rss"] = peaks.stop()
    return out


def run_child(args, corpus: Path, cache: Path, num_proc: int, workers: int, batches: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--cache", str(cache), "--num_proc",
           str(num_proc), "--workers", str(workers), "--batches", str(batches), "--seq", str(args.seq),
           "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark run failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--procs", default="1,2", help="preparation processes compared on the first size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/btx_bench_data"))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50, help="batches timed for the loading tokens/s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the corpora and stores")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--num_proc", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    rows = []
    procs = [int(p) for p in args.procs.split(",")]
    try:
        for i, mb in enumerate(int(s) for s in args.sizes.split(",")):
            corpus = args.workdir / f"corpus-{mb}mb.jsonl"
            size = build_corpus(corpus, mb)
            for num_proc in procs if i == 0 else procs[-1:]:
                cache = args.workdir / f"store-{mb}mb-{num_proc}proc"
                shutil.rmtree(cache, ignore_errors=True)
                fresh = run_child(args, corpus, cache, num_proc, workers=0, batches=0)
                row = {"corpus_mb": size / (1 << 20), "num_proc": num_proc}
                row.update({f"fresh_{k}": v for k, v in fresh.items()})
                if num_proc == procs[-1]:
                    reuse = run_child(args, corpus, cache, num_proc, workers=0, batches=args.batches)
                    worker = run_child(args, corpus, cache, num_proc, workers=1, batches=args.batches)
                    row.update({f"reuse_{k}": v for k, v in reuse.items()})
                    row.update({f"grain_worker_{k}": v for k, v in worker.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not args.keep:
                    shutil.rmtree(cache, ignore_errors=True)
            if not args.keep:
                corpus.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    print(f"\nseq {args.seq}, batch {args.batch}; RSS in GiB; load = tokens/s of next(pipe) on the reused store")
    print("| corpus MB | tokens | prep procs | prep tokens/s | fresh: first batch s | main RSS | worker RSS "
          "| reuse: first batch s | main RSS | load tokens/s | grain worker RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        reuse = (f"{r['reuse_first_batch_s']:.1f} | {r['reuse_main_peak_rss'] / GIB:.2f} | "
                 f"{r['reuse_load_tokens_per_s']:,.0f} | {r['grain_worker_worker_peak_rss'] / GIB:.2f}"
                 if "reuse_first_batch_s" in r else "| | |")
        print(f"| {r['corpus_mb']:,.0f} | {r['fresh_tokens']:,} | {r['num_proc']} | "
              f"{r['fresh_tokens'] / r['fresh_prepare_s']:,.0f} | {r['fresh_first_batch_s']:.1f} | "
              f"{r['fresh_main_peak_rss'] / GIB:.2f} | {r['fresh_worker_peak_rss'] / GIB:.2f} | {reuse} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
