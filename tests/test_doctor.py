"""`distserve doctor` tells the truth about this machine: its CPU features as /proc/cpuinfo
has them, the kernel build the engine really uses, and the dtype `auto` then picks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distserve.models import paged_kernel


def doctor(**env) -> dict:
    done = subprocess.run([sys.executable, "-m", "distserve.cli", "doctor", "--json"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_doctor_reports_the_kernels_and_dtype_this_machine_uses():
    flags = set(paged_kernel._cpu_flags().decode().split())
    doc = doctor()
    assert doc["cpu_features"]["avx2"] == ("avx2" in flags)
    assert doc["cpu_features"]["avx512f"] == ("avx512f" in flags)
    assert doc["kernels"]["built"] == paged_kernel.kernel_available()
    if doc["kernels"]["built"]:
        assert doc["kernels"]["vector_lanes"] == torch.ops.distserve_cpu.simd_lanes()
    auto_bf16 = doc["dtype_auto"]["cpu"] == "bfloat16"
    assert auto_bf16 == (doc["kernels"]["bf16_linear"] in ("amx", "dpbf16", "avx2", "onednn"))

    off = doctor(DISTSERVE_PAGED_KERNEL="0")
    assert off["kernels"]["built"] is False and off["kernels"]["disabled_by_env"] is True
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert off["dtype_auto"]["cpu"] == ("bfloat16" if native else "float32")


def test_doctor_prints_a_readable_report(capsys):
    from distserve.doctor import format_report, report
    text = format_report(report())
    assert "CPU kernels:" in text and "--dtype auto:" in text and "GPUs:" in text
