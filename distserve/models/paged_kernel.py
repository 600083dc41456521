"""Builds and loads the C++ kernels for CPUs, once per machine: paged decode attention, the
Llama layer's fused elementwise steps (csrc/fused_ops.cpp, used through models/fused.py) and
the bf16 linear layer on AMX tiles (csrc/amx_linear.cpp) or AVX512-BF16 dot products
(csrc/dpbf16_linear.cpp), both used through models/packed_linear.py, and greedy sampling's
argmax (csrc/argmax.cpp, used by engine/sampler.py).

The attention kernel (csrc/paged_attention.cpp) reads each request's K/V from the cache
blocks in place; the torch path copies them into a padded tensor first. It is compiled on first use
with the machine's C++ compiler (cached by torch under ~/.cache/torch_extensions) and the
engine falls back to the torch path, with one warning, where that is not possible.
DISTSERVE_PAGED_KERNEL=0 turns them off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading

import torch

log = logging.getLogger(__name__)
_CSRC = pathlib.Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "paged_attention.cpp", _CSRC / "fused_ops.cpp", _CSRC / "amx_linear.cpp",
            _CSRC / "dpbf16_linear.cpp", _CSRC / "argmax.cpp"]
_lock = threading.Lock()
_state: dict[str, bool] = {}


def kernel_available() -> bool:
    """True when the compiled kernel is loaded (building it on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("DISTSERVE_PAGED_KERNEL", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension
        # torch rebuilds when a source changes, not a header or the CPU (-march=native): the
        # digest of all of them and of the CPU's feature flags does
        sources = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()))
        digest = hashlib.sha256(sources + _cpu_flags()).hexdigest()[:12]
        cpp_extension.load(
            name="distserve_cpu_kernels", sources=[str(p) for p in _SOURCES], is_python_module=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fopenmp-simd", f"-DDISTSERVE_CSRC={digest}"],
            extra_ldflags=["-fopenmp"], verbose=False)
        return all(hasattr(torch.ops.distserve_cpu, op) for op in
                   ("paged_decode_attention", "add_rms_norm_", "silu_mul", "rotary_cache_write",
                    "amx_linear", "dpbf16_linear", "argmax_rows"))
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
