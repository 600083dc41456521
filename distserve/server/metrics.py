"""Prometheus metrics with vLLM's shapes under our own prefix (`distserve:`).

Each app has its own registry, so several servers (or tests) in one process never share
counters. Latencies come from the engine's monotonic timestamps where it has them (TTFT,
end to end) and from arrival times at the server otherwise (inter-token latency).
"""
from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from distserve.cluster.messages import EngineStats
from distserve.cluster.messages import RequestOutput
from distserve.server.slo import SLOWindow
from distserve.slo import meets

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                   65536, 131072)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


RELIABILITY = {   # what the controller counts since start (Controller.counts)
    "internal_messages_dropped": "Frames on the deployment's internal ports that were not "
                                 "authentic messages of one of its instances.",
    "instance_failures": "Instances found dead or silent (no heartbeat), and restarts that failed.",
    "instance_restarts": "Instances started again after a failure.",
    "requests_rerun": "Requests run again on another instance after theirs failed.",
    "kv_pulls_recomputed": "Prompts a decode instance computed itself after their KV pull "
                           "failed twice (--kv-pull-failure recompute).",
    "requests_rejected_busy": "Requests refused with 429: --max-queued-requests were waiting.",
    "requests_rejected_late": "Requests refused with 429 by --reject-late: their predicted TTFT "
                              "was over the TTFT SLO.",
    "role_switches": "Instances switched between prefill and decode in place (--adapt).",
}


class ServerMetrics:
    def __init__(self, model_name: str, slo: SLOWindow | None = None, monitor=None) -> None:
        self.slo = slo
        self.monitor = monitor   # a server.plan_monitor.PlanMonitor under `serve --plan`
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry

        def hist(name, doc, buckets):
            return Histogram(f"distserve:{name}", doc, labels, buckets=buckets,
                             registry=reg).labels(model_name)

        def gauge(name, doc):
            return Gauge(f"distserve:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(f"distserve:{name}", doc, labels, registry=reg).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token (TTFT).",
                         _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds",
                        "Time between consecutive streamed tokens.", _TOKEN_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds",
                         "Per request: (e2e - TTFT) / (output tokens - 1) (TPOT).",
                         _TOKEN_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.",
                        _E2E_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).")
        self.kv_free = gauge("kv_cache_free_blocks", "KV blocks free.")
        self.kv_total = gauge("kv_cache_total_blocks", "KV blocks in the cache.")
        self.reliability = {key: gauge(key, doc) for key, doc in RELIABILITY.items()}
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens of each "
                                          "finished request.", _LENGTH_BUCKETS)
        self.request_generation_tokens = hist("request_generation_tokens", "Tokens generated "
                                              "for each finished request.", _LENGTH_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter("distserve:request_success", "Requests that finished.",
                                labels + ["finished_reason"], registry=reg)
        self._model_name = model_name
        if slo is not None:
            self.slo_attainment = gauge(
                "slo_attainment", f"Share of requests finished in the last {slo.window_s:g} s "
                f"meeting both TTFT <= {slo.ttft_slo:g} s and TPOT <= {slo.tpot_slo:g} s.")
            self.ttft_attainment = gauge("slo_ttft_attainment", "Share meeting the TTFT SLO.")
            self.tpot_attainment = gauge("slo_tpot_attainment", "Share meeting the TPOT SLO.")
            self.goodput = gauge("goodput_requests_per_second",
                                 "Requests meeting both SLOs per second, over the window.")
        if monitor is not None:
            self._plan = {key: gauge(key, doc) for key, doc in PLAN_GAUGES.items()}
            self._lengths = Gauge("distserve:workload_mean_tokens", "Mean input and output "
                                  "lengths of the last drift check's requests, observed and "
                                  "as planned.", labels + ["side", "source"], registry=reg)
            self._pvalues = Gauge("distserve:workload_drift_pvalue", "p-value of each drift "
                                  "test of the last check (input and output lengths: "
                                  "Kolmogorov-Smirnov; attainment: binomial, below the plan).",
                                  labels + ["test"], registry=reg)
            self._speed = Gauge("distserve:plan_model_step_speed", "The instances' model "
                                "steps' time over the plan's latency profile, per phase, at "
                                "the last --adapt check (1: as profiled, 1.25: 25% slower).",
                                labels + ["phase"], registry=reg)
        per_instance = ["model_name", "instance", "role"]
        self._instance_gauges = {
            key: Gauge(f"distserve:instance_{key}", doc, per_instance, registry=reg)
            for key, doc in (("up", "1 while the instance is serving, 0 while it is down or "
                              "restarting."),
                             ("num_requests_running", "Requests running (decode/colocated) or "
                              "holding KV for migration (prefill)."),
                             ("num_requests_waiting", "Requests queued on the instance."),
                             ("queued_prompt_tokens", "Prompt tokens waiting (prefill)."),
                             ("kv_cache_usage_perc", "Fraction of the instance's KV blocks in use."),
                             ("kv_transfer_bytes", "KV bytes pulled by this instance (decode)."),
                             ("kv_transfer_seconds", "Seconds spent pulling KV (decode)."),
                             ("kv_transfers", "KV pulls done by this instance (decode)."))}

    def track(self) -> RequestTracker:
        """A request arrived: its tracker (and the plan monitor counts its arrival)."""
        if self.monitor is not None:
            self.monitor.arrived()
        return RequestTracker(self)

    def finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def render(self, stats: EngineStats, instances: list | None = None,
               counts: dict | None = None, up: dict | None = None) -> bytes:
        """The text exposition, with the gauges read from the engine's latest snapshot and,
        for a multi-instance deployment, each instance's last report, whether it is up, and
        the controller's counts of RELIABILITY events."""
        for key, value in (counts or {}).items():
            self.reliability[key].set(value)
        for inst in instances or []:
            self._instance_gauges["up"].labels(self._model_name, inst.instance_id, inst.role).set(
                1 if (up or {}).get(inst.instance_id, True) else 0)
        for inst in instances or []:
            values = {"num_requests_running": inst.num_running,
                      "num_requests_waiting": inst.num_waiting,
                      "queued_prompt_tokens": inst.queued_tokens,
                      "kv_cache_usage_perc": inst.kv_usage,
                      "kv_transfer_bytes": inst.transfer_bytes,
                      "kv_transfer_seconds": inst.transfer_seconds,
                      "kv_transfers": inst.num_transfers}
            for key, value in values.items():
                self._instance_gauges[key].labels(self._model_name, inst.instance_id,
                                                  inst.role).set(value)
        if self.slo is not None:
            snap = self.slo.snapshot()
            self.slo_attainment.set(snap["attainment"])
            self.ttft_attainment.set(snap["ttft_attainment"])
            self.tpot_attainment.set(snap["tpot_attainment"])
            self.goodput.set(snap["goodput"])
        if self.monitor is not None:
            self._render_plan()
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_free.set(stats.num_free_blocks)
        self.kv_total.set(stats.num_blocks)
        return generate_latest(self.registry)


    def _render_plan(self) -> None:
        mon, check = self.monitor, self.monitor.last
        values = {"plan_arrival_rate": mon.arrival_rate(), "workload_drift_checks": mon.checks,
                  "workload_drifts": mon.drifts,
                  "workload_drifted": 1 if check is not None and check.drifted else 0}
        if check is not None:
            values["plan_predicted_attainment"] = check.planned.get("attainment", float("nan"))
            values["plan_observed_attainment"] = check.observed.get("attainment", float("nan"))
            for side in ("input", "output"):
                for source, d in (("observed", check.observed), ("planned", check.planned)):
                    self._lengths.labels(self._model_name, side, source).set(
                        d.get(f"{side}_mean", float("nan")))
            for test in ("input", "output", "attainment"):
                self._pvalues.labels(self._model_name, test).set(getattr(check, f"{test}_pvalue"))
        for key, value in values.items():
            self._plan[key].set(value)
        for phase, k in (mon.model_speed or {}).items():
            self._speed.labels(self._model_name, phase).set(k)


PLAN_GAUGES = {   # under `serve --plan`: the plan's predictions beside what is observed
    "plan_arrival_rate": "Requests per second over the plan monitor's window.",
    "plan_predicted_attainment": "The plan's simulated SLO attainment at the rate the last "
                                 "drift check's requests arrived at.",
    "plan_observed_attainment": "The SLO attainment of the last drift check's requests.",
    "workload_drift_checks": "Drift checks done (one per batch of fresh finished requests).",
    "workload_drifts": "Times the workload was found to have drifted from the plan.",
    "workload_drifted": "1 while the last checks in a row found the workload off the plan.",
}


class RequestTracker:
    """Turns one request's outputs into observations as they arrive."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.last_token_at: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            if self.last_token_at is None:
                if out.first_token_time is not None:
                    self.m.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
                self.m.prompt_tokens.inc(out.num_prompt_tokens)
            else:
                self.m.itl.observe(now - self.last_token_at)
            self.last_token_at = now
            self.m.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            self.m.finished(out.finish_reason or "unknown")
            end = out.finish_time if out.finish_time is not None else now
            self.m.e2e.observe(max(0.0, end - out.arrival_time))
            if out.first_token_time is None:
                return  # aborted before its first token: no latency to judge
            tpot = 0.0
            if out.num_output_tokens > 1:
                tpot = (end - out.first_token_time) / (out.num_output_tokens - 1)
                self.m.tpot.observe(tpot)
            if out.finish_reason == "abort":
                return
            ttft = out.first_token_time - out.arrival_time
            self.m.request_prompt_tokens.observe(out.num_prompt_tokens)
            self.m.request_generation_tokens.observe(out.num_output_tokens)
            if self.m.slo is not None:
                self.m.slo.record(ttft, tpot, end)
            if self.m.monitor is not None:
                self.m.monitor.record(out.arrival_time, end, out.num_prompt_tokens,
                                      out.num_output_tokens, all(meets(
                                          ttft, tpot, self.m.monitor.plan.ttft_slo,
                                          self.m.monitor.plan.tpot_slo)))
