"""SFT: loss mask exactly on response tokens (+ closing EOS), templates, over-long handling."""

import json
import shutil

import numpy as np
import pytest

from btx_jax.data import BUNDLED_TOKENIZER, bundled_source, load_tokenizer, make_pipeline

TOK = load_tokenizer(BUNDLED_TOKENIZER)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def examples(batch):
    """(input tokens incl. the last target, loss mask over targets) of every packed example."""
    out = []
    for inp, tgt, seg, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_mask"]):
        for s in np.unique(seg[seg > 0]):
            sel = seg == s
            out.append((np.concatenate([inp[sel], tgt[sel][-1:]]), tgt[sel], mask[sel]))
    return out


def test_loss_mask_covers_exactly_the_response():
    src = bundled_source("sft")
    with open(src["path"], encoding="utf-8") as f:
        outputs = {json.loads(line)["output"] for line in f}
    p = make_pipeline({"kind": "sft", "sources": [src]}, TOK, seq_len=256, global_batch_size=4)
    b = next(p)
    exs = examples(b)
    assert len(exs) > 4  # rows hold several examples
    for tokens, targets, mask in exs:
        response = targets[mask == 1]
        assert response[-1] == TOK.eos_id and (response[:-1] != TOK.eos_id).all()
        assert TOK.decode(response[:-1]) in outputs
        prompt = TOK.decode(tokens[: len(tokens) - len(response)])
        assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
        assert tokens[0] == TOK.bos_id
    for seg, pos in zip(b["segment_ids"], b["positions"]):
        for s in np.unique(seg[seg > 0]):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    assert 0 < p.stats()["packing_efficiency"] <= 1


def test_messages_with_default_template(tmp_path):
    chat = [
        {"role": "user", "content": "2+2は?"},
        {"role": "assistant", "content": "4です。"},
        {"role": "user", "content": "3+3は?"},
        {"role": "assistant", "content": "6です。"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 3)
    p = make_pipeline(
        {"kind": "sft", "shuffle": False, "sources": [{"path": path, "system": "簡潔に。"}]},
        TOK,
        seq_len=128,
        global_batch_size=1,
    )
    tokens, targets, mask = examples(next(p))[0]
    spans = np.split(targets, np.flatnonzero(np.diff(mask)) + 1)
    masked = [s for s, m in zip(spans, np.split(mask, np.flatnonzero(np.diff(mask)) + 1)) if m[0] == 1]
    assert [TOK.decode(s[:-1]) for s in masked] == ["4です。", "6です。"]
    assert all(s[-1] == TOK.eos_id for s in masked)
    # pieces are tokenised one by one, so sentencepiece's dummy prefix puts a space before each piece
    assert TOK.decode(tokens).startswith("### System:\n簡潔に。\n\n ### User:\n2+2は?\n\n ### Assistant:\n 4です。")


def test_tokenizer_chat_template(tmp_path):
    from transformers import LlamaTokenizer

    (tmp_path / "sp").mkdir()
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "sp" / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path / "sp"))
    hf.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    hf.save_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.chat_template is not None
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "首都は?", "input": "日本", "output": "東京"}])
    p = make_pipeline({"kind": "sft", "sources": [{"path": path}]}, tok, seq_len=64, global_batch_size=1)
    tokens, targets, mask = examples(next(p))[0]
    assert tok.decode(targets[mask == 1]).replace(" ", "") == "東京</s>"
    assert tok.decode(tokens).startswith("<|user|>首都は?\n\n日本<|assistant|>")


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_examples_counted(tmp_path, overlong):
    records = [
        {"instruction": "q", "input": "", "output": "短い答え"},
        {"instruction": "長い" * 100, "input": "", "output": "答え" * 40},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    p = make_pipeline(
        {"kind": "sft", "overlong": overlong, "sources": [{"path": path}]}, TOK, seq_len=48, global_batch_size=2
    )
    stats = p.stats()  # the prompt alone fills the row: no response token left -> dropped either way
    assert (stats["truncated"], stats["dropped"]) == ({"sft": 0}, {"sft": 1})
    records[1]["instruction"] = "長い" * 5
    write_jsonl(tmp_path / "sft2.jsonl", records)
    p = make_pipeline(
        {"kind": "sft", "overlong": overlong, "sources": [{"path": str(tmp_path / "sft2.jsonl")}]},
        TOK,
        seq_len=48,
        global_batch_size=2,
    )
    expected = ({"sft2": 1}, {"sft2": 0}) if overlong == "truncate" else ({"sft2": 0}, {"sft2": 1})
    assert (p.stats()["truncated"], p.stats()["dropped"]) == expected
    b = next(p)
    assert b["segment_ids"].max() >= 1 and (b["loss_mask"].sum(axis=1) > 0).all()
