"""The setup the simulator-vs-reality check (benchmarks/sim_vs_real.py) shares between its
steps: paths, the model, the instances' limits, the two deployments and the workloads. Plain
data; it must never run anything.
"""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
PROFILE = RESULTS / "sim_vs_real_profile.json"
MODEL_KEY = "SmolLM2-135M-Instruct"
BLOCK = 16
MAX_NUM_SEQS = 256
MAX_BATCHED_TOKENS = 2048
KV_GIB = 1.0
PROBE_REQUESTS = 8
CALIBRATION_REQUESTS = 30   # before each rate: the machine's speed right then
INTERFERENCE_ROUNDS = 20    # benchmarks/interference.py, with the profile
RUN_OVERHEAD_S, PROBE_S, SERVER_START_S = 12, 30, 15   # for the time estimate
DEPLOYMENTS = {
    "colocated": ["--mode", "colocated", "--instances", "2", "--num-threads", "1"],
    "disagg": ["--prefill-instances", "1", "--decode-instances", "1",
               "--prefill-threads", "1", "--decode-threads", "1"],
}
# per workload: the profile's shapes cover its lengths; the planner's length data of the same
# dataset (SmolLM2 tokens) gives the mean prompt for the SLOs and the fresh traces
WORKLOADS = {
    "humaneval": {"lengths": "humaneval-trace", "prefill_lens": "16,32,64,128,256,384,512",
                  "contexts": "64,256,512", "max_total_len": None},
    "sharegpt": {"lengths": "sharegpt-trace", "prefill_lens": "16,64,128,256,512,1024,1536,2000",
                 "contexts": "128,512,1024,2000", "max_total_len": None},
}
