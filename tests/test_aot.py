"""btx_jax/train/aot.py: compile targets (accelerator names -> libtpu topologies), the one-line answers for
bad targets and a missing TPU compiler, and the TPU compiler's out-of-memory refusal.  `scripts/plan.py
--target cpu:N` end to end: test_plan.py."""
from __future__ import annotations

import importlib.util
import os

import pytest

from btx_jax.config import ConfigError
from btx_jax.train import aot


@pytest.mark.parametrize("text,devices,topology", [
    ("tpu:v5p-8", 4, "v5p:2x2x1"), ("tpu:v5p-16", 8, "v5p:2x2x2"), ("tpu:v5p-128", 64, "v5p:4x4x4"),
    ("tpu:v4-8", 4, "v4:2x2x1"), ("tpu:v5e-16", 16, "v5e:4x4"), ("tpu:v5e-8", 8, "v5e:2x4"),
    ("tpu:v6e-8", 8, "v6e:2x4"), ("tpu:v5litepod-32", 32, "v5e:4x8"), ("tpu:v5p:2x2x1", 4, "v5p:2x2x1"),
])
def test_accelerator_names_map_to_libtpu_topologies(text, devices, topology):
    t = aot.parse_target(text)
    assert (t.platform, t.devices, t.topology) == ("tpu", devices, topology)
    assert t.hbm_bytes > 0 and t.peak_flops > 1e14


def test_cpu_target_and_bad_targets():
    assert aot.parse_target("cpu:8") == aot.Target("cpu", 8, text="cpu:8")
    for bad in ("gpu:", "tpu:v9-8", "cpu:x", "tpu:"):
        with pytest.raises(ConfigError, match="expected cpu:N"):
            aot.parse_target(bad)
    with pytest.raises(ConfigError, match="TensorCores per chip"):
        aot.parse_target("tpu:v5p-3")


@pytest.mark.parametrize("text,devices,topology,memory", [
    ("gpu:h100-8", 8, "1x1x8", 84942979072), ("gpu:h200-8", 8, "1x1x8", 151397597184),
    ("gpu:a100-8", 8, "1x1x8", 85100068864), ("gpu:h100-2x8", 16, "1x2x8", 84942979072),
])
def test_gpu_names_map_to_shipped_target_configs(text, devices, topology, memory):
    t = aot.parse_target(text)
    assert (t.platform, t.devices, t.topology, t.hbm_bytes) == ("gpu", devices, topology, memory)
    assert t.target_config.startswith(str(aot.GPU_TARGETS_DIR))


def test_gpu_target_config_file_and_bad_gpu_targets(tmp_path):
    spec = tmp_path / "mine.txtpb"
    spec.write_text((aot.GPU_TARGETS_DIR / "h100_sxm.txtpb").read_text().replace("84942979072", "1000"))
    assert aot.parse_target(f"gpu:{spec}") == aot.Target("gpu", 8, "1x1x8", text=f"gpu:{spec}",
                                                          target_config=str(spec), memory=1000)
    assert aot.parse_target(f"gpu:{spec}@2x4").topology == "1x2x4"
    (tmp_path / "empty.txtpb").write_text("name: 1\n")
    for bad, message in [("gpu:b200-8", "unknown GPU 'b200'"), ("gpu:h100", "give the GPU count"),
                         ("gpu:h100-0", "at least one node"), (f"gpu:{tmp_path}/missing.txtpb", "no such target"),
                         (f"gpu:{spec}@two", "after '@' expected"),
                         (f"gpu:{tmp_path}/empty.txtpb", "is not a GpuTargetConfigProto")]:
        with pytest.raises(ConfigError, match=message):
            aot.parse_target(bad)


def test_missing_cuda_plugin_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_cuda12_plugin" else real(name, *a))
    with pytest.raises(ConfigError, match=r'gpu:h100-8: the GPU compiler is not installed: pip install -e "\.\[cuda\]"'):
        aot.compile_only(aot.parse_target("gpu:h100-8"))


def test_missing_libtpu_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tpu\]"'):
        aot.compile_only(aot.parse_target("tpu:v5e-16"))


def test_compiler_out_of_memory_becomes_does_not_fit():
    class Lowered:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                               "space hbm. Used 16.40G of 15.75G hbm. Exceeded hbm capacity by 665.0M.\n"
                               "HLO temporaries (16.40G) exceed available HBM (15.75G)")

    with pytest.raises(aot.DoesNotFit) as info:
        aot.compile_lowered(Lowered(), log=lambda _: None)
    assert info.value.needed == int(16.40 * 2**30) and info.value.available == int(15.75 * 2**30)



def test_cost_model_reports_a_non_positive_time_as_unpriced():
    class Compiled:
        def __init__(self, seconds):
            self.seconds = seconds

        def cost_analysis(self):
            return {"optimal_seconds": self.seconds, "flops": 4.59e14}

    target = aot.parse_target("tpu:v5p-8")
    assert aot.cost_model(Compiled(-29.9), target) == {"unpriced_s": -29.9}
    priced = aot.cost_model(Compiled(2.0), target)
    assert priced["step_s"] == 2.0 and priced["mfu"] == pytest.approx(0.5)
    assert aot.cost_model(Compiled(2.0), aot.parse_target("cpu:8")) == {}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install -e ".[tpu]"): no TPU compiler to compile for')
def test_cost_model_on_the_lora_b_matmul():
    """The LoRA B projection at r=640 ([N, 640] x [640, M], M sharded over the chips): v5p's cost model prices
    it; libtpu 0.0.42's v5e model returns exactly -1 s for it (docs/performance.md section 5), which plan reports
    as unpriced.  A libtpu that prices it turns the v5e figure into a step time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    got = {}
    for name in ("tpu:v5e-16", "tpu:v5p-8"):
        target = aot.parse_target(name)
        with aot.compile_only(target):
            mesh = Mesh(np.asarray(aot.target_devices(target)), ("fsdp",))
            h = jax.ShapeDtypeStruct((16384, 640), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
            b = jax.ShapeDtypeStruct((640, 2816), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
            compiled = jax.jit(lambda h, b: (h @ b.astype(h.dtype)).astype(jnp.float32).sum()).lower(h, b).compile()
            got[name] = aot.cost_model(compiled, target)
    assert got["tpu:v5p-8"]["step_s"] > 0 and 0 < got["tpu:v5p-8"]["mfu"] < 1
    v5e = got["tpu:v5e-16"]
    assert v5e.get("step_s", 0) > 0 or v5e == {"unpriced_s": pytest.approx(-1, abs=1e-3)}, v5e


def test_compile_only_sets_the_process_settings_within_the_block_only(monkeypatch):
    import jax
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/dev/null")
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    platforms = jax.config.jax_platforms
    with aot.compile_only(aot.parse_target("cpu:4")):
        assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/dev/null --xla_force_host_platform_device_count=4"
        assert jax.config.jax_platforms == "cpu"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_dump_to=/dev/null"
    assert jax.config.jax_platforms == platforms and "TPU_SKIP_MDS_QUERY" not in os.environ
