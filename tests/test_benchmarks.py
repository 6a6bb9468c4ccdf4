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
