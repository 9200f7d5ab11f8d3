"""btx_jax/cli/compose.py (scripts/compose.py): LoRA-MoE (mergoo) and FFN-MoE (Mixtral) written from experts on
disk; bad input (arguments, experts that do not fit, an existing --out) is one stderr line and exit 2, and nothing
is written."""
from __future__ import annotations

import json

import pytest

from btx_jax.cli.compose import main
from test_compose import setup as lora_setup  # noqa: F401  (fixtures: the experts of those tests)
from test_compose_ffn import setup as ffn_setup  # noqa: F401


def test_lora_moe_mergoo_and_bad_input(lora_setup, tmp_path, capsys):
    base_dir, _, _, dirs = lora_setup
    out = tmp_path / "moe"
    assert main([str(base_dir), *map(str, dirs), "--out", str(out), "--top-k", "2", "--format", "mergoo",
                 "--router-init", "normal"]) == 0
    assert json.loads((out / "config.json").read_text())["num_experts"] == 3
    capsys.readouterr()
    for argv in ([str(base_dir), *map(str, dirs), "--out", str(tmp_path / "x"), "--top-k", "5"],
                 [str(base_dir), str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                 [str(base_dir), str(dirs[0]), "--out", str(tmp_path / "x"), "--seed-expert", "--format", "mergoo"],
                 [str(base_dir), str(dirs[0]), "--out", str(tmp_path / "x"), "--shared", "seed"],    # ffn only
                 [str(base_dir), str(dirs[0]), "--out", str(tmp_path / "x"), "--top-k", "0"],
                 [str(base_dir), *map(str, dirs), "--out", str(out)],                      # exists
                 [str(base_dir), str(dirs[0])]):                                          # no --out
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main(argv))
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "x").exists()


def test_ffn_moe_mixtral_and_bad_input(ffn_setup, hf_llama, tmp_path, capsys):
    seed_dir, _, experts = ffn_setup
    dirs = [e.save_pretrained(tmp_path / f"e{i}", format="btx") for i, e in enumerate(experts)]
    out = tmp_path / "moe"
    assert main([str(seed_dir), *map(str, dirs), "--mode", "ffn", "--top-k", "2", "--seed-expert",
                 "--format", "mixtral", "--out", str(out)]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert (raw["model_type"], raw["num_local_experts"], raw["num_experts_per_tok"]) == ("mixtral", 4, 2)
    other_arch = hf_llama(hidden_size=32, head_dim=8)
    stranger = hf_llama(seed=7)                     # same shapes, independently initialised: not branched
    capsys.readouterr()
    cases = [([str(seed_dir), str(dirs[0]), str(other_arch)], "hidden_size=32 does not match"),
             ([str(seed_dir), str(dirs[0]), str(stranger)], "not branched from this seed"),
             ([str(seed_dir), *map(str, dirs), "--top-k", "4"], "top_k=4 must be between 1 and the number of experts"),
             ([str(seed_dir), str(dirs[0]), "--router-layers", "0"],
              "error: --router-layers: not an option of mode 'ffn' (only of mode 'lora')"),
             ([str(seed_dir), str(dirs[0]), "--allow-other-base"], "error: --allow-other-base: not an option of mode"),
             ([str(seed_dir), str(dirs[0]), "--router-std", "-1"], "error: --router-std=-1.0: must be a finite")]
    for argv, needle in cases:
        assert main([*argv, "--mode", "ffn", "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "x").exists()
