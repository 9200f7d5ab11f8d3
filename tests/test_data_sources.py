"""A source datasets cannot read is one line with the cause (`sources.cause_of`), not the first line of a
traceback."""
from __future__ import annotations

import pytest

from btx_jax.data import BUNDLED_TOKENIZER, DataError, load_tokenizer, make_pipeline
from btx_jax.data.sources import cause_of


def test_mismatched_columns_across_files_name_the_cause(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "b.jsonl").write_text('{"body": "hello world", "x": 1}\n')
    with pytest.raises(DataError) as e:
        pipe = make_pipeline({"kind": "pretrain", "sources": [{"path": str(tmp_path / "*.jsonl")}]},
                             load_tokenizer(BUNDLED_TOKENIZER), seq_len=32, global_batch_size=2)
        next(iter(pipe))
    line = str(e.value)
    assert "\n" not in line and '"""' not in line
    assert str(tmp_path) in line and "column names don't match" in line


def test_a_worker_traceback_gives_its_first_exception():
    """datasets with num_proc > 1 re-raises a worker's failure as its quoted traceback text."""
    worker = ('"""\nTraceback (most recent call last):\n  File "x.py", line 3, in f\n    g()\n'
              'ValueError: column names don\'t match\n  more context\n\nThe above exception was the direct cause\n"""')
    try:
        try:
            raise RuntimeError(worker)
        except RuntimeError as inner:
            raise OSError("An error occurred while generating the dataset") from inner
    except OSError as e:
        assert cause_of(e) == "ValueError: column names don't match more context"
    assert cause_of(KeyError()) == "KeyError"


def test_two_local_copies_laid_out_alike_read_their_own_rows(tmp_path, monkeypatch):
    """datasets keys a local hub-style folder's cache by its layout, not its path or contents: two copies with
    the same README `configs:` and file names would share one cache entry (the second read the first's rows).
    Each store keeps the Arrow files of its own copy."""
    from btx_jax.data.sources import Source, load_records
    from btx_jax.data.seed_corpora import hub_folder

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))    # one shared datasets cache, as for a user
    got = []
    for name, rows in (("a", 5), ("b", 2)):
        folder = hub_folder(tmp_path / name / "wikipedia", "20231101.ja",
                            [{"text": f"{name} {i}"} for i in range(rows)])
        source = Source(name="wikipedia_ja", path=(str(folder),), subset="20231101.ja")
        got.append(list(load_records(source, cache_dir=str(tmp_path / f"store_{name}" / "arrow"))["text"]))
    assert got == [[f"a {i}" for i in range(5)], [f"b {i}" for i in range(2)]]
