"""Bad input raises DataError with one line naming the file or field."""

import subprocess
import sys
from pathlib import Path

import pytest

from btx_jax.data import BUNDLED_TOKENIZER, DataError, bundled_source, load_tokenizer, make_pipeline

TOK = load_tokenizer(BUNDLED_TOKENIZER)


def build(sources, kind="pretrain"):
    return make_pipeline({"kind": kind, "sources": sources}, TOK, seq_len=32, global_batch_size=2)


def raises(match, sources, kind="pretrain"):
    with pytest.raises(DataError, match=match) as e:
        build(sources, kind)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    raises(r"file not found: .*nope\.jsonl", [{"path": str(tmp_path / "nope.jsonl")}])


def test_wrong_text_field():
    raises(
        r"field 'body' not in .*math/train\.jsonl \(columns: question, answer\)",
        [dict(bundled_source("math"), template=None, text_field="body")],
    )


def test_wrong_template_field():
    raises(r"field 'solution' not in", [dict(bundled_source("math"), template="{question} {solution}")])


def test_wrong_sft_field(tmp_path):
    raises(r"field 'response' not in", [dict(bundled_source("sft"), output_field="response")], kind="sft")


def test_empty_after_filtering():
    raises(
        r"source 'math': no documents left after filtering .*min_chars=100000",
        [dict(bundled_source("math"), min_chars=100_000)],
    )


@pytest.mark.parametrize(
    "ratios, match", [((1.0, -0.5), r"source 'math': ratio must be .* >= 0"), ((0.0, 0.0), r"ratios are all zero")]
)
def test_bad_ratios(ratios, match):
    raises(match, [bundled_source("wiki", ratios[0]), bundled_source("math", ratios[1])])


def test_non_utf8_text(tmp_path):
    path = tmp_path / "sjis.txt"
    path.write_bytes("吾輩は猫である。\n".encode("shift_jis"))
    raises(r"sjis\.txt is not UTF-8 text \(bad byte at offset 0\)", [{"path": str(path)}])


def test_tokenizer_larger_than_model():
    with pytest.raises(DataError, match=r"tokenizer .*tokenizer\.model has 4096 tokens"):
        TOK.check_fits(256)


def test_unknown_config_key():
    raises(r"unknown keys \['txt_field'\]", [dict(bundled_source("wiki"), txt_field="text")])


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    raises(r"empty\.jsonl is empty", [{"path": str(tmp_path / "empty.jsonl")}])


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    raises(r"broken\.jsonl line 4: Expecting value at column 10", [{"path": str(path)}])


def test_prepare_data_cli_one_line_and_exit_2(tmp_path):
    path = tmp_path / "sjis.txt"
    path.write_bytes("吾輩は猫である。\n".encode("shift_jis"))
    config = tmp_path / "config.py"
    config.write_text(
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'data': {"
        f"'kind': 'pretrain', 'tokenizer': {str(BUNDLED_TOKENIZER)!r}, 'sources': [{{'path': {str(path)!r}}}],"
        f" 'cache_dir': {str(tmp_path / 'cache')!r}}}}})\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "scripts/prepare_data.py"), f"--config={config}"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: source 'sjis': {path} is not UTF-8 text (bad byte at offset 0)"
    )
    assert "Traceback" not in out.stderr
