"""Data faults (issue 24): killed and interrupted store builds, store locks, changed or damaged data, bad records.

Killed builds run scripts/prepare_data.py as a real process with two tokenising processes and end it with real
signals; the other cases build tiny stores in-process. Every case asserts how it ends: exit code or exception,
one line naming the file, key or record, no traceback, and that a rerun gives a store identical to a clean build.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from btx_jax.config import ConfigError
from btx_jax.data import BUNDLED_TOKENIZER, DataError, bundled_source, load_tokenizer, make_pipeline, prepare
from btx_jax.data import store as store_lib
from btx_jax.data.interrupt import interruptible_build
from btx_jax.data.sources import Source, load_records
from btx_jax.disk import DiskError
from btx_jax.lock import held
from btx_jax.train import checkpoints
from btx_jax.train.validate import check_data
from conftest import REPO_ROOT, needs_mount, small_tmpfs

TOK = load_tokenizer(BUNDLED_TOKENIZER)
WIKI = Path(bundled_source("wiki")["path"])
FLAT = ("tokens.bin", "lengths.bin")


def run_prepare(config: Path, *extra: str, **kw) -> subprocess.Popen:
    """scripts/prepare_data.py in its own session (its tokenising processes are found by session id)."""
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts/prepare_data.py"), f"--config={config}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def data_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.py"
    path.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict("
                    f"{{'data': {{'kind': 'pretrain', 'tokenizer': {str(BUNDLED_TOKENIZER)!r}, **{data!r}}}}})\n")
    return path


def big_corpus(tmp_path: Path) -> Path:
    """~5.6 MB of jsonl: a process pool of 2 (store._BYTES_PER_PROC) and, at shard_mb=0.5, a dozen shards."""
    path = tmp_path / "corpus.jsonl"
    path.write_text(WIKI.read_text(encoding="utf-8") * 6, encoding="utf-8")
    return path


def session_processes(sid: int) -> list[int]:
    """PIDs of the live processes of session `sid` (field 6 of /proc/PID/stat), zombies excepted."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def finished_shards(cache: Path) -> int:
    return len(list(cache.glob("*/shards/*.json")))


def clean_build(corpus: Path, cache: Path, **cfg) -> Path:
    """The store of one uninterrupted in-process build without a process pool."""
    (_, info), = prepare({"sources": [{"path": str(corpus)}], "cache_dir": str(cache), "num_proc": 1, **cfg}, TOK,
                         held_out=False, progress=False)
    return Path(info["store"])


def assert_same_store(a: Path, b: Path) -> None:
    for name in FLAT:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = [{k: v for k, v in json.loads((p / "meta.json").read_text()).items() if k != "seconds"} for p in (a, b)]
    assert meta[0] == meta[1]


# ---- killed and interrupted builds -----------------------------------------------------------------------------

def interrupt(proc: subprocess.Popen, cache: Path, signum: int, after_shards: int) -> str:
    """Send `signum` to `proc` once `after_shards` shards are finished; its stderr after it ended."""
    wait_for(lambda: finished_shards(cache) >= after_shards or proc.poll() is not None, 120, "finished shards")
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signum)
    return proc.communicate(timeout=60)[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_killed_builds_leave_no_workers_and_the_rerun_finishes_identical(tmp_path):
    corpus, cache = big_corpus(tmp_path), tmp_path / "cache"
    config = data_config(tmp_path, {"sources": [{"path": str(corpus)}], "cache_dir": str(cache), "shard_mb": 0.5})

    stopped = run_prepare(config, "--num-proc=2")
    err = interrupt(stopped, cache, signal.SIGTERM, 1)
    assert stopped.returncode == 143 and "Traceback" not in err
    (store,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("corpus-")]
    kept, n = finished_shards(cache), len(json.loads((store / "store.json").read_text())["shards"])
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        f"interrupted by SIGTERM during the data store build: kept {kept} of {n} shards of {store}; rerun the same "
        "command to resume"]
    wait_for(lambda: not session_processes(stopped.pid), 10, "the tokenising processes to end")
    assert not Path(f"{store}.lock").exists()  # released

    killed = run_prepare(config, "--num-proc=2")  # resumes, then SIGKILL (as the out-of-memory killer sends)
    wait_for(lambda: finished_shards(cache) > kept or killed.poll() is not None, 120, "another finished shard")
    assert len(session_processes(killed.pid)) >= 3  # the script and its two tokenising processes
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    wait_for(lambda: not session_processes(killed.pid), 10, "the tokenising processes to die with their parent")
    assert not (store / "meta.json").exists() and Path(f"{store}.lock").read_text().startswith(f"PID {killed.pid} ")

    start = time.monotonic()
    rerun = run_prepare(config, "--num-proc=2")
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert time.monotonic() - start < 60
    assert "Traceback" not in err and "os.fork()" not in err
    assert f"[btx] warning: taking over the lock {store}.lock left by PID {killed.pid} on host" in err
    assert f"-> {store}" in out
    assert_same_store(store, clean_build(corpus, tmp_path / "clean", shard_mb=0.5))


def test_ctrl_c_during_a_build_is_one_line_and_130(capsys):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        with interruptible_build():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err == ("interrupted by SIGINT during the data store build: no store shard was "
                                       "finished; rerun the same command to resume\n")


def test_sigterm_while_the_trainer_builds_its_store(tmp_path):
    corpus, cache = big_corpus(tmp_path), tmp_path / "cache"
    config = tmp_path / "train_config.py"
    config.write_text("from btx_jax.configs import pretrain\n\ndef get_config():\n    c = pretrain.get_config('tiny')\n"
                      f"    c.data.sources = [dict(path={str(corpus)!r})]\n"
                      f"    c.data.update(cache_dir={str(cache)!r}, shard_mb=0.5, num_proc=1)\n"
                      "    c.train.update(steps=2, seq_len=32, global_batch_size=8)\n"
                      "    c.model.arch.num_layers = 1\n    return c\n")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts/train.py"), f"--config={config}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = interrupt(proc, cache, signal.SIGTERM, 1)
    assert proc.returncode == 143 and "Traceback" not in err
    (store,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("corpus-")]
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert line.startswith("interrupted by SIGTERM during the data store build: kept ") and f"shards of {store}" in line


# ---- the store lock ---------------------------------------------------------------------------------------------

def small_source(tmp_path: Path, n: int = 200) -> tuple[Path, dict]:
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(WIKI.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return corpus, {"sources": [{"path": str(corpus)}], "cache_dir": str(tmp_path / "cache")}


def the_store(cfg: dict) -> Path:
    (_, info), = prepare(cfg, TOK, held_out=False, progress=False)
    return Path(info["store"])


def test_a_waiting_build_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    corpus, cfg = small_source(tmp_path)
    path = store_lib.store_path(Source.from_dict(cfg["sources"][0]), TOK,
                                store_lib.pretrain_options(add_bos=True, add_eos=True), cfg["cache_dir"])
    config = data_config(tmp_path, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with held(Path(f"{path}.lock"), "store build"):
        waiter = run_prepare(config)
        line = wait_for(lambda: next((x for x in iter(waiter.stderr.readline, "") if "[btx]" in x), None), 60,
                        "the waiting line")
        assert line == f"[btx] waiting for {path}.lock: the store build is running in PID {os.getpid()} on host " \
                       f"{socket.gethostname()}\n"
        assert waiter.poll() is None
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and f"-> {path}" in out, err

    shutil.rmtree(path)
    Path(f"{path}.lock").write_text("PID 4194000 on host gone")  # what a SIGKILLed holder leaves
    assert the_store(cfg) == path
    assert [x for x in capsys.readouterr().err.splitlines() if "[btx]" in x] == [
        f"[btx] warning: taking over the lock {path}.lock left by PID 4194000 on host gone, which is no longer "
        "running"]


# ---- changed and damaged data -----------------------------------------------------------------------------------

def test_an_edit_that_keeps_size_and_mtime_is_rebuilt(tmp_path):
    corpus, cfg = small_source(tmp_path)
    before = the_store(cfg)
    stat = corpus.stat()
    text = corpus.read_text(encoding="utf-8")
    i = text.index('"text": "') + 9
    corpus.write_text(text[:i] + ("Z" if text[i] != "Z" else "Y") + text[i + 1:], encoding="utf-8")
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = the_store(cfg)
    assert after != before
    assert (after / "tokens.bin").read_bytes() != (before / "tokens.bin").read_bytes()
    assert the_store(cfg) == after  # the digest is remembered: an unchanged file is not hashed again
    (memo,) = (Path(cfg["cache_dir"]) / "digests").glob("*.json")
    assert json.loads(memo.read_text())["blake2b"] == hashlib.blake2b(corpus.read_bytes(), digest_size=16).hexdigest()


def test_damaged_store_files_are_refused_in_one_line(tmp_path):
    corpus, cfg = small_source(tmp_path)
    store = the_store(cfg)
    pristine = {name: (store / name).read_bytes() for name in FLAT}

    (store / "lengths.bin").write_bytes(pristine["lengths.bin"][: len(pristine["lengths.bin"]) // 2])
    with pytest.raises(DataError) as e:
        the_store(cfg)
    n = len(pristine["lengths.bin"])
    assert str(e.value) == (f"store {store}: lengths.bin is damaged ({n // 2:,} bytes, not {n:,}); delete the store "
                            f"and rebuild (rm -r {store})")

    (store / "lengths.bin").write_bytes(pristine["lengths.bin"])
    ids = np.random.default_rng(0).integers(0, TOK.vocab_size, len(pristine["tokens.bin"]) // 2, dtype=np.uint16)
    (store / "tokens.bin").write_bytes(ids.tobytes())  # same size, in-vocabulary ids
    for verify in ("sampled", "full"):
        with pytest.raises(DataError, match=f"store {store}: tokens.bin does not match its checksum \\({verify} "
                                            "blake2b\\); delete the store and rebuild"):
            the_store({**cfg, "verify": verify})


def test_the_sampled_checksum_reads_blocks_and_the_full_one_every_byte(tmp_path):
    path = tmp_path / "tokens.bin"
    data = bytearray(np.random.default_rng(0).bytes(5 << 20))
    path.write_bytes(data)
    full, sampled = store_lib._checksum(path, True), store_lib._checksum(path, False)
    assert full == hashlib.blake2b(data, digest_size=16).hexdigest() != sampled
    gap = store_lib._SAMPLE_BYTES + 100  # between the first and the second sampled block
    data[gap] ^= 1
    path.write_bytes(data)
    assert store_lib._checksum(path, False) == sampled and store_lib._checksum(path, True) != full
    data[gap] ^= 1
    data[-1] ^= 1  # the last block is sampled
    path.write_bytes(data)
    assert store_lib._checksum(path, False) != sampled


def test_resume_on_a_replaced_corpus_is_refused_unless_allowed(tmp_path):
    corpus, cfg = small_source(tmp_path)
    first = make_pipeline(cfg, TOK, seq_len=64, global_batch_size=4, seed=0)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    (old,) = state["stores"].values()
    lines = WIKI.read_text(encoding="utf-8").splitlines(keepends=True)
    corpus.write_text("".join(lines[200:400]), encoding="utf-8")
    replaced = make_pipeline(cfg, TOK, seq_len=64, global_batch_size=4, seed=0)
    new = replaced.store_names["small"]
    with pytest.raises(DataError) as e:
        replaced.set_state(copy.deepcopy(state))
    assert str(e.value) == (f"data state: source 'small' was trained on store {old} and its data now makes store "
                            f"{new} (the corpus, tokenizer or formatting changed); restore the data, or set "
                            "data.allow_changed_data=True to resume on the new data")
    allowed = make_pipeline({**cfg, "allow_changed_data": True}, TOK, seq_len=64, global_batch_size=4, seed=0)
    allowed.set_state(state)
    assert allowed.get_state()["batch_index"] == 3 and next(allowed)["inputs"].shape == (4, 64)
    # the override may be added to the config of a resumed run
    saved = {"data": {"sources": cfg["sources"]}}
    checkpoints.check_compatible(saved, {"data": {**saved["data"], "allow_changed_data": True}}, tmp_path)


# ---- records ----------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dropped_records_are_counted_per_reason_printed_and_kept_in_meta(tmp_path, capsys):
    rows = [{"text": f"document number {i}"} for i in range(20)]
    rows[3]["text"] = rows[7]["text"] = None
    rows[5]["text"] = ""
    rows[9]["text"] = "x" * 500
    corpus = write_jsonl(tmp_path / "docs.jsonl", rows)
    config = data_config(tmp_path, {"sources": [{"path": str(corpus), "max_chars": 100}],
                                    "cache_dir": str(tmp_path / "cache")})
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/prepare_data.py"), f"--config={config}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    reasons = "longer than max_chars=100: 1, null text: 2, shorter than min_chars=1: 1"
    assert f"[btx] docs: 20 records read, dropped 4 records ({reasons})" in out.stderr.splitlines()
    (line,) = out.stdout.splitlines()
    assert line.startswith(f"{corpus}: 16 documents, ") and f", dropped 4 records ({reasons}) -> " in line
    meta = json.loads((Path(line.split(" -> ")[1]) / "meta.json").read_text())
    assert meta["dropped_records"] == {"null text": 2, "shorter than min_chars=1": 1, "longer than max_chars=100": 1}
    assert meta["documents"] == 16 and meta["filtered"] == 4


def test_sft_record_without_a_field_is_refused_or_skipped(tmp_path):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]
    del rows[6]["output"]
    corpus = tmp_path / "sft.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows[:4]) + "\n" + "".join(json.dumps(r) + "\n" for r in rows[4:])
    corpus.write_text(text, encoding="utf-8")  # a blank line: line numbers are not row numbers
    cfg = {"kind": "sft", "sources": [{"path": str(corpus)}], "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError) as e:
        the_store(cfg)
    assert str(e.value) == (f"source 'sft': {corpus} line 8: the record has no 'output' (set "
                            "data.skip_bad_records=True to skip such records)")
    (_, info), = prepare({**cfg, "skip_bad_records": True}, TOK, held_out=False, progress=False)
    assert info["documents"] == 9 and info["dropped"] == {"no output": 1}


def test_sft_refusal_from_a_tokenising_process(tmp_path):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(1500)]
    rows[1200]["instruction"] = None  # in the second batch of 1000 records
    corpus = write_jsonl(tmp_path / "sft.jsonl", rows)
    source = Source.from_dict({"path": str(corpus)})
    records = load_records(source, cache_dir=str(tmp_path / "arrow"))
    encoder = store_lib.Encoder(source, TOK, store_lib.sft_options(TOK, add_bos=True, chat_template="auto"))
    with pytest.raises(DataError) as e:
        with store_lib.TokenizingPool(records, encoder, "uint16", procs=2) as pool:
            list(pool.encode(0, len(rows)))
    assert str(e.value) == (f"source 'sft': {corpus} line 1201: the record has no 'instruction' (set "
                            "data.skip_bad_records=True to skip such records)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_a_killed_tokenising_process_is_one_line(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(40_000)])
    source = Source.from_dict({"path": str(corpus)})
    encoder = store_lib.Encoder(source, TOK, store_lib.pretrain_options(add_bos=True, add_eos=True))
    with pytest.raises(DataError) as e:
        with store_lib.TokenizingPool(load_records(source, cache_dir=str(tmp_path / "arrow")), encoder, "uint16",
                                      procs=2) as pool:
            batches = pool.encode(0, 40_000)
            next(batches)
            children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
            workers = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
            os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
            list(batches)
    assert str(e.value).startswith("source 'docs': a tokenising process died (killed for lack of memory? ")


@pytest.mark.parametrize("key, value, message", [
    ("shard_mb", -1, "data.shard_mb=-1: must be a number of MB > 0 or None"),
    ("num_proc", 0, "data.num_proc=0: must be an integer >= 1 or None"),
    ("num_proc", True, "data.num_proc=True: must be an integer >= 1 or None"),
    ("workers", 1.5, "data.workers=1.5: must be an integer >= 0"),
    ("shuffle", "yes", "data.shuffle='yes': must be True or False"),
    ("overlong", "cut", "data.overlong='cut': must be one of truncate, drop"),
    ("verify", "some", "data.verify='some': must be one of sampled, full"),
    ("cache_dir", 3, "data.cache_dir=3: must be a directory path or None"),
    ("sources", [], "data.sources=[]: must be a non-empty list of source dicts"),
    ("shard_size", 1, "unknown config key 'data.shard_size' (did you mean 'data.shard_mb'?)"),
])
def test_data_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError) as e:
        check_data({"kind": "pretrain", "sources": [{"path": "x"}], key: value})
    assert str(e.value) == message


def test_data_key_refused_by_the_cli_before_any_work(tmp_path):
    config = data_config(tmp_path, {"sources": [{"path": str(WIKI)}], "cache_dir": str(tmp_path / "cache"),
                                    "shard_mb": -1})
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/prepare_data.py"), f"--config={config}"],
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (2, "error: data.shard_mb=-1: must be a number of MB > 0 or None\n")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("ratios, message", [
    ([True, 1.0], "source 'a': ratio must be a finite number >= 0, got True"),
    ([1e308, 1e308], "mixture ratios sum to infinity (sources: a, b); they are relative weights: use smaller "
                     "numbers such as 1 and 3"),
])
def test_bad_ratios_one_line_before_tokenising(tmp_path, ratios, message):
    corpus, _ = small_source(tmp_path, 20)
    cfg = {"sources": [{"name": n, "path": str(corpus), "ratio": r} for n, r in zip("ab", ratios)],
           "cache_dir": str(tmp_path / "cache")}
    for build in (lambda: make_pipeline(cfg, TOK, seq_len=16, global_batch_size=2),
                  lambda: prepare(cfg, TOK, held_out=False, progress=False)):
        with pytest.raises(DataError) as e:
            build()
        assert str(e.value) == message
    assert not list((tmp_path / "cache").glob("*/tokens.bin"))


def test_an_integer_text_field_is_one_line(tmp_path):
    corpus = write_jsonl(tmp_path / "ints.jsonl", [{"text": i} for i in range(5)])
    with pytest.raises(DataError) as e:
        the_store({"sources": [{"path": str(corpus)}], "cache_dir": str(tmp_path / "cache")})
    assert str(e.value) == (f"source 'ints': field 'text' of {corpus} holds int64 values, not text (set text_field, "
                            "or a template such as '{text}')")


@needs_mount
def test_a_full_cache_dir_is_a_disk_error_naming_it(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "64k") as mnt:
        with pytest.raises(DiskError) as e:
            the_store({"sources": [{"path": str(WIKI)}], "cache_dir": str(mnt)})
        (store,) = [p for p in mnt.iterdir() if p.is_dir() and p.name != "digests"]
        assert str(e.value) == (f"{store / 'arrow'}: no space left on device; earlier results are untouched: free "
                                "space and rerun")
