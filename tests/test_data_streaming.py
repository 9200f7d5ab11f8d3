"""Streaming sources: the same rows as the stored path, mixtures, exact resume, disjoint processes, errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_checks import check_resume, same

from btx_jax.data import BUNDLED_TOKENIZER, DataError, bundled_source, eval_batches, load_tokenizer, make_pipeline
from btx_jax.data import prepare, prepare_config, streaming

TOK = load_tokenizer(BUNDLED_TOKENIZER)


def records(domain):
    """The bundled held-out split of a domain as records (wiki: 251 articles/paragraphs, sft: 350)."""
    keys = ("instruction", "input", "output") if domain == "sft" else ("title", "text")  # one type per column
    with open(bundled_source(domain)["eval_path"], encoding="utf-8") as f:
        return [{k: json.loads(line)[k] for k in keys} for line in f]


def hub_dir(root: Path, rows, n_files=3, fmt="jsonl"):
    """A directory laid out like a hub dataset: data/train-0000i-of-0000n.{jsonl,parquet}."""
    (root / "data").mkdir(parents=True)
    for i in range(n_files):
        part = rows[i::n_files] if fmt == "parquet" else rows[i * len(rows) // n_files : (i + 1) * len(rows) // n_files]
        path = root / "data" / f"train-{i:05d}-of-{n_files:05d}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return str(root)


def pipe(tmp_path, sources, *, kind="pretrain", seq_len=64, batch=8, **options):
    cfg = {"kind": kind, "sources": sources, "cache_dir": str(tmp_path / "cache"), **options}
    keys = ("process_index", "process_count", "seed")
    return make_pipeline({k: v for k, v in cfg.items() if k not in keys}, TOK, seq_len=seq_len,
                         global_batch_size=batch, **{k: v for k, v in cfg.items() if k in keys})


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_RECORDS", 13)  # many blocks, carries and epochs in a short test


@pytest.mark.parametrize(
    "kind, options, fmt",
    [
        ("pretrain", {}, "jsonl"),
        ("pretrain", {"segment_ids": False, "add_bos": False}, "parquet"),
        ("pretrain", {"max_docs": 40, "min_chars": 200}, "jsonl"),
        ("sft", {}, "jsonl"),
        ("sft", {"overlong": "drop"}, "parquet"),
    ],
)
def test_same_batches_as_the_stored_source_without_shuffle(tmp_path, small_blocks, kind, options, fmt):
    path = hub_dir(tmp_path / "ds", records("wiki" if kind == "pretrain" else "sft"), fmt=fmt)
    source_keys = {k: options.pop(k) for k in ("max_docs", "min_chars") if k in options}
    src = {"name": "d", "path": path, **source_keys}
    stored = pipe(tmp_path, [src], kind=kind, shuffle=False, seq_len=128, batch=16, **options)
    streamed = pipe(tmp_path, [dict(src, streaming=True)], kind=kind, shuffle=False, seq_len=128, batch=16, **options)
    for _ in range(120):  # over two epochs of the 251 / 350 records
        assert same(next(stored), next(streamed))
    a, b = stored.stats(), streamed.stats()
    assert a["rows"] == b["rows"] and a["packing_efficiency"] == b["packing_efficiency"]
    assert int(a["epochs"]["d"]) == b["epochs"]["d"] >= 2
    assert b["documents"]["d"] >= a["documents"]["d"] * b["epochs"]["d"]  # documents read so far
    assert len(list((tmp_path / "cache").glob("d-*/meta.json"))) == 1  # the stored source's; streaming has none


def test_mixed_with_a_stored_source_at_the_configured_ratios(tmp_path):
    """A streaming hub-layout source + a stored jsonl source give exactly the all-stored batches."""
    wiki = {"name": "wiki", "path": hub_dir(tmp_path / "wiki", records("wiki")), "ratio": 0.6}
    math = dict(bundled_source("math", 0.4), path=bundled_source("math")["eval_path"])
    stored = pipe(tmp_path, [wiki, math], shuffle=False, seed=3)
    mixed = pipe(tmp_path, [dict(wiki, streaming=True), math], shuffle=False, seed=3)
    both = pipe(tmp_path, [dict(wiki, streaming=True), dict(math, streaming=True)], shuffle=False, seed=3)
    for _ in range(40):
        a, b, c = next(stored), next(mixed), next(both)
        assert same(a, b) and same(a, c)
    assert stored.stats()["rows"] == mixed.stats()["rows"] == both.stats()["rows"] == {"wiki": 192, "math": 128}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resume_continues_exactly(tmp_path, small_blocks, kind):
    rows = records("wiki")[::3] if kind == "pretrain" else records("sft")
    src = {"name": "d", "path": hub_dir(tmp_path / "ds", rows), "streaming": True}
    mix = [src, dict(bundled_source("math", 0.3), path=bundled_source("math")["eval_path"])]
    make = lambda **o: pipe(tmp_path, mix if kind == "pretrain" else [src], kind=kind, seed=7, seq_len=128, batch=16,
                            **o)
    straight, expected, state = check_resume(make, total=60, at=23)
    assert straight.stats()["epochs"]["d"] >= 1  # crossed an epoch boundary
    assert len(json.dumps(state)) < 20_000  # positions, not data: under one row of carried tokens per source
    on_demand = make(read_ahead=0)
    assert all(same(next(on_demand), b) for b in expected[:10])


class Stream:
    """A pipeline's rows back to back as one token stream (inputs + the last target of each row)."""

    def __init__(self, p):
        self.p, self.tokens = p, np.zeros(0, np.int32)

    def next_tokens(self, n_tokens):
        while len(self.tokens) < n_tokens:
            b = next(self.p)
            assert b["inputs"].shape == (self.p.local_batch_size, self.p.seq_len)
            rows = [np.concatenate([i, t[-1:]]) for i, t in zip(b["inputs"], b["targets"])]
            self.tokens = np.concatenate([self.tokens, *rows])
        out, self.tokens = self.tokens[:n_tokens], self.tokens[n_tokens:]
        return out

    def take(self, n_tokens):
        """The next n_tokens of the stream, cut into documents after each EOS."""
        return split_docs(self.next_tokens(n_tokens))

    def first_pass(self):
        """The documents up to the first one seen again (shuffle off: one pass over this process's part)."""
        tokens = np.zeros(0, np.int32)
        while True:
            tokens = np.concatenate([tokens, self.next_tokens(64)])
            docs = split_docs(tokens)[:-1]  # the last one may go on
            if docs.count(docs[0] if docs else None) > 1:
                return docs[: docs.index(docs[0], 1)]


def split_docs(tokens):
    return [tuple(int(t) for t in d) for d in np.split(tokens, np.flatnonzero(tokens == TOK.eos_id) + 1) if len(d)]


def doc(text):
    return tuple([TOK.bos_id] + TOK.encode(text) + [TOK.eos_id])


def test_shuffle_permutes_documents_within_each_pass(tmp_path, small_blocks):
    rows = [{"text": f"document {i} " + "word " * (i % 17)} for i in range(200)]
    src = {"name": "d", "path": hub_dir(tmp_path / "ds", rows), "streaming": True}
    shuffled, ordered = Stream(pipe(tmp_path, [src], seed=1)), Stream(pipe(tmp_path, [src], shuffle=False))
    per_pass = sum(map(len, map(doc, (r["text"] for r in rows))))
    first, in_order = shuffled.take(per_pass), ordered.take(per_pass)
    assert in_order == [doc(r["text"]) for r in rows]
    assert sorted(first) == sorted(in_order) and first != in_order
    second = shuffled.take(per_pass)
    assert sorted(second) == sorted(in_order) and second != first  # each pass: every document once, a new order


@pytest.mark.parametrize("n_files", [2, 3])  # whole files per process / every other record
def test_two_processes_read_disjoint_parts_whose_union_is_the_data(tmp_path, n_files):
    rows = [{"text": f"document number {i}"} for i in range(101)]
    src = {"name": "d", "path": hub_dir(tmp_path / "ds", rows, n_files=n_files), "streaming": True}
    procs = [pipe(tmp_path, [src], shuffle=False, seq_len=16, process_index=i, process_count=2) for i in range(2)]
    parts = [Stream(p).first_pass() for p in procs]
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(doc(r["text"]) for r in rows)
    procs[1].set_state(procs[1].get_state())
    assert procs[0].stats()["rows"] == {"d": 8 * procs[0].stats()["batches"]}  # global counts


def test_every_process_resumes_from_one_state_with_all_positions(tmp_path, small_blocks):
    """Multi-host resume: one state holding every process's position (what get_state gathers under JAX)."""
    src = {"name": "d", "path": hub_dir(tmp_path / "ds", records("wiki")[::3]), "streaming": True}
    make = lambda i: pipe(tmp_path, [src], seed=2, process_index=i, process_count=2)
    straight = [make(i) for i in range(2)]
    expected = [[next(p) for _ in range(30)] for p in straight]
    first = [make(i) for i in range(2)]
    for p in first:
        for _ in range(11):
            next(p)
    states = [json.loads(json.dumps(p.get_state())) for p in first]
    assert [sorted(s["streaming"]["positions"]) for s in states] == [["0"], ["1"]]  # no JAX runtime: its own
    merged = dict(states[0], streaming={"process_count": 2, "positions": {
        **states[0]["streaming"]["positions"], **states[1]["streaming"]["positions"]}})
    for i in range(2):
        resumed = make(i)
        resumed.set_state(merged)
        assert all(same(next(resumed), b) for b in expected[i][11:])
    with pytest.raises(DataError, match=r"positions of processes \['0'\] only, not of process 1") as e:
        make(1).set_state(states[0])
    assert "\n" not in str(e.value)


def test_resume_with_another_process_count_or_a_stored_state_is_refused(tmp_path):
    src = {"name": "d", "path": hub_dir(tmp_path / "ds", records("wiki")[:30]), "streaming": True}
    one = pipe(tmp_path, [src])
    next(one)
    two = pipe(tmp_path, [src], process_index=0, process_count=2)
    with pytest.raises(DataError, match=r"saved with process_count=1, this run has 2; streaming sources \['d'\]"):
        two.set_state(one.get_state())
    stored = pipe(tmp_path, [dict(src, streaming=False)])
    with pytest.raises(DataError, match="saved by a pipeline with streaming sources, this one has none"):
        stored.set_state(one.get_state())
    with pytest.raises(DataError, match="saved by a pipeline without streaming sources, this one has some"):
        one.set_state(stored.get_state())


def one_line_error(match, tmp_path, sources, **options):
    with pytest.raises(DataError, match=match) as e:
        pipe(tmp_path, sources, **options)
    assert "\n" not in str(e.value)


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    import datasets

    path = hub_dir(tmp_path / "ds", records("wiki")[:30])
    one_line_error(r"source 'd': field 'body' not in .*ds \(columns: title, text\)", tmp_path,
                   [{"name": "d", "path": path, "text_field": "body", "streaming": True}])
    one_line_error(r"source 'i': field 'instruction' not in", tmp_path,
                   [{"name": "i", "path": path, "streaming": True}], kind="sft")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    one_line_error(r"broken\.jsonl line 2: Expecting value at column 10", tmp_path,
                   [{"path": str(broken), "streaming": True}])
    sjis = tmp_path / "sjis.txt"
    sjis.write_bytes("吾輩は猫である。\n".encode("shift_jis"))
    one_line_error(r"sjis\.txt is not UTF-8 text \(bad byte at offset 0\)", tmp_path,
                   [{"path": str(sjis), "streaming": True}])
    one_line_error(r"source 'd': no documents left after filtering .*min_chars=100000", tmp_path,
                   [{"name": "d", "path": path, "min_chars": 100_000, "streaming": True}])
    one_line_error(r"no records in .* \(process 1 of 2\): fewer records than processes", tmp_path,
                   [{"name": "d", "path": hub_dir(tmp_path / "tiny", [{"text": "x"}], n_files=1), "streaming": True}],
                   process_index=1, process_count=2)
    one_line_error(r"workers=1 with streaming sources \['d'\]", tmp_path,
                   [{"name": "d", "path": path, "streaming": True}], workers=1)
    one_line_error(r"streaming must be True or False, not 'yes'", tmp_path,
                   [{"name": "d", "path": path, "streaming": "yes"}])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    one_line_error(r"cannot load hub dataset 'nosuch-org/nosuch' subset 'x'.*offline", tmp_path,
                   [{"path": "nosuch-org/nosuch:x", "streaming": True}])


def test_evaluation_and_prepare_data_skip_the_streamed_training_data(tmp_path, capsys):
    wiki = dict(bundled_source("wiki"), streaming=True)
    with pytest.raises(DataError, match=r"source 'train': streams its training data and has no eval_path"):
        next(eval_batches({"path": wiki["path"], "streaming": True}, TOK, seq_len=64, batch_size=2))
    assert next(eval_batches(wiki, TOK, seq_len=64, batch_size=2))["inputs"].shape == (2, 64)  # held-out: a store
    cfg = {"sources": [wiki], "cache_dir": str(tmp_path / "cache"), "tokenizer": str(BUNDLED_TOKENIZER)}
    (train, info), (valid, _) = prepare(cfg, TOK, progress=False)
    assert (train, info) == (wiki["path"], {"streaming": True}) and valid == wiki["eval_path"]
    prepare_config(cfg)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{wiki['path']}: streaming source, skipped (no store: it is read and tokenised while training)"
    assert out[1].startswith(f"{wiki['eval_path']}: 251 documents")


_JAX_PROCESS = """
import json, os, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from btx_jax.data import BUNDLED_TOKENIZER, load_tokenizer, make_pipeline
cfg = {"sources": [{"name": "d", "path": sys.argv[3], "streaming": True}]}
p = make_pipeline(cfg, load_tokenizer(BUNDLED_TOKENIZER), seq_len=32, global_batch_size=4,
                  process_index=jax.process_index(), process_count=2, seed=4)
for _ in range(5):
    next(p)
state = p.get_state()  # every process calls it, as the trainer does before saving the checkpoint
print(json.dumps({"state": state, "next": [next(p)["inputs"].tolist() for _ in range(3)]}))
"""


def test_get_state_gathers_every_process_position_under_multi_process_jax(tmp_path):
    path = hub_dir(tmp_path / "ds", records("wiki")[::5])
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", _JAX_PROCESS, address, str(i), path], cwd=repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["state"] == results[1]["state"]  # one state, what the primary process checkpoints
    assert sorted(results[0]["state"]["streaming"]["positions"]) == ["0", "1"]
    for i, result in enumerate(results):
        resumed = make_pipeline({"sources": [{"name": "d", "path": path, "streaming": True}]}, TOK, seq_len=32,
                                global_batch_size=4, process_index=i, process_count=2, seed=4)
        resumed.set_state(results[0]["state"])
        assert [next(resumed)["inputs"].tolist() for _ in range(3)] == result["next"]
