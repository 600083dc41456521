"""`distserve doctor` tells the truth about this machine: its CPU features as /proc/cpuinfo
has them, the kernel build the engine really uses, and the dtype `auto` then picks."""
import json
import os
import re
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


def _loaded_libraries() -> str:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return f.read()


def test_build_kernels_names_the_library_the_engine_loads(capsys):
    path = paged_kernel.library_path()
    if not path.exists():   # a real build takes minutes: this test only finds one
        pytest.skip("the CPU kernels are not built on this machine yet")
    from distserve.cli import main
    assert main(["doctor", "--build-kernels"]) == 0
    assert capsys.readouterr().out == f"CPU kernels already built: {path}\n"
    assert paged_kernel.kernel_available() and str(path) in _loaded_libraries()


def test_build_kernels_says_why_it_builds_nothing(capsys, monkeypatch):
    from distserve.cli import main
    monkeypatch.setattr(paged_kernel, "_state", {})
    monkeypatch.setenv("DISTSERVE_PAGED_KERNEL", "0")
    assert main(["doctor", "--build-kernels"]) == 0   # the torch path still serves
    assert "warning: DISTSERVE_PAGED_KERNEL=0" in capsys.readouterr().err
    monkeypatch.setenv("DISTSERVE_PAGED_KERNEL", "1")
    monkeypatch.setenv("DISTSERVE_CPU_ISA", "sse")
    assert main(["doctor", "--build-kernels"]) == 2
    assert "DISTSERVE_CPU_ISA='sse'" in capsys.readouterr().err


def test_a_first_build_says_what_it_builds_why_and_how_long_it_took(caplog, monkeypatch,
                                                                      tmp_path):
    from torch.utils import cpp_extension
    built = []
    monkeypatch.setattr(paged_kernel, "library_path", lambda: tmp_path / "kernels.so")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["name"]))
    with caplog.at_level("WARNING", logger=paged_kernel.__name__):
        paged_kernel._load()
    assert built == ["kernels"]   # the compiler stands in for minutes of g++ here
    start, done = [r.getMessage() for r in caplog.records]
    assert "building the CPU kernels" in start and "1-4 minutes" in start
    assert "once per machine and distserve version" in start and "--build-kernels" in start
    assert re.fullmatch(rf"CPU kernels built in \d+ s: {re.escape(str(tmp_path))}/kernels.so", done)


def test_serve_builds_the_kernels_where_its_console_shows_it(capfd, monkeypatch):
    from distserve.cli import build_parser, engine_config_from_args
    from distserve.server.cli import _build_kernels_aside
    if not paged_kernel.library_path().exists():   # a real build takes minutes
        pytest.skip("the CPU kernels are not built on this machine yet")
    args = build_parser().parse_args(["serve", "--device", "cpu"])
    builder = _build_kernels_aside(args, engine_config_from_args(args, None))
    assert builder.wait(timeout=120) == 0
    assert capfd.readouterr().err == ""   # a warm start stays quiet
    monkeypatch.setenv("DISTSERVE_CPU_ISA", "sse")   # what it says reaches the console
    assert _build_kernels_aside(args, engine_config_from_args(args, None)).wait(timeout=120) == 0
    assert "CPU kernels unavailable" in capfd.readouterr().err
    for flags in (["--device", "cuda"], ["--launcher", "ray", "--device", "cpu"]):
        args = build_parser().parse_args(["serve", *flags])
        assert _build_kernels_aside(args, engine_config_from_args(args, None)) is None
