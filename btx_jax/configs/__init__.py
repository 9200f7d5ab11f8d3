"""The phase configs (ml_collections config files with `get_config(preset)`), packaged with btx_jax.

A `--config` value names one of them or any config file, with an optional preset after the first `:`:

    expert:wiki,tiny                 the packaged expert.py, preset "wiki,tiny" (also expert.py:wiki,tiny)
    configs/expert.py:wiki           the same file, as the docs wrote it before configs/ moved into the package
    path/to/my_config.py:preset      a config file of your own (it may import btx_jax.configs.common)
"""
from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).parent
PHASES = ("pretrain", "expert", "router", "sft")        # the packaged phase config files (common.py is shared)


def resolve(spec: str) -> str:
    """`NAME[:PRESET]` -> `<packaged NAME.py>[:PRESET]` when NAME (optionally `configs/` before it, `.py` after it)
    is a packaged phase config and no such file exists here; any other spec is returned unchanged (a path)."""
    path, colon, preset = spec.partition(":")
    name = path.removeprefix("configs/").removesuffix(".py")
    if name in PHASES and not Path(path).is_file():
        return f"{DIR / name}.py{colon}{preset}"
    return spec
