"""KV-cached generation: greedy equals repeated full forward passes and HF's greedy generate; seeded sampling
is reproducible; top_p restricts samples to the nucleus (and a tiny top_p is greedy)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import btx_jax
from conftest import LLAMA3_ROPE, hf_model, random_ids

PROMPT, NEW = 6, 10


@pytest.fixture(scope="module")
def setup(hf_llama):
    directory = hf_llama(num_key_value_heads=2, head_dim=24, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    return directory, btx_jax.load_pretrained(directory), random_ids(2, PROMPT, seed=7)


def _full_forward_logits(pre, tokens):
    """Logits of a full (uncached) forward pass over `tokens`, padded to one fixed length so that a single
    compiled shape serves every step (causal: the padding after position t cannot change logits at t)."""
    buf = np.zeros((tokens.shape[0], PROMPT + NEW), np.int32)
    buf[:, :tokens.shape[1]] = tokens
    return pre.logits(buf)[:, tokens.shape[1] - 1]


def test_greedy_kv_cache_equals_repeated_full_forward(setup):
    _, pre, prompt = setup
    out = pre.generate(prompt, NEW)
    assert out.shape == (2, PROMPT + NEW)
    np.testing.assert_array_equal(out[:, :PROMPT], prompt)
    tokens = prompt
    for _ in range(NEW):
        nxt = np.argmax(_full_forward_logits(pre, tokens), axis=-1).astype(np.int32)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, tokens)
    assert len(np.unique(out[:, PROMPT:])) > 1          # not a degenerate constant output


def test_greedy_matches_transformers_generate(setup):
    import torch
    directory, pre, prompt = setup
    model = hf_model(directory)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt, dtype=torch.long),
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(pre.generate(prompt, NEW), ref.numpy())


def test_sampling_is_reproducible_with_seed(setup):
    _, pre, prompt = setup
    a = pre.generate(prompt, NEW, temperature=1.0, seed=3)
    b = pre.generate(prompt, NEW, temperature=1.0, seed=3)
    c = pre.generate(prompt, NEW, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :PROMPT], prompt)
    assert a.min() >= 0 and a.max() < pre.config.vocab_size


def test_tiny_top_p_is_greedy(setup):
    _, pre, prompt = setup
    greedy = pre.generate(prompt, NEW)
    for seed in (0, 1):
        np.testing.assert_array_equal(pre.generate(prompt, NEW, temperature=1.0, top_p=1e-6, seed=seed), greedy)


def _nucleus_ranks(pre, tokens, temperature):
    """For every generated token: (its rank in the step's sorted distribution, size of the 0.3 nucleus)."""
    ranks, sizes = [], []
    for t in range(PROMPT, PROMPT + NEW):
        logits = _full_forward_logits(pre, tokens[:, :t]) / temperature
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        order = np.argsort(-probs, axis=-1)
        exclusive = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
        sizes.append(np.sum(exclusive < 0.3, axis=-1))
        ranks.append(np.argmax(order == tokens[:, t:t + 1], axis=-1))
    return np.stack(ranks), np.stack(sizes)


def test_top_p_samples_stay_in_nucleus(setup):
    _, pre, prompt = setup
    prompt8 = np.repeat(prompt, 4, axis=0)               # 8 rows x 10 steps of samples
    nucleus = pre.generate(prompt8, NEW, temperature=1.5, top_p=0.3, seed=0)
    ranks, sizes = _nucleus_ranks(pre, nucleus, 1.5)
    assert np.all(ranks < sizes), "a top_p=0.3 sample fell outside the nucleus"
    assert np.max(sizes) > 1                              # the nucleus is not trivially the argmax
    free = pre.generate(prompt8, NEW, temperature=1.5, top_p=1.0, seed=0)
    ranks, sizes = _nucleus_ranks(pre, free, 1.5)
    assert np.any(ranks >= sizes), "without top_p some samples should fall outside the 0.3 nucleus"


def test_zero_new_tokens_is_refused(setup):
    from btx_jax.model.generate import InputError
    _, pre, prompt = setup
    with pytest.raises(InputError, match="max_new_tokens=0"):
        pre.generate(prompt, 0)


# ---- the tokenizer that goes with a model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_300(tmp_path_factory):
    """A real 300-piece sentencepiece model trained on the bundled math text (not the bundled 4,096 one)."""
    import json

    import sentencepiece as spm
    from btx_jax.data import BUNDLED_DATA_DIR
    root = tmp_path_factory.mktemp("spm")
    lines = [json.loads(l)["question"] for l in (BUNDLED_DATA_DIR / "math" / "valid.jsonl").read_text().splitlines()]
    (root / "text.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "t"), vocab_size=300,
                                   character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    return root / "t.model"


def test_default_tokenizer_follows_the_model(hf_llama, spm_300, tmp_path):
    """Saved with the model; else saved where its lean chain is built on; else recorded by the training run of a
    final (run_info.json); else the bundled one only for a model of exactly its vocabulary; else one error."""
    import shutil

    from btx_jax.checkpoint import btx
    from btx_jax.data import BUNDLED_TOKENIZER, DataError
    from btx_jax.eval.textgen import model_tokenizer

    bare = hf_llama(vocab_size=300)
    with_tok = tmp_path / "with_tok"
    shutil.copytree(bare, with_tok)
    shutil.copy(spm_300, with_tok / "tokenizer.model")
    assert model_tokenizer(with_tok, 300).path == str(with_tok / "tokenizer.model")

    pre = btx_jax.load_pretrained(bare)
    lean = tmp_path / "lean"                        # a lean btx checkpoint built on with_tok
    lean.mkdir()
    btx.save(lean, pre.config, {"final_norm/scale": pre.params["final_norm"]["scale"]}, {"path": str(with_tok), "digest": "0" * 32})
    # (the digest is not checked by the tokenizer lookup, only that frozen_from carries one)
    assert model_tokenizer(lean, 300).path == str(with_tok / "tokenizer.model")

    version = tmp_path / "run" / btx.FINALS / "5-abcdef12"       # a run's final, as the trainer publishes it
    pre.save_pretrained(version, format="btx")
    btx.point_final(tmp_path / "run" / "final", version)
    (tmp_path / "run" / "run_info.json").write_text(json.dumps({"config": {"data": {"tokenizer": str(spm_300)}}}))
    assert model_tokenizer(tmp_path / "run" / "final", 300).path == str(spm_300)

    assert model_tokenizer(hf_llama(vocab_size=4096), 4096).path == str(BUNDLED_TOKENIZER)
    with pytest.raises(DataError, match="no tokenizer saved with the model.*pass --tokenizer"):
        model_tokenizer(bare, 300)
    with pytest.raises(DataError, match="has 4096 tokens but .* vocabulary of 32000"):
        model_tokenizer(bare, 32000, tokenizer=BUNDLED_TOKENIZER)
    assert model_tokenizer(bare, 384, tokenizer=spm_300).vocab_size == 300       # an embedding padded to 128s


def test_generate_cli_refuses_a_tokenizer_of_another_vocabulary_before_decoding(hf_llama):
    """The bundled 4,096-piece tokenizer on a 32,000-vocab model: one line, exit 2 (it used to decode into an
    IndexError); without --tokenizer the model's own is used (here: saved with it)."""
    import subprocess
    import sys
    from pathlib import Path

    from btx_jax.data import BUNDLED_TOKENIZER
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "scripts/generate.py", "--model", str(hf_llama(vocab_size=32000)), "--prompt", "hi",
           "--max-new-tokens", "2", "--tokenizer", str(BUNDLED_TOKENIZER)]
    bad = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    assert "4096 tokens" in bad.stderr and "32000" in bad.stderr and "--tokenizer" in bad.stderr
