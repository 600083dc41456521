"""Builds and loads the C++ kernels for CPUs, once per machine: paged decode attention, the
Llama layer's fused elementwise steps (csrc/fused_ops.cpp, used through models/fused.py), the
bf16 linear layer on AMX tiles (csrc/amx_linear.cpp), AVX512-BF16 dot products
(csrc/dpbf16_linear.cpp) or float32 FMA over bf16 weights on AVX2 (csrc/avx2_linear.cpp), all
used through models/packed_linear.py, and greedy sampling's argmax (csrc/argmax.cpp, used by
engine/sampler.py).

The attention kernel (csrc/paged_attention.cpp) reads each request's K/V from the cache
blocks in place; the torch path copies them into a padded tensor first. They are compiled on
first use with the machine's C++ compiler (cached by torch under ~/.cache/torch_extensions,
one build per source digest, ISA, checkout and torch; a build killed halfway does not make
the next start wait) and the engine falls back to the torch path, with one
warning, where that is not possible. The build (1-4 minutes) says on the console what it
builds, why and when it is done; `distserve doctor --build-kernels` runs it ahead of the
first start, which `pip install` cannot (its build isolation has no torch).
DISTSERVE_PAGED_KERNEL=0 turns them off;
DISTSERVE_CPU_ISA=avx2 builds them without their AVX-512 paths and =portable with plain loops
only, so every path can be run and tested on a CPU that has more.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import sys
import threading
import time

import torch

log = logging.getLogger(__name__)
_CSRC = pathlib.Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "paged_attention.cpp", _CSRC / "fused_ops.cpp", _CSRC / "amx_linear.cpp",
            _CSRC / "dpbf16_linear.cpp", _CSRC / "avx2_linear.cpp", _CSRC / "argmax.cpp",
            _CSRC / "decode_layers.cpp"]
ISA_ENV = "DISTSERVE_CPU_ISA"
# what the kernels are compiled for: this CPU (every path it has), AVX2 + FMA only (the
# AVX-512 paths left out, as on AMD Zen 3), or the compiler's baseline (plain loops only)
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-march=haswell", "-mtune=native"],
             "portable": []}
_lock = threading.Lock()
_state: dict[str, bool] = {}


def kernel_available() -> bool:
    """True when the compiled kernel is loaded (building it on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load()
    return _state["ok"]


def kernel_isa() -> str:
    """The DISTSERVE_CPU_ISA the kernels are built for: native (the default), avx2 or portable."""
    isa = os.environ.get(ISA_ENV, "native") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}: choose one of {', '.join(ISA_FLAGS)}")
    return isa


def library_path() -> pathlib.Path:
    """The shared library this machine's build is (or will be) cached as."""
    from torch.utils.cpp_extension import _get_build_directory
    name = _name(kernel_isa())
    return pathlib.Path(_get_build_directory(name, verbose=False)) / f"{name}.so"


def _name(isa: str) -> str:
    # torch rebuilds when a source changes, not a header or the CPU (-march=native): the
    # digest of all of them, of the CPU's feature flags and of the ISA does. Torch's build
    # file also holds the sources' and torch's absolute paths, so the digest takes those too:
    # two checkouts or environments on one machine each keep their build instead of
    # rebuilding over each other in one folder.
    sources = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()))
    where = f"{_CSRC.resolve()}\0{pathlib.Path(torch.__file__).resolve().parent}".encode()
    digest = hashlib.sha256(sources + _cpu_flags() + isa.encode() + where).hexdigest()[:12]
    return f"distserve_cpu_kernels_{isa}_{digest}"


BUILD_WAIT_S = 900.0   # the longest a load waits for another process's build of the same kernels


@contextlib.contextmanager
def _build_lock(folder: pathlib.Path, wait_s: float = BUILD_WAIT_S):
    """Holds the build folder for this process. torch guards a build with a `lock` file that
    a killed build leaves behind, and then every later load waits on it forever (its FileBaton
    has no timeout). An flock on a file beside it goes with its process however that ends:
    whoever holds it knows that a `lock` file there is a dead build's, and removes it."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "distserve.flock", "w") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has built the CPU kernels in {folder} "
                                       f"for over {wait_s:g} s") from None
                if not told:
                    log.warning("waiting for another process's build of the CPU kernels (%s)", folder)
                    told = True
                time.sleep(0.5)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s, left behind by a CPU kernel build that was killed", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load() -> bool:
    if os.environ.get("DISTSERVE_PAGED_KERNEL", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension
        isa = kernel_isa()
        if isa == "avx2" and not {"avx2", "fma"} <= set(_cpu_flags().decode().split()[2:]):
            raise RuntimeError(f"{ISA_ENV}=avx2 on a CPU without AVX2 and FMA")
        path = library_path()
        fresh = not path.exists()
        if fresh:
            log.warning("building the CPU kernels (attention, fused layer steps, bf16 linear "
                        "layers) for this CPU, ISA %s: once per machine and distserve version, "
                        "1-4 minutes; `distserve doctor --build-kernels` does it ahead", isa)
        start = time.perf_counter()
        with _build_lock(path.parent):
            cpp_extension.load(
                name=path.stem, sources=[str(p) for p in _SOURCES], is_python_module=False,
                extra_cflags=["-O3", *ISA_FLAGS[isa], "-fopenmp", "-fopenmp-simd"],
                extra_ldflags=["-fopenmp"], verbose=False)
        if fresh:
            log.warning("CPU kernels built in %.0f s: %s", time.perf_counter() - start, path)
        return all(hasattr(torch.ops.distserve_cpu, op) for op in
                   ("paged_decode_attention", "add_rms_norm_", "silu_mul", "rotary_cache_write",
                    "amx_linear", "dpbf16_linear", "avx2_linear", "avx2_set_prefetch_blocks",
                    "argmax_rows", "simd_lanes",
                    "llama_decode_layers", "llama_decode_logits"))
    except Exception as exc:  # no compiler, no ninja, or a build error: the torch path works
        log.warning("CPU kernels unavailable, using the torch path: %s", exc)
        return False


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux): a build for one CPU may not run on another."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""


def paged_decode_attention(q: torch.Tensor, layer_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] over the cached contexts -> [B, Hq, D]; call only if kernel_available().
    q may be rows of a wider tensor (the q heads of a fused q/k/v projection): no copy."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.distserve_cpu.paged_decode_attention(out, q, layer_cache, block_tables,
                                                   context_lens, scale)
    return out


if __name__ == "__main__":   # `serve` builds here, so that the messages reach its console
    import logging as _logging
    _logging.basicConfig(level=_logging.WARNING, format="%(message)s", stream=sys.stderr)
    kernel_available()
