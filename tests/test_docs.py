"""The README is a landing page (at most 12 KiB, the two fresh-machine commands verbatim, links that resolve), every
page under docs/ is in the mkdocs nav, and nothing points at the data README that moved to docs/data.md.  The site's
own links and anchors are checked by `mkdocs build --strict` in .ci/run."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = "pip install -e . && python scripts/demo.py"
TESTS = 'pip install -e ".[test,tpu,cuda]" && python -m pytest -q -n auto tests'


def test_readme_is_a_short_landing_page():
    size = len(README.read_bytes())
    assert size <= 12_288, f"README.md is {size} bytes; move detail into docs/"


def test_readme_keeps_the_fresh_machine_commands():
    text = README.read_text()
    assert DEMO in text
    assert TESTS in text


def test_ci_runs_the_readme_test_command_and_builds_the_docs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-e ".[test,tpu,cuda,docs]"' in ci
    assert "python -m pytest -q -n auto tests" in ci
    assert ci.index("mkdocs build --strict") < ci.index("python -m pytest")


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _nav_pages(nav) -> set[str]:
    pages = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == nav, f"not in nav: {sorted(pages - nav)}; in nav but missing: {sorted(nav - pages)}"
    assert "reference/configuration.md" in nav


def test_nothing_points_at_the_moved_data_readme():
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "mkdocs.yml",
             *(p for d in ("btx_jax", "configs", "scripts", "tests", "docs") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".md", ".yml", ".yaml"))]
    stale = [str(p.relative_to(ROOT)) for p in files if p.is_file() and p != Path(__file__).resolve()
             and "btx_jax/data/README.md" in p.read_text(errors="ignore")]
    assert not stale, f"still naming btx_jax/data/README.md (now docs/data.md): {stale}"
