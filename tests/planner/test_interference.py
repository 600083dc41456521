"""benchmarks/interference.py on a tiny random-weight model: real engines, a real neighbour
process on the other core and real host work on the victim's core, paused and resumed."""
import math
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import interference  # noqa: E402


def children(pid: int) -> set[int]:
    task = pathlib.Path(f"/proc/{pid}/task")
    return {int(c) for t in task.iterdir() for c in (t / "children").read_text().split()}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs Linux and two cores")
def test_interference_measures_both_effects_and_leaves_no_process_behind(tiny_llama):
    import torch
    before, affinity, threads = children(os.getpid()), os.sched_getaffinity(0), torch.get_num_threads()
    lines = []
    doc = interference.measure(str(tiny_llama), rounds=3, window_s=0.1, prefill_len=64, batch=4,
                               context=32, log=lines.append)
    assert children(os.getpid()) == before
    # the caller's processes started afterwards must not inherit the victim's single core
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads
    for victim in ("prefill", "decode"):
        for neighbour in ("prefill", "decode"):
            # a ratio of two timings: its size depends on the machine's load, so only its
            # shape is checked here (the benchmark reports the numbers)
            ratio = doc["contention"][victim][neighbour]
            assert ratio["n"] == 3
            assert all(math.isfinite(ratio[q]) and ratio[q] > 0 for q in ("q1", "median", "q3"))
        # the host process ran on the victim's core: it took some of it, and cost some time
        assert 0 < doc["host_share"][victim] <= 1
        assert all(math.isfinite(doc["host_cost"][victim][q]) for q in ("q1", "median", "q3"))
    assert len(lines) == 6


def test_interference_cli_rejects_a_bad_round_count(capsys):
    with pytest.raises(SystemExit) as e:
        interference.main(["--rounds", "0"])
    assert e.value.code == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
