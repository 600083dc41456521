"""The AVX2 linear kernel's prefetch distance, chosen per machine (models/avx2_tuning.py)."""
import json

import pytest
import torch

from distserve.models import avx2_tuning, paged_kernel
from distserve.models.packed_linear import amx_pack

needs_avx2 = pytest.mark.skipif(
    not (paged_kernel.kernel_available() and torch.ops.distserve_cpu.avx2_available()),
    reason="the AVX2 linear kernel is not built here (run through test_kernel_isas.py's AVX2 build)")


def test_a_later_candidate_must_be_clearly_faster():
    first, other = avx2_tuning.CANDIDATES
    assert avx2_tuning.choose({first: 1.0, other: 0.90}) == other
    assert avx2_tuning.choose({first: 1.0, other: 0.97}) == first   # within the margin
    assert avx2_tuning.choose({first: 0.9, other: 1.0}) == first


def test_the_environment_sets_the_distance_without_measuring(monkeypatch):
    monkeypatch.setenv("DISTSERVE_AVX2_PREFETCH", "4")
    assert avx2_tuning.prefetch_blocks() == 4
    for bad in ("-1", "ahead"):
        monkeypatch.setenv("DISTSERVE_AVX2_PREFETCH", bad)
        with pytest.raises(ValueError, match="DISTSERVE_AVX2_PREFETCH"):
            avx2_tuning.prefetch_blocks()


@needs_avx2
def test_the_distance_changes_no_value():
    torch.manual_seed(0)
    w = torch.randn(160, 96, dtype=torch.bfloat16)
    packed, x = amx_pack(w), torch.randn(3, 96, dtype=torch.bfloat16)
    outs = []
    before = torch.ops.distserve_cpu.avx2_set_prefetch_blocks(0)
    try:
        for blocks in (0, 3, 16, 64):
            assert torch.ops.distserve_cpu.avx2_set_prefetch_blocks(blocks) in (0, 3, 16, 64)
            out = torch.empty(3, 160, dtype=torch.bfloat16)
            torch.ops.distserve_cpu.avx2_linear(out, x, packed, None)
            outs.append(out)
        with pytest.raises(RuntimeError, match="blocks must be >= 0"):
            torch.ops.distserve_cpu.avx2_set_prefetch_blocks(-1)
    finally:
        torch.ops.distserve_cpu.avx2_set_prefetch_blocks(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


@needs_avx2
def test_the_choice_is_measured_once_and_kept_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DISTSERVE_AVX2_PREFETCH", raising=False)
    blocks = avx2_tuning.prefetch_blocks()
    assert blocks in avx2_tuning.CANDIDATES
    table = json.loads(avx2_tuning.cache_file().read_text())
    entry = table[avx2_tuning.machine_key()]
    assert entry["avx2_prefetch_blocks"] == blocks
    assert set(entry["GBps"]) == {str(c) for c in avx2_tuning.CANDIDATES}
    assert all(v > 0 for v in entry["GBps"].values())
    # later starts read the kept choice: an edited entry is what they get
    entry["avx2_prefetch_blocks"] = 7
    avx2_tuning.cache_file().write_text(json.dumps(table))
    assert avx2_tuning.prefetch_blocks() == 7
    # a broken file is measured again and rewritten
    avx2_tuning.cache_file().write_text("{not json")
    assert avx2_tuning.prefetch_blocks() in avx2_tuning.CANDIDATES
    assert avx2_tuning.machine_key() in json.loads(avx2_tuning.cache_file().read_text())
