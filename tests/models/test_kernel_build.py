"""Where the CPU kernels' build lives and how loads wait on it: each checkout keeps its own
build, and a build killed halfway (its torch `lock` file left behind) does not make every
later start wait forever."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from distserve.models import paged_kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_each_checkout_has_a_build_of_its_own(tmp_path, monkeypatch):
    """torch's build file holds the sources' absolute paths: two checkouts of the same sources
    sharing one build folder rebuild over each other."""
    here = paged_kernel._name("native")
    assert paged_kernel._name("native") == here != paged_kernel._name("portable")
    other = tmp_path / "checkout" / "csrc"
    shutil.copytree(paged_kernel._CSRC, other)
    monkeypatch.setattr(paged_kernel, "_CSRC", other)
    assert paged_kernel._name("native") != here


def test_a_held_build_is_waited_for_then_refused_by_name(tmp_path):
    with paged_kernel._build_lock(tmp_path):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=str(tmp_path)):
            with paged_kernel._build_lock(tmp_path, wait_s=0.5):
                pass
        assert time.monotonic() - start >= 0.5


def test_a_killed_builder_leaves_nothing_to_wait_for(tmp_path):
    """A process that held the build and left torch's lock file is killed with SIGKILL: the
    next one takes the build at once and removes the stale lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distserve.models import paged_kernel as k\n"
         f"with k._build_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n"
         f"    open({str(tmp_path / 'lock')!r}, 'w').close(); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):   # while it lives, it holds the build
            with paged_kernel._build_lock(tmp_path, wait_s=0.5):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (tmp_path / "lock").exists()
    with paged_kernel._build_lock(tmp_path, wait_s=5):
        assert not (tmp_path / "lock").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTSERVE_PAGED_KERNEL") == "0", reason="kernels turned off")
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="no C++ compiler on this machine: the torch path is used")
def test_a_stale_torch_lock_does_not_hang_the_kernels_load():
    """The hang CI met: torch's lock file in the kernels' real build folder, left by a killed
    build. A fresh process loads the kernels (building them if need be) and says what it
    removed."""
    folder = paged_kernel.library_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()
    probe = subprocess.run(
        [sys.executable, "-c", "from distserve.models import paged_kernel as k; "
         "assert k.kernel_available(), 'the kernels did not load'"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert f"removing {folder / 'lock'}" in probe.stderr
    assert not (folder / "lock").exists()
