"""The seed's recipe rehearsed at a chosen shape, every phase a subprocess of the real `btx` commands, measured.

    rehearse(out, arch, phases, steps=3, seq_len=256, batch=8, devices=8)

Every step runs `python -m btx_jax.cli COMMAND ...` of this very btx_jax (`btx rehearse` is the command line).
It writes a
random bf16 HF Llama of `arch` with a tokenizer beside it, local copies of the seed's datasets laid out as the
hub has them (btx_jax/data/seed_corpora.py), then runs the seed-scale presets `phases` names ({phase: (config file
with preset, [its source names in order])}) changed only in model.init, the tokenizer, the data paths and the
sizes (seq_len, global batch, steps, a checkpoint every step), through prepare_data, the three experts, the
router, SFT, a resume of SFT one step further, evaluate, generate, the exports (PEFT, merged HF, mergoo) and the
FFN compose (written as Mixtral), on `devices` virtual CPU devices.  Each step is its own process, measured on
its own (`os.wait4`: wall and that process tree's peak RSS), with what the trainer printed per device (state +
batch, step temporaries) and the checkpoint sizes it left.  Writes OUT/rehearsal.md (a table) and
OUT/rehearsal.json; a step that exits non-zero is in the table with its exit code and the log's last line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import btx_jax
from btx_jax.checkpoint import btx
from btx_jax.configs import resolve
from btx_jax.data import load_tokenizer
from btx_jax.errors import UserError
from btx_jax.data.seed_corpora import FIXTURES
from btx_jax.eval.textgen import check_matches

GIB = 2 ** 30
PER_DEVICE = re.compile(r"per device ([\d.]+) GiB state\+batch, ([\d.]+) GiB temporaries")
# A random bf16 HF Llama with the tokenizer's own files beside it (a sentencepiece file as tokenizer.model).
MODEL = """
import json, shutil, sys
from pathlib import Path
from btx_jax import LlamaConfig
from btx_jax.data import load_tokenizer
from btx_jax.data.tokenizer import TOKENIZER_FILES
from btx_jax.pretrained import random_source
arch, out, tokenizer = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(load_tokenizer(sys.argv[3]).path)
random_source(LlamaConfig(**arch), 0).load(dtype="bfloat16").save_pretrained(out, format="hf")
for f in [tokenizer] if tokenizer.is_file() else [tokenizer / n for n in TOKENIZER_FILES if (tokenizer / n).exists()]:
    shutil.copy(f, out / ("tokenizer.model" if tokenizer.is_file() else f.name))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    workdir: str | None = None        # a training run's directory: its checkpoints and final are measured
    rc: int | None = None
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    state_gib_per_device: float | None = None
    temporaries_gib_per_device: float | None = None
    checkpoint_bytes: list[int] = field(default_factory=list)
    final_bytes: int | None = None
    last_line: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def bound_bytes(self, devices: int) -> int | None:
        """devices x (state + temporaries): what the devices hold, on CPU host memory."""
        if self.state_gib_per_device is None:
            return None
        return int(devices * (self.state_gib_per_device + self.temporaries_gib_per_device) * GIB)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_step(step: Step, cwd: Path, env: dict, log_dir: Path) -> Step:
    """Run one step in its own process, recording its exit code, wall time and peak RSS (with its children)."""
    import subprocess
    log = log_dir / f"{step.name}.log"
    print(f"[rehearse] {step.name}: {' '.join(step.argv)}", flush=True)
    tic = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = step.rc = os.waitstatus_to_exitcode(status)
    step.wall_s = time.perf_counter() - tic
    step.peak_rss_bytes = usage.ru_maxrss * 1024        # KiB on Linux
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    step.last_line = lines[-1][:300] if lines else ""
    found = PER_DEVICE.findall(text)
    if found:
        step.state_gib_per_device, step.temporaries_gib_per_device = map(float, found[-1])
    if step.workdir is not None:
        work = cwd / step.workdir
        ckpts = work / "checkpoints"
        if ckpts.is_dir():
            step.checkpoint_bytes = [du(p) for p in sorted(ckpts.iterdir(), key=lambda p: p.name) if p.name.isdigit()]
        if (work / "final").is_dir():
            step.final_bytes = du(btx.resolve(work / "final"))
    print(f"[rehearse] {step.name}: exit {step.rc}, {step.wall_s:.0f} s, peak RSS {step.peak_rss_bytes / GIB:.2f} GiB",
          flush=True)
    return step


def write_corpora(data: Path, phases: dict, rows: int) -> dict[str, str]:
    """{source name: local path} of every source the phases read, written under `data`."""
    paths = {}
    for _, names in phases.values():
        for name in names:
            if name not in paths:
                (data / name).mkdir(parents=True, exist_ok=True)
                paths[name] = FIXTURES[name](data / name, rows=rows)[0]
    return paths


def plan(out: Path, arch: dict, phases: dict, *, steps: int, seq_len: int, batch: int,
         tokenizer: str, rows: int) -> list[Step]:
    """The steps, in order (the corpora are written here; the model by the first step)."""
    py, model, runs = sys.executable, out / "model", Path("runs") / "btx"
    btx_cmd = [py, "-m", "btx_jax.cli"]
    paths = write_corpora(out / "data", phases, rows)
    sizes = [f"--config.train.seq_len={seq_len}", f"--config.train.global_batch_size={batch}",
             f"--config.train.steps={steps}", "--config.train.ckpt_every=1", "--config.train.log_every=1"]

    def config(phase: str, init: bool = True) -> list[str]:
        file, names = phases[phase]
        args = [f"--config={resolve(file)}", f"--config.data.tokenizer={model}"]
        args += [f"--config.data.sources[{i}].path={paths[n]}" for i, n in enumerate(names)]
        return args + ([f"--config.model.init={model}"] if init else [])

    train = [*btx_cmd, "train"]
    out_steps = [Step("model", [py, "-c", MODEL, json.dumps(arch), str(model), tokenizer])]
    out_steps += [Step(f"prepare {p}", [*btx_cmd, "prepare-data", *config(p)]) for p in phases]
    for p in phases:
        if p.startswith("expert:"):
            d = p.split(":")[1]
            out_steps.append(Step(f"expert {d}", [*train, *config(p), f"--workdir={runs / f'expert_{d}'}", *sizes],
                                  workdir=str(runs / f"expert_{d}")))
    # router: the preset's experts (runs/btx/expert_*/final, relative to `out`); SFT: the preset's init
    # (runs/btx/router/final)
    out_steps.append(Step("router", [*train, *config("router"), f"--workdir={runs / 'router'}", *sizes],
                          workdir=str(runs / "router")))
    sft = [*train, *config("sft", init=False), f"--workdir={runs / 'sft'}", *sizes]
    out_steps.append(Step("sft", sft, workdir=str(runs / "sft")))
    out_steps.append(Step("sft resume (+1 step)", [*sft, f"--config.train.steps={steps + 1}"],
                          workdir=str(runs / "sft")))
    # the seed, an expert and the SFT model: evaluate.py loads one at a time, sharded (peak = the largest one)
    out_steps.append(Step("evaluate", [*btx_cmd, "evaluate", f"--model=seed={model}",
                                       f"--model=wiki={runs / 'expert_wiki' / 'final'}",
                                       f"--model=sft={runs / 'sft' / 'final'}", f"--tokenizer={model}",
                                       f"--seq-len={seq_len}", f"--batch-size={batch}", "--max-batches=2",
                                       "--out=eval"]))
    out_steps.append(Step("generate", [*btx_cmd, "generate",
                                       f"--model={runs / 'sft' / 'final'}",
                                       f"--tokenizer={model}", "--chat", "--prompt=日本の首都はどこですか？",
                                       "--max-new-tokens=16"]))
    convert = [*btx_cmd, "convert"]
    dtype = "--dtype=bfloat16"          # results in the seed's own dtype (fp32 doubles host memory and files)
    wiki = str(runs / "expert_wiki" / "final")
    out_steps += [Step("export peft (expert wiki)", [*convert, "btx-to-peft", wiki, "export/expert_wiki_peft", dtype]),
                  Step("export merged hf (expert wiki)", [*convert, "btx-to-hf", wiki, "export/expert_wiki_hf",
                                                          "--merge-lora", "--no-progress", dtype]),
                  Step("export mergoo (sft)", [*convert, "btx-to-mergoo", str(runs / "sft" / "final"),
                                               "export/sft_mergoo", "--no-progress", dtype])]
    experts = [str(runs / f"expert_{p.split(':')[1]}" / "final") for p in phases if p.startswith("expert:")]
    out_steps.append(Step("compose ffn -> mixtral", [*btx_cmd, "compose", str(model), *experts,
                                                      "--mode=ffn", "--top-k=2", "--format=mixtral",
                                                      "--out=export/ffn_moe_mixtral", dtype]))
    return out_steps


def rehearse(out: Path, arch: dict, phases: dict, *, steps: int = 3, seq_len: int = 256,
             batch: int = 8, devices: int = 8, tokenizer: str, rows: int = 200, compile_cache: bool = False,
             overwrite: bool = False) -> list[Step]:
    """Run every step (all of them, even after a failure) and write OUT/rehearsal.md and .json."""
    out = Path(out).absolute()
    package_root = str(Path(btx_jax.__file__).resolve().parents[1])     # the children run this btx_jax
    # evaluate and generate refuse a tokenizer that does not belong to the model: say so before any work
    check_matches(load_tokenizer(tokenizer), int(arch["vocab_size"]),
                  "the rehearsal's model (--vocab 4096 fits the bundled tokenizer)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "BTX_DATA_CACHE": str(out / "data_cache"),      # the token stores prepare_data writes, train reads
           "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if compile_cache:        # the experts compile the same step: share compilations across processes
        env.update(JAX_COMPILATION_CACHE_DIR=str(out / ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    tic = time.perf_counter()
    done = [run_step(s, out, env, out / "logs")
            for s in plan(out, arch, phases, steps=steps, seq_len=seq_len, batch=batch, tokenizer=tokenizer,
                          rows=rows)]
    summary = {"arch": arch, "devices": devices, "steps": steps, "seq_len": seq_len, "global_batch": batch,
               "tokenizer": tokenizer, "total_wall_s": time.perf_counter() - tic,
               "steps_run": [{**asdict(s), "ok": s.ok, "bound_bytes": s.bound_bytes(devices)} for s in done]}
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "rehearsal.md").write_text(table(done, devices), encoding="utf-8")
    return done


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def table(steps: list[Step], devices: int) -> str:
    """The markdown table: one row per step."""
    rows = [f"| step | wall s | peak RSS GiB | per device state+batch / temporaries GiB | {devices} x (state + "
            "temporaries) GiB | checkpoint steps / final GiB | outcome |", "|---|---|---|---|---|---|---|"]
    for s in steps:
        per_dev = ("—" if s.state_gib_per_device is None
                   else f"{s.state_gib_per_device:.3f} / {s.temporaries_gib_per_device:.3f}")
        ckpt = ("—" if not s.checkpoint_bytes and s.final_bytes is None else
                f"{', '.join(_gib(b) for b in s.checkpoint_bytes)} / {_gib(s.final_bytes)}")
        outcome = "ok" if s.ok else f"**exit {s.rc}**: {s.last_line.replace('|', '/')}"
        rows.append(f"| {s.name} | {s.wall_s:.0f} | {_gib(s.peak_rss_bytes)} | {per_dev} | "
                    f"{_gib(s.bound_bytes(devices))} | {ckpt} | {outcome} |")
    return "\n".join(rows) + "\n"
