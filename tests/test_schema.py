"""The config schema (btx_jax/schema.py): the checked-in reference is the generated one, every field has a
doc, and parse() turns a config into typed fields or names the bad key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from btx_jax import schema
from btx_jax.config import ConfigError
from btx_jax.configs.common import base_config

REFERENCE = Path(__file__).parent.parent / "docs" / "reference" / "configuration.md"


def test_reference_is_up_to_date():
    assert REFERENCE.read_text() == schema.reference(), \
        "regenerate: python -m btx_jax.schema > docs/reference/configuration.md"


def test_every_field_has_a_doc():
    for cls in (schema.Run, *schema.SECTIONS.values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name} has no doc"


def test_parse_types_and_defaults():
    c = base_config()
    c.train.steps = 7
    run = schema.parse(c)
    assert run.train.steps == 7 and isinstance(run.train.lr, float)
    assert run.train.eval_every == 0 and run.data.kind == "synthetic" and run.mesh.fsdp == -1
    assert schema.defaults(schema.Train) == {**base_config().train.to_dict()}


def test_parse_names_the_bad_key():
    c = base_config()
    c.train.stpes = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes' \(did you mean 'train.steps'\?\)"):
        schema.parse(c)
    c = base_config()
    c.train.lr = -1.0
    with pytest.raises(ConfigError, match=r"train.lr=-1.0: must be a number > 0"):
        schema.parse(c)


def test_resumable_keys():
    keys = schema.resumable_keys()
    assert "train.eval_every" in keys and "train.steps" in keys and "mesh" in keys
    assert "train.lr" not in keys and "mesh_rules" not in keys
