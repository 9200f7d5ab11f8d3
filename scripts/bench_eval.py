"""Benchmark: lm-evaluation-harness loglikelihood requests/s of the `btx` backend, batched into length buckets
vs one request at a time, on the demo (tiny) and bench architectures; optionally lm-eval's `hf` backend
(PyTorch) on the same weights.

    python scripts/bench_eval.py [--arch tiny,bench] [--docs 20] [--num-fewshot 0] [--batch 16] [--hf] [--out F]

Requests are the real ones of the bundled 3-shot JCommonsenseQA task (5 per document; contexts truncated to
the model's length), built by the harness itself. Each setting runs once to compile, then is timed."""
from __future__ import annotations

import json
import os
import platform
import tempfile

from btx_jax.command_line import ArgumentParser

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def requests(docs: int, num_fewshot: int | None):
    from lm_eval.tasks import TaskManager, get_task_dict

    from btx_jax.eval.harness import TASKS_DIR
    task = get_task_dict(["btx_jcommonsenseqa"], TaskManager(include_path=str(TASKS_DIR)))["btx_jcommonsenseqa"]
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.build_all_requests(limit=docs, rank=0, world_size=1)
    return task.instances


def timed(lms: dict, reqs, rounds: int = 3) -> dict[str, float]:
    """Best seconds of a loglikelihood pass over `reqs` per backend, the backends alternating pass by pass
    after one untimed pass each (compile / warm up), so a busy machine slows them alike."""
    from btx_jax.train.throughput import interleaved
    times = interleaved({k: (lambda lm=lm: lm.loglikelihood(reqs, disable_tqdm=True)) for k, lm in lms.items()},
                        1, rounds)
    return {k: min(v) for k, v in times.items()}


def bench_arch(name: str, reqs, args) -> dict:
    import jax

    from btx_jax.config import LlamaConfig
    from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer
    from btx_jax.eval.harness import BtxLM
    from btx_jax.model import init_params
    from btx_jax.pretrained import Pretrained
    from btx_jax.configs.common import ARCHS

    config = LlamaConfig(**ARCHS[name])
    pre = Pretrained(config, init_params(config, jax.random.PRNGKey(0)))
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    row = {"arch": name, "num_fewshot": args.num_fewshot, "params_M": round(sum(x.size for x in jax.tree_util.tree_leaves(pre.params)) / 1e6, 1),
           "requests": len(reqs), "max_length": config.max_position_embeddings}
    seconds = timed({label: BtxLM(pre, tokenizer=tok, batch_size=bs)
                     for label, bs in (("batched", args.batch), ("one_at_a_time", 1))}, reqs)
    for label, sec in seconds.items():
        row[f"{label}_req_per_s"] = round(len(reqs) / sec, 2)
    row["speedup"] = round(row["batched_req_per_s"] / row["one_at_a_time_req_per_s"], 1)
    if args.hf:
        from lm_eval.models.huggingface import HFLM
        with tempfile.TemporaryDirectory() as d:
            pre.save_pretrained(f"{d}/m", format="hf")
            for f in ("tokenizer.model",):
                os.symlink(os.path.abspath(BUNDLED_TOKENIZER), f"{d}/m/{f}")
            with open(f"{d}/m/tokenizer_config.json", "w") as fh:
                json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, fh)
            hf = HFLM(pretrained=f"{d}/m", dtype="float32", device="cpu", batch_size=args.batch)
            row["hf_batched_req_per_s"] = round(len(reqs) / timed({"hf": hf}, reqs)["hf"], 2)
    return row


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench_eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny,bench", help="configs/common.py ARCHS names, comma-separated")
    p.add_argument("--docs", type=int, default=20, help="JCommonsenseQA documents (5 requests each)")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the task's 3 shots (0: short requests)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hf", action="store_true", help="also lm-eval's hf backend (PyTorch) on the same weights")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    import jax
    reqs = requests(args.docs, args.num_fewshot)
    rows = []
    for a in [a.strip() for a in args.arch.split(",") if a.strip()]:
        rows.append(bench_arch(a, reqs, args))
        print(json.dumps(rows[-1]), flush=True)
    info = {"device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "batch": args.batch}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
