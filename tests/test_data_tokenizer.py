"""Tokenizer loading against real references: sentencepiece itself and transformers."""

import shutil

import pytest
import sentencepiece as spm

from btx_jax.data import BUNDLED_TOKENIZER, DataError, check_vocab_fits, load_tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "吾輩は猫である。名前はまだ無い。",
    "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72",
    "two  spaces\n\nand 😀 emoji",
]


def test_sentencepiece_model_matches_sentencepiece():
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_TOKENIZER))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (4096, 1, 2, 3)
    assert sp.unk_id() == 0
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, add_bos=True, add_eos=True) == [1] + sp.encode(text) + [2]
        assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback


def test_hf_directory_matches_transformers(tmp_path):
    from transformers import LlamaTokenizer

    sp_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
    sp_dir.mkdir()
    shutil.copy(BUNDLED_TOKENIZER, sp_dir / "tokenizer.model")
    assert load_tokenizer(sp_dir).encode(TEXTS[1]) == load_tokenizer(BUNDLED_TOKENIZER).encode(TEXTS[1])
    reference = LlamaTokenizer.from_pretrained(str(sp_dir))
    reference.save_pretrained(str(hf_dir))
    tok = load_tokenizer(hf_dir)
    assert tok.vocab_size == len(reference) == 4096
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    for text in TEXTS:
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == load_tokenizer(BUNDLED_TOKENIZER).encode(text)


def test_tokenizer_larger_than_model_vocab():
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    tok.check_fits(4096)
    with pytest.raises(DataError, match=r"4096 tokens .* only 512 rows") as e:
        check_vocab_fits(tok, 512)
    assert "\n" not in str(e.value)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")


def test_fingerprint_covers_the_tokenizer_files_only(tmp_path):
    """A model directory's weights and model config do not enter the fingerprint (they are not read: a 7B
    directory would be hashed whole); a directory holding only tokenizer.model and that file (under any name)
    have one fingerprint; a change to a tokenizer file changes it."""
    from transformers import LlamaTokenizer

    sp_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
    sp_dir.mkdir()
    shutil.copy(BUNDLED_TOKENIZER, sp_dir / "tokenizer.model")
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "renamed.model")
    LlamaTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(hf_dir))
    bare, hf = load_tokenizer(sp_dir).fingerprint, load_tokenizer(hf_dir).fingerprint
    assert bare == load_tokenizer(BUNDLED_TOKENIZER).fingerprint == load_tokenizer(tmp_path / "renamed.model").fingerprint
    for d in (sp_dir, hf_dir):
        (d / "config.json").write_text('{"vocab_size": 4096}')
        (d / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    assert (load_tokenizer(sp_dir).fingerprint, load_tokenizer(hf_dir).fingerprint) == (bare, hf)
    (hf_dir / "model.safetensors").write_bytes(b"\1" * 1_000_000)
    assert load_tokenizer(hf_dir).fingerprint == hf
    config = hf_dir / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"model_max_length": 77, ', 1))
    assert load_tokenizer(hf_dir).fingerprint != hf
