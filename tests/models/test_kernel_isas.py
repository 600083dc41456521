"""The CPU kernels built for each instruction set this CPU can run (DISTSERVE_CPU_ISA): the
kernel tests pass on every build, so the AVX2 paths are tested on AVX-512 machines and the
plain loops (any CPU without AVX2, or another architecture) on every machine."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from distserve.models import paged_kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL_TESTS = ["tests/models/test_paged_kernel.py", "tests/models/test_fused_ops.py",
                "tests/models/test_packed_linear.py", "tests/engine/test_sampler.py",
                "tests/models/test_decode_layers.py", "tests/models/test_avx2_tuning.py",
                "tests/engine/test_decode_ahead.py"]
FLAGS = set(paged_kernel._cpu_flags().decode().split())
LANES = {"avx2": 8, "portable": 1}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                 reason="no C++ compiler on this machine: the torch path is used")]


def isa_cases():
    avx2 = {"avx2", "fma"} <= FLAGS
    yield pytest.param("avx2", marks=pytest.mark.skipif(
        not avx2 or "avx512f" not in FLAGS,
        reason="this CPU has no AVX2" if not avx2 else "this CPU has no AVX-512: its native build is the AVX2 one"))
    yield pytest.param("portable")


@pytest.mark.parametrize("isa", list(isa_cases()))
def test_the_kernel_tests_pass_on_every_isa_build(isa):
    env = {**os.environ, paged_kernel.ISA_ENV: isa}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; from distserve.models import paged_kernel as k; "
         "assert k.kernel_available(); print(torch.ops.distserve_cpu.simd_lanes(), "
         "torch.ops.distserve_cpu.avx2_available(), torch.ops.distserve_cpu.dpbf16_available())"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    lanes, avx2, dpbf16 = probe.stdout.split()
    assert int(lanes) == LANES[isa] and dpbf16 == "False" and avx2 == str(isa == "avx2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_an_unknown_isa_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(paged_kernel.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="DISTSERVE_CPU_ISA='avx9000'"):
        paged_kernel.kernel_isa()
