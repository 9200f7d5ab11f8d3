"""Datasets of the offline tasks: JSON-lines files read with `datasets`' json builder (no hub access).
The harness calls these through `custom_dataset: !function data.NAME` with the task's `dataset_kwargs`."""
from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(task: str, splits: tuple[str, ...], data_files: dict | None) -> datasets.DatasetDict:
    files = data_files or {s: str(HERE / f"{task}_{s}.jsonl") for s in splits}
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{task}: data file for split {split!r} not found: {path}")
    return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})


def jcommonsenseqa(data_files: dict | None = None, **_) -> datasets.DatasetDict:
    return _load("jcommonsenseqa", ("train", "validation"), data_files)


def jsquad(data_files: dict | None = None, **_) -> datasets.DatasetDict:
    return _load("jsquad", ("train", "validation"), data_files)


def gsm8k(data_files: dict | None = None, **_) -> datasets.DatasetDict:
    return _load("gsm8k", ("train", "test"), data_files)
