"""The config schema (btx_jax/schema.py): the checked-in reference is the generated one, every field has a
doc, and parse() turns a config into typed fields or names the bad key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from btx_jax import schema
from btx_jax.config import ConfigError, LlamaConfig
from btx_jax.configs.common import base_config

REFERENCE = Path(__file__).parent.parent / "docs" / "reference" / "configuration.md"


def test_reference_is_up_to_date():
    assert REFERENCE.read_text() == schema.reference(), \
        "regenerate: python -m btx_jax.schema > docs/reference/configuration.md"


def test_every_field_has_a_doc():
    for cls in (schema.Run, *schema.SECTIONS.values(), schema.Lora):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name} has no doc"
    specs = {"adapter", "moe"}          # set by the phases and converters, not by a config's model.arch
    undocumented = [f.name for f in dataclasses.fields(LlamaConfig) if f.name not in specs and
                    not f.metadata.get("doc", "").strip()]
    assert not undocumented, f"LlamaConfig fields without a doc (and so refused in model.arch): {undocumented}"
    reference = schema.reference()
    assert all(f"`model.arch.{k}`" in reference for k in schema.ARCH_KEYS)
    assert all(f"`model.lora.{f.name}`" in reference for f in dataclasses.fields(schema.Lora))


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


def test_model_section_is_typed():
    from btx_jax.configs import expert
    run = schema.parse(expert.get_config("wiki"))
    assert run.model.lora == schema.Lora(rank=640, alpha=32.0, targets=["gate_proj", "up_proj", "down_proj"],
                                         dropout=0.1)
    assert schema.parse(base_config()).model.lora is None
    c = expert.get_config("synthetic")
    c.model.arch.eos_token_id = (2, 3)
    assert schema.parse(c).model.arch["eos_token_id"] == (2, 3)        # tuples stay tuples: LlamaConfig hashes


@pytest.mark.parametrize("section,key,value,message", [
    ("lora", "dropuot", 0.1, r"unknown config key 'model.lora.dropuot' \(did you mean 'model.lora.dropout'\?\)"),
    ("lora", "targets", ("gate_proj", "wo"), r"model.lora.targets=\['gate_proj', 'wo'\]: must be a list of q_proj"),
    ("arch", "hiden_size", 64,
     r"unknown config key 'model.arch.hiden_size' \(did you mean 'model.arch.hidden_size'\?\)"),
])
def test_model_sub_keys_are_checked(section, key, value, message):
    """A misspelt model.lora key was silently dropped (a run trained without the dropout it asked for) and a
    misspelt model.arch key was a TypeError traceback; both are one ConfigError naming the key now."""
    from btx_jax.configs import expert
    c = expert.get_config("synthetic")
    setattr(c.model[section], key, value)
    with pytest.raises(ConfigError, match=message):
        schema.parse(c)


def test_resumable_keys():
    keys = schema.resumable_keys()
    assert "train.eval_every" in keys and "train.steps" in keys and "mesh" in keys
    assert "train.lr" not in keys and "mesh_rules" not in keys
