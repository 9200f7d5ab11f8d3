"""A plain, non-editable `pip install` of the checkout works from any directory with no checkout on sys.path:
`btx train` trains from a packaged config by name and every `btx COMMAND --help` exits 0.

The venv sees the system's site-packages (the dependencies are not downloaded) and gets this checkout (copied, so
that the build leaves nothing in it) with `pip install --no-deps --no-build-isolation`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from btx_jax.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow       # 55-95 s on 2 shared cores (a pip build, a 2-step train, 12 `--help`s): `pytest -m slow`
def test_a_plain_install_trains_and_helps_from_anywhere(tmp_path):
    src, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "btx_jax", src / "btx_jax", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py, btx = venv / "bin" / "python", venv / "bin" / "btx"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--disable-pip-version-check", str(src)], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    assert btx.is_file() and (venv / "bin" / "btx-lm-eval").is_file()

    where = subprocess.run([str(py), "-c", "import sys, btx_jax, btx_jax.configs as c; "
                            "print(btx_jax.__file__); print(c.DIR); print('\\n'.join(sys.path))"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True).stdout.splitlines()
    package, configs, path = Path(where[0]), Path(where[1]), where[2:]
    assert package.is_relative_to(venv) and configs.is_relative_to(venv), where
    assert not any(p and Path(p).resolve() in (REPO, src) for p in path), path     # no checkout on sys.path

    helps = {name: subprocess.Popen([str(btx), name, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=elsewhere) for name in COMMANDS}
    train = subprocess.run([str(btx), "train", "--config=expert:synthetic", f"--workdir={tmp_path / 'x'}",
                            "--config.train.steps=2"], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (tmp_path / "x" / "final").is_dir()
    for name, proc in helps.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, (name, out[-1000:], err[-2000:])
    listing = subprocess.run([str(btx)], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert listing.returncode == 0 and all(f"  {name} " in listing.stdout for name in COMMANDS)
