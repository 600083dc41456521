"""An instance's log of when each request reached it, when each model step ran and on what,
and when first tokens left: for finding where the time goes in a served deployment (the
simulator-vs-reality check reads it, distserve/planner/step_traces.py).

Off unless DISTSERVE_STEP_TRACE names a folder; each instance then appends JSON lines to
<folder>/<instance id>.jsonl. Times are time.monotonic(), one clock for every process here.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

ENV = "DISTSERVE_STEP_TRACE"


class StepTrace:
    def __init__(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # line by line: readable while it runs

    @classmethod
    def from_env(cls, instance_id: str) -> "StepTrace | None":
        folder = os.environ.get(ENV)
        return cls(pathlib.Path(folder) / f"{instance_id}.jsonl") if folder else None

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def received(self, request_id: str, arrival_time: float | None, num_prompt_tokens: int) -> None:
        self._write({"ev": "recv", "t": time.monotonic(), "id": request_id,
                     "arrival": arrival_time, "prompt": num_prompt_tokens})

    def step(self, start: float, end: float, prefills: list, decodes: list) -> None:
        """One model-runner call: prefill chunks as [request id, tokens, context after], and
        the decode batch's contexts."""
        self._write({"ev": "step", "t0": start, "t1": end,
                     "prefill": [[r.request_id, n, r.num_computed_tokens + n] for r, n in prefills],
                     "decode": [r.num_tokens for r in decodes]})

    def sent(self, request_ids: list[str]) -> None:
        self._write({"ev": "sent", "t": time.monotonic(), "ids": request_ids})

    def close(self) -> None:
        self._file.close()
