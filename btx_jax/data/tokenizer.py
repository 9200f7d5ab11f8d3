"""Tokenizers: plain sentencepiece `.model` files and Hugging Face tokenizer directories.

`load_tokenizer(path)` accepts
  - a sentencepiece model file (`*.model`),
  - a Hugging Face tokenizer directory (`tokenizer.json` and/or `tokenizer_config.json`, loaded with
    `transformers.AutoTokenizer`, which also reads a sentencepiece `tokenizer.model` there),
  - a directory holding only a sentencepiece `tokenizer.model`.
`encode` never adds BOS/EOS unless asked (`add_bos`/`add_eos`); the pipeline adds them per config.
`pad_id` is the tokenizer's pad id, or its EOS id when it has none (pad positions are always masked
by `loss_mask == 0` and `segment_ids == 0`, so the value only has to be a valid id).
`fingerprint` hashes the tokenizer's own files only (`TOKENIZER_FILES`, streamed), never the weights of a model
directory it is loaded from; a directory holding only `tokenizer.model` and that file have the same one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from btx_jax.data import bundled
from btx_jax.data.errors import DataError

_HF_FILES = ("tokenizer.json", "tokenizer_config.json")
# A transformers tokenizer's own files (model, vocabulary, merges, configuration): only these make its
# fingerprint, never the model weights beside them.
TOKENIZER_FILES = _HF_FILES + ("tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                               "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
_CHUNK = 1 << 20


class Tokenizer:
    """One interface over a sentencepiece processor or a transformers tokenizer."""

    def __init__(self, path: str, *, sp=None, hf=None, fingerprint: str):
        self.path = path
        self._sp, self._hf = sp, hf
        self.fingerprint = fingerprint  # content hash, keys the token cache
        if sp is not None:
            self.vocab_size = sp.get_piece_size()
            self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
            self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
        else:
            self.vocab_size = len(hf)
            self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
            self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        if self.eos_id is None or self.eos_id < 0:
            raise DataError(f"tokenizer {path}: has no EOS token, which packing needs")

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.encode_batch([text])[0]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, no special tokens added. `num_threads`: sentencepiece's threads (-1: every
        core; the store's tokenising processes use 1 each, their parallelism is the process count)."""
        if self._sp is not None:
            return self._sp.encode(list(texts), num_threads=num_threads)
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode_as_tokenizer_default(self, text: str) -> list[int]:
        """Ids with the special tokens the tokenizer itself adds by default: a transformers tokenizer's
        `encode(text)` (add_special_tokens=True), or BOS + text for sentencepiece (as Llama's tokenizers do).
        This is what lm-evaluation-harness feeds a model."""
        if self._sp is not None:
            return self.encode(text, add_bos=self.bos_id is not None and self.bos_id >= 0)
        return list(self._hf.encode(text))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return getattr(self._hf, "chat_template", None) if self._hf is not None else None

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The tokenizer's own chat template applied to `messages`, as text."""
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def check_fits(self, model_vocab_size: int) -> None:
        """Raise DataError if some token id would index past the model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"tokenizer {self.path} has {self.vocab_size} tokens but the model's embedding "
                f"has only {model_vocab_size} rows (vocab_size)"
            )

    def __repr__(self) -> str:
        kind = "sentencepiece" if self._sp is not None else type(self._hf).__name__
        return f"Tokenizer({self.path!r}, {kind}, vocab_size={self.vocab_size})"


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Function form of `Tokenizer.check_fits`."""
    tokenizer.check_fits(vocab_size)


def _digest(files: dict[str, Path]) -> str:
    """Content hash of {role: file}, read in 1 MiB chunks (a role is the file's name in a tokenizer directory,
    so a sentencepiece model has one fingerprint whatever its file is called or where it lies)."""
    h = hashlib.sha256()
    for role, path in sorted(files.items()):
        h.update(f"{role}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"tokenizer {path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
    return Tokenizer(str(path), sp=sp, fingerprint=_digest({"tokenizer.model": path}))


def _load_hf(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer {path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    files = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    return Tokenizer(str(path), hf=hf, fingerprint=_digest(files))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece `.model` file or a tokenizer directory (see module docstring); "bundled:..." names
    a file shipped with the package."""
    path = Path(bundled.resolve(path))
    if not path.exists():
        raise DataError(f"tokenizer not found: {path}")
    if path.is_file():
        return _load_sentencepiece(path)
    if any((path / f).exists() for f in _HF_FILES):
        return _load_hf(path)
    if (path / "tokenizer.model").exists():
        return _load_sentencepiece(path / "tokenizer.model")
    raise DataError(f"tokenizer directory {path} has none of tokenizer.json, tokenizer_config.json, tokenizer.model")
