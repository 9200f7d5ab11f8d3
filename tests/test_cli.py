"""btx_jax/cli/: the `btx` dispatcher (its command list, unknown commands), configs by name or path, flag typos
and bad values as one stderr line and exit 2, byte sizes of size flags (decimal and binary units, the forms
`btx plan` and `btx convert` accept) and their one-line refusals."""
from __future__ import annotations

from pathlib import Path

import pytest

from btx_jax.command_line import ArgumentParser, parse_bytes, size_flag
from btx_jax.cli.main import COMMANDS, main
from btx_jax.config import ConfigError
from btx_jax.configs import DIR, resolve


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_btx_alone_lists_every_command_with_one_line(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name, (_, line) in COMMANDS.items():
        assert f"  {name} " in out and line in out
    assert {"train", "prepare-data", "plan", "compose", "convert", "evaluate", "generate", "demo", "lm-eval",
            "chain", "rehearse"} <= set(COMMANDS)


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian", "--config=expert:synthetic"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: btx: unknown command 'trian' (did you mean train?); the commands: {', '.join(COMMANDS)}"]


def _exit_code(argv) -> int:
    """`btx ARGV`'s exit code, whether the command returns it or raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_the_flags_and_an_example(command, capsys):
    if command == "lm-eval":
        pytest.importorskip("lm_eval")
    assert _exit_code([command, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.lstrip().startswith("-") for line in lines), lines           # the options, each documented
    examples = [line for line in lines if f"btx {command} " in line and not line.startswith("usage:")]
    assert any(len(line.split(f"btx {command} ", 1)[1].split()) >= 1 for line in examples), lines


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_an_unknown_flag_in_one_line(command, capsys):
    """One usage-error style for all: `error: ...` alone on stderr, exit 2 (argparse's usage text is not printed)."""
    if command == "lm-eval":
        pytest.importorskip("lm_eval")
    assert _exit_code([command, "--no-such-flag=1"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("error: "), err


@pytest.mark.parametrize("spec,want", [
    ("expert:wiki,tiny", f"{DIR / 'expert.py'}:wiki,tiny"), ("expert.py:wiki", f"{DIR / 'expert.py'}:wiki"),
    ("configs/expert.py:wiki", f"{DIR / 'expert.py'}:wiki"),       # the docs' form from before configs/ moved
    ("router:", f"{DIR / 'router.py'}:"), ("sft", f"{DIR / 'sft.py'}"),
    ("my/own.py:x", "my/own.py:x"), ("common:x", "common:x"),
])
def test_configs_resolve_by_name_or_stay_a_path(spec, want):
    assert resolve(spec) == want


def test_a_config_file_of_that_name_here_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("expert.py").write_text("def get_config(p=''):\n    return None\n")
    assert resolve("expert.py:wiki") == "expert.py:wiki"


@pytest.mark.parametrize("argv,line", [
    (["train", "--config=expert:synthetic", "--wrkdir=/tmp/x"], "error: Unknown command line flag 'wrkdir'"),
    (["train", "--config=expert:synthetic", "--workdir=/tmp/x", "--config.train.stepz=2"],
     "error: --config.train.stepz: unknown config key 'train.stepz' (did you mean train.steps?)"),
    (["train", "--config=expert:wikki", "--workdir=/tmp/x"], "preset 'wikki'"),
    (["train", "--config=nope/missing.py", "--workdir=/tmp/x"], "error: --config: cannot load the config file"),
    (["prepare-data", "--config=expert:synthetic", "--num_proc=2"], "error: Unknown command line flag 'num_proc'"),
    (["prepare-data", "--config=expert:synthetic", "--num-proc=0"], "error: flag --num-proc=0"),
    (["train", "--config=expert:synthetic", "--workdir=/tmp/x", "stray"], "error: btx train: unexpected argument"),
    (["generate", "--model=x", "--prompt=a", "--max-new-tokens=0"], "error: btx generate: argument --max-new"),
])
def test_flag_typos_and_bad_values_are_one_line_and_exit_2(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(line) or (line in err and err.startswith("error: ")), err


@pytest.mark.parametrize("text,size", [
    ("80GB", 80 * 10**9), ("141GiB", 141 * 2**30), ("80G", 80 * 10**9), ("2Gi", 2 * 2**30), ("5gb", 5 * 10**9),
    ("500MB", 500 * 10**6), ("1.5TiB", int(1.5 * 2**40)), (".5GB", 5 * 10**8), (" 80 GB ", 80 * 10**9),
    ("1000", 1000), ("12B", 12), ("64KiB", 65536),
])
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["12XB", "0", "GB", "", "80GBB", "80iB", "-1", "1e9"])
def test_parse_bytes_refuses_with_one_line(text):
    with pytest.raises(ConfigError, match="is not a size") as e:
        parse_bytes(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


def test_size_flag_is_a_usage_error(capsys):
    p = ArgumentParser(prog="tool.py")
    p.add_argument("--device-memory", type=size_flag)
    assert p.parse_args(["--device-memory", "80GB"]).device_memory == 80 * 10**9
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--device-memory", "12XB"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: tool.py: argument --device-memory: '12XB' is not a size "
                                       "(examples: 5GB, 500MB, 2GiB, 1000000)\n")
