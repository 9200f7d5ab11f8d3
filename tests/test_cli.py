"""btx_jax/cli.py: byte sizes of size flags (decimal and binary units, the forms scripts/plan.py and
scripts/convert.py accept) and their one-line refusals; bad flag values as one stderr line and exit 2."""
from __future__ import annotations

import pytest

from btx_jax.cli import ArgumentParser, parse_bytes, size_flag
from btx_jax.config import ConfigError


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
    assert capsys.readouterr().err == ("tool.py: error: argument --device-memory: '12XB' is not a size "
                                       "(examples: 5GB, 500MB, 2GiB, 1000000)\n")
