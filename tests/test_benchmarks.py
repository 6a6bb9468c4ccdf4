"""The benchmark scripts' helpers: machine description, efficiency arithmetic, argument handling
(tiny shapes; nothing here is a timing measurement)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma bmi2 avx512f
"""


def test_cpu_info_reads_model_and_vector_extensions(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = common.cpu_info(str(path))
    assert info["cpu_model"] == "AMD EPYC 7B13"
    # The first processor's flags, in the fixed report order; non-vector flags are left out.
    assert info["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma"]
    missing = common.cpu_info(str(tmp_path / "absent"))
    assert missing["vector_extensions"] == [] and missing["cpu_model"] is not None


def test_peak_table_matches_specific_kinds_first():
    assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.peak_tflops("TPU v5 lite") == 197.0
    assert common.peak_tflops("TPU v5p") == 459.0
    assert common.peak_tflops("NVIDIA A10G") == 70.0
    assert common.peak_tflops("some new chip") is None


class FakeDevice:
    def __init__(self, platform: str, kind: str):
        self.platform, self.device_kind = platform, kind


def test_efficiency_fields_cpu_and_accelerator():
    cpu = common.efficiency_fields(100.0, 2.0, 80.0, devices=[FakeDevice("cpu", "cpu")])
    assert cpu == {"achieved_gflops_per_s": 50.0, "matmul_gflops_per_s": 80.0, "cpu_mfu": 0.625}
    gpu = common.efficiency_fields(989e3, 2.0, None, devices=[FakeDevice("gpu", "NVIDIA H200")] * 2)
    assert gpu["mfu"] == pytest.approx(0.25) and gpu["peak_bf16_tflops_per_device"] == 989.0
    unknown = common.efficiency_fields(1.0, 1.0, None, devices=[FakeDevice("gpu", "Mystery")])
    assert unknown["mfu"] is None
    assert common.efficiency_fields(None, 1.0, 5.0) == {}


# -- benchmarks/vs_original.py ---------------------------------------------------------------------

import vs_original  # noqa: E402

FAKE_ORIGINAL = '''
from transformers import PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput


class TokenFlowModel(PreTrainedModel):
    def training_forward(self, flag):
        """Reads gumbel_context on every path but sets it on one only, like the original."""
        if flag:
            gumbel_context = "context"
        return CausalLMOutput(loss=gumbel_context)
'''


def test_vs_original_arguments_and_schedule(tmp_path):
    assert vs_original.original_ffn(512) == 512 and vs_original.original_ffn(500) == 512
    assert vs_original.original_ffn(768) == 768
    args = vs_original.parse_args(["--original=x", "--kinds=step", "--sides=original,ours"])
    assert args.kinds == ["step"] and args.sides == ["original", "ours"] and args.steps == 10
    for bad in (["--kinds=bogus"], ["--sides=theirs"], ["--steps=0"], ["--dim=100", "--heads=8"], []):
        with pytest.raises(SystemExit):
            vs_original.parse_args((["--original=x"] if bad else []) + bad)
    # Sides alternate, the order reversed every other round; every kind in every round.
    runs = vs_original.schedule(2, ["step", "sample"], ["a", "b"])
    assert runs == [("step", "a"), ("step", "b"), ("sample", "a"), ("sample", "b"),
                    ("step", "b"), ("step", "a"), ("sample", "b"), ("sample", "a")]
    with pytest.raises(SystemExit, match="model.py"):
        vs_original.check_original(str(tmp_path))


def fake_run(side: str, times: list[float], rss: float, gflop: float, matmul: float = 100.0) -> dict:
    return {"side": side, "kind": "step", "times_s": times, "peak_rss_mb": rss, "gflop": gflop,
            "ffn_hidden": 8, "params_m": 1.0, "matmul_gflops_per_s": matmul}


def test_vs_original_summary_ratios():
    results = [fake_run("original", [4.0, 6.0], 2000.0, 40.0), fake_run("ours_same_arch", [1.0, 3.0], 900.0, 20.0),
               fake_run("original", [5.0, 7.0], 2100.0, 40.0), fake_run("ours_same_arch", [2.0, 2.0], 1000.0, 20.0)]
    out = vs_original.summarize(results, ["step", "sample"], ["original", "ours_same_arch", "ours"])
    sides = out["step"]["sides"]
    assert sides["original"]["min_s"] == 4.0 and sides["original"]["median_s"] == 5.5
    assert sides["ours_same_arch"]["min_s"] == 1.0 and sides["ours_same_arch"]["median_s"] == 2.0
    assert sides["ours_same_arch"]["cpu_mfu"] == pytest.approx(0.2)  # 20 GFLOP in 1 s of 100 GFLOP/s
    ratio = out["step"]["ratio_ours_same_arch"]
    assert ratio == {"time_min": 0.25, "time_median": round(2.0 / 5.5, 3), "peak_rss": round(1000 / 2100, 3),
                     "flops": 0.5}
    assert "ratio_ours" not in out["step"] and out["sample"] == {"sides": {}}


def test_vs_original_loads_the_original_with_its_fix_and_stand_ins(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(FAKE_ORIGINAL)
    (tmp_path / "model_utils.py").write_text("")
    # The stand-ins go into sys.modules; these entries are put back as they were after the test.
    for name in ("model", "transformers", "transformers.modeling_outputs"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(vs_original, "needs_transformers_shim", lambda: True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    module, shim, fixes = vs_original.import_original(str(tmp_path))
    assert shim and len(fixes) == 1
    model = module.TokenFlowModel({"dim": 4})
    assert model.config == {"dim": 4}
    assert model.training_forward(True).loss == "context"
    assert model.training_forward(False).loss is None  # UnboundLocalError without the fix
    # A checkout that already sets it is loaded unchanged.
    fixed = FAKE_ORIGINAL.replace("        if flag:", "        gumbel_context = None\n        if flag:")
    (tmp_path / "model.py").write_text(fixed)
    assert vs_original.load_original_model(str(tmp_path))[1] == []


@pytest.mark.slow
def test_vs_original_our_worker_tiny():
    args = vs_original.parse_args(["--original=x", "--dim=32", "--layers=1", "--heads=2", "--batch=2", "--seq_len=8",
                                   "--vocab=64", "--steps=1", "--sample_steps=2", "--sample_repeats=1"])
    step = vs_original.run_ours(args, "step", vs_original.original_ffn(32))
    assert step["side"] == "ours_same_arch" and step["ffn_hidden"] == 64 and len(step["times_s"]) == 1
    assert step["gflop"] > 0 and step["peak_rss_mb"] >= step["rss_after_imports_mb"] > 0
    sample = vs_original.run_ours(args, "sample", 0)
    assert sample["side"] == "ours" and sample["ffn_hidden"] == 128 and sample["gflop"] > 0


# -- benchmarks/device_check.py --------------------------------------------------------------------

import device_check  # noqa: E402


def test_device_check_batch_follows_the_memory_plan_table():
    # launch/README.md: recommended per-device micro-batch by accelerator memory.
    table = {16: (4, 2), 32: (8, 4), 80: (16, 16), 141: (32, 16)}
    for gib, (baseline, gumbel) in table.items():
        assert device_check.recommended_batch("fineweb_baseline", gib * 1024) == baseline, gib
        assert device_check.recommended_batch("fineweb_gumbel", gib * 1024) == gumbel, gib
    assert device_check.recommended_batch("fineweb_gumbel", 4 * 1024) == 1  # never below one sequence


def test_device_check_arguments_and_no_accelerator():
    args = device_check.parse_args([])
    assert args.configs == list(device_check.CONFIGS) and args.dtype == "bfloat16" and args.seq_len == 1024
    for bad in (["--configs=shakespeare_baseline"], ["--steps=0"], ["--per_device_batch=-1"], ["--dtype=fp8"]):
        with pytest.raises(SystemExit):
            device_check.parse_args(bad)
    import jax

    if jax.default_backend() != "cpu":
        return
    # Without an accelerator: a clear stop, not a traceback; --cpu_dry goes on.
    with pytest.raises(SystemExit, match="needs a GPU or TPU"):
        device_check.require_accelerator(cpu_dry=False)
    assert device_check.require_accelerator(cpu_dry=True).platform == "cpu"


@pytest.mark.slow
def test_device_check_cpu_dry_worker():
    args = device_check.parse_args(["--cpu_dry", "--steps=1", "--worker=fineweb_baseline"])
    result = device_check.run_worker(args)
    assert result["config"] == "fineweb_baseline" and result["seq_len"] == 16
    assert result["per_device_batch"] == 2 and result["tokens_per_s"] > 0 and result["gflops_per_step"] > 0
    assert result["dtype"] == "bfloat16" and result["mfu"] is None  # no peak for a CPU
