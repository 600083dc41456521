"""`distserve serve [MODEL]`: a deployment behind the OpenAI-compatible API.

Default: one colocated engine in its own process, on every core (`--instances 0` keeps it in
the server's process, where its thread shares the interpreter lock with the HTTP loop: under
load the steps stretch). `--prefill-instances N --decode-instances M` starts a disaggregated
deployment (one process per instance, KV pulled over --transfer); `--mode colocated
--instances K` starts K colocated instance processes (the baseline).
Everything loads before the port opens, so /health answers 200 as soon as anyone can reach it.
"""
from __future__ import annotations

import argparse
import asyncio
import os

from distserve.server.admission import DEFAULT_MAX_QUEUED
from distserve.server.app import DEFAULT_MAX_BODY_BYTES


HTTP_TOPIC, DEPLOYMENT_TOPIC = "HTTP server and security", "deployment (instance processes)"
SLO_TOPIC, LIFECYCLE_TOPIC = "SLOs, metrics and drift", "failures and shutdown"
RAY_TOPIC = "several machines (Ray)"


def register(sub) -> None:
    from distserve.cli import (ENGINE_TOPIC, MODEL_TOPIC, PARALLEL_TOPIC, TRANSFER_TOPIC,
                               add_engine_args, arg_group)
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    for title in (MODEL_TOPIC, HTTP_TOPIC, DEPLOYMENT_TOPIC, ENGINE_TOPIC, PARALLEL_TOPIC,
                  TRANSFER_TOPIC, SLO_TOPIC, LIFECYCLE_TOPIC, RAY_TOPIC):
        arg_group(p, title)   # --help lists the topics in this order
    g = arg_group(p, MODEL_TOPIC)
    g.add_argument("model", nargs="?", default=None,
                   help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None,
                   help="the name clients use in 'model' (default: the model's own name)")
    g = arg_group(p, HTTP_TOPIC)
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port")
    g.add_argument("--api-key", default=os.environ.get("DISTSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $DISTSERVE_API_KEY, which keeps the key out of `ps`)")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted (default 4 MiB); larger ones get 413")
    g = arg_group(p, SLO_TOPIC)
    g.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED,
                   help="requests waiting for their first token before new ones get 429 with "
                        f"Retry-After (default {DEFAULT_MAX_QUEUED})")
    g.add_argument("--reject-late", action="store_true",
                   help="refuse (429) a request whose predicted queueing + prefill exceeds the "
                        "TTFT SLO (needs --ttft-slo/--tpot-slo or a --plan)")
    g = arg_group(p, LIFECYCLE_TOPIC)
    g.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGTERM or Ctrl-C")
    g.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"], help="HTTP server log level")
    add_engine_args(p)
    add_deployment_args(p)
    p.set_defaults(func=run_serve)


def add_deployment_args(p: argparse.ArgumentParser) -> None:
    from distserve.cli import PARALLEL_TOPIC, TRANSFER_TOPIC, arg_group
    g = arg_group(p, DEPLOYMENT_TOPIC)
    g.add_argument("--plan", default=None, help="a plan file from `distserve plan` (YAML or "
                   "JSON): deploys the mode its verdict chose, its instance counts, TP and PP, "
                   "batching limits and placement; the plan must be for the served model")
    g.add_argument("--ignore-plan-model", action="store_true", help="serve the model given with "
                   "a plan made for another one (a warning: its predictions will not hold)")
    g.add_argument("--mode", choices=["colocated", "disaggregated"], default=None,
                   help="default: disaggregated when --prefill/--decode-instances are given")
    g.add_argument("--instances", type=int, default=None,
                   help="colocated instance processes (default 1), sharing the cores unless "
                        "--num-threads says otherwise (0: one engine inside the server's process)")
    g.add_argument("--prefill-instances", type=int, default=0,
                   help="prefill instance processes (with --decode-instances: disaggregated)")
    g.add_argument("--decode-instances", type=int, default=0, help="decode instance processes")
    g.add_argument("--prefill-threads", type=int, default=None, help="threads per prefill instance")
    g.add_argument("--decode-threads", type=int, default=None, help="threads per decode instance")
    g.add_argument("--prefill-max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens in one prefill batch (a longer prompt runs alone)")
    g.add_argument("--decode-max-num-seqs", type=int, default=None,
                   help="requests in one decode batch (default: --max-num-seqs)")
    g.add_argument("--prefill-kv-cache-memory", type=float, default=None, help="GiB")
    g.add_argument("--decode-kv-cache-memory", type=float, default=None, help="GiB")
    g.add_argument("--no-pin-cpus", action="store_true", help="do not pin instances to cores")
    g = arg_group(p, PARALLEL_TOPIC)
    g.add_argument("--prefill-tp", type=int, default=None, help="tensor-parallel workers per "
                   "prefill instance (default: --tp)")
    g.add_argument("--prefill-pp", type=int, default=None, help="pipeline stages per prefill "
                   "instance (default: --pp)")
    g.add_argument("--decode-tp", type=int, default=None, help="tensor-parallel workers per "
                   "decode instance (default: --tp)")
    g.add_argument("--decode-pp", type=int, default=None, help="pipeline stages per decode "
                   "instance (default: --pp)")
    g = arg_group(p, TRANSFER_TOPIC)
    g.add_argument("--transfer", choices=["shm", "tcp", "cuda_ipc"], default=None,
                   help="KV transfer: shm (same host, KV in host memory; the default), tcp "
                        "(raw bytes over a socket, any host, CPU or GPU; the default with "
                        "--launcher ray) or cuda_ipc (instances on CUDA GPUs of one node: "
                        "GPU to GPU, never through host memory)")
    g = arg_group(p, RAY_TOPIC)
    g.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local: instance processes on this machine; ray: Ray actors on the "
                        "nodes of a Ray cluster, placed as a --plan says (needs .[ray])")
    g.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join (default: $RAY_ADDRESS, a cluster started "
                        "with `ray start` on this machine, or else a new local one)")
    g = arg_group(p, SLO_TOPIC)
    g.add_argument("--ttft-slo", type=float, default=None, help="seconds; with --tpot-slo, "
                   "/metrics exports SLO attainment and goodput over --slo-window")
    g.add_argument("--tpot-slo", type=float, default=None, help="seconds")
    g.add_argument("--slo-window", type=float, default=60.0, help="seconds")
    g.add_argument("--drift-batch", type=int, default=100, help="with --plan: finished "
                   "requests per drift check of the workload against the plan")
    g.add_argument("--drift-checks", type=int, default=3, help="with --plan: checks in a row "
                   "that must find the workload off the plan before it counts as drifted")
    g.add_argument("--adapt", action="store_true", help="with a disaggregated --plan: every "
                   "--adapt-interval, score each split of the instances between prefill and "
                   "decode on the observed workload (the plan's latency model) and switch one "
                   "instance's role in place when another split wins by --adapt-margin twice "
                   "in a row (model kept loaded, no request lost)")
    g.add_argument("--adapt-interval", type=float, default=30.0, help="seconds between "
                   "--adapt checks")
    g.add_argument("--adapt-margin", type=float, default=0.05, help="SLO attainment (0-1) "
                   "another split must win by before an instance switches")
    g.add_argument("--adapt-window", type=float, default=120.0, help="seconds of finished "
                   "requests each --adapt check judges the workload on")
    g.add_argument("--adapt-min-requests", type=int, default=20, help="finished requests the "
                   "--adapt-window must hold before a check judges anything")
    g.add_argument("--adapt-speed", choices=("measured", "profile"), default="measured",
                   help="score the splits with the plan's latency model at the speed the "
                   "instances' model steps ran in the --adapt-window (measured: on /metrics as "
                   "distserve:plan_model_step_speed), or at the profile's own")


def deployment_from_args(args: argparse.Namespace, config):
    """None for the in-process engine, else the Deployment the flags (or --plan) describe."""
    from distserve.cluster.deployment import Deployment
    pin_cpus = not args.no_pin_cpus and args.launcher == "local"
    transfer = args.transfer or ("tcp" if args.launcher == "ray" else "shm")
    if args.plan:
        from distserve.planner.plan import Plan
        if (args.prefill_instances or args.decode_instances or args.instances is not None
                or args.mode):
            raise ValueError("--plan sets the deployment; drop --mode/--instances/"
                             "--prefill-instances/--decode-instances")
        plan = Plan.load(args.plan)
        mismatch = plan_model_mismatch(plan, args.model)
        if mismatch and not args.ignore_plan_model:
            raise ValueError(f"{mismatch}; serve the plan's model, or add --ignore-plan-model "
                             "to deploy the plan for this one anyway")
        deployment = Deployment.from_plan(plan, config, transfer, pin_cpus, args.launcher)
        if args.adapt:
            fixed = deployment.make_switchable()
            if fixed:
                deployment.warnings.append(f"--adapt leaves {', '.join(fixed)} in their roles "
                                           "(instances of several workers cannot switch)")
        if mismatch:
            deployment.warnings.append(f"{mismatch}: its predicted goodput does not apply")
        if (len(deployment.nodes) > 1 and transfer in ("shm", "cuda_ipc")
                and args.launcher == "ray"):
            raise ValueError(f"--transfer {transfer} reaches only instances on one node; the "
                             "plan places them on several: use --transfer tcp")
        return deployment
    if args.launcher == "ray" and args.instances == 0:
        raise ValueError("--launcher ray starts instance processes; --instances 0 runs the "
                         "engine inside the server's process")
    return Deployment.from_flags(
        config, args.mode, args.instances, args.prefill_instances, args.decode_instances,
        args.prefill_threads, args.decode_threads, args.prefill_max_num_batched_tokens,
        args.decode_max_num_seqs, args.prefill_kv_cache_memory, args.decode_kv_cache_memory,
        transfer, pin_cpus, prefill_tp=args.prefill_tp, prefill_pp=args.prefill_pp,
        decode_tp=args.decode_tp, decode_pp=args.decode_pp)


def plan_model_mismatch(plan, served: str | None) -> str:
    """Why the served model (a folder, a .gguf, or None: the built-in one) is not the model
    the plan was made for, or "": the same shape (layers, widths, heads, vocabulary) when
    both are known, else the same name."""
    import os

    from distserve.planner.models import get_model, model_key
    from distserve.server.kv_budget import served_model_spec
    try:
        planned = get_model(plan.model)
    except (ValueError, OSError, KeyError):
        planned = None
    serving, name = served_model_spec(served)
    if planned is not None and serving is not None:
        same = planned.shape == serving.shape
    else:
        stem = os.path.basename(str(served or "").rstrip("/")).split(".")[0]
        same = model_key(plan.model) in (model_key(stem), model_key(getattr(serving, "name", "")))
    return "" if same else f"the plan was made for {plan.model}; this serves {name}"


def _fit_kv_to_memory(args, config, deployment):
    """The default KV budget, sized from the machine's memory and the model (kv_budget.py)."""
    from distserve.server.kv_budget import fit_default_kv
    return fit_default_kv(args, config, deployment, lambda c: deployment_from_args(args, c))


def slo_from_args(args: argparse.Namespace, deployment=None):
    """--ttft-slo/--tpot-slo, or else the plan's SLOs."""
    from distserve.server.slo import SLOWindow
    from distserve.slo import check_slo_seconds
    if (args.ttft_slo is None) != (args.tpot_slo is None):
        raise ValueError("give both --ttft-slo and --tpot-slo, or neither")
    check_slo_seconds(args.ttft_slo, args.tpot_slo)
    ttft, tpot = args.ttft_slo, args.tpot_slo
    if ttft is None and deployment is not None and deployment.ttft_slo is not None:
        ttft, tpot = deployment.ttft_slo, deployment.tpot_slo
    return None if ttft is None else SLOWindow(ttft, tpot, args.slo_window)


def run_serve(args: argparse.Namespace) -> int:
    from distserve.cli import engine_config_from_args

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.adapt and not args.plan:
        raise ValueError("--adapt re-plans the split of a plan's instances: give --plan")
    if args.adapt and (args.adapt_interval <= 0 or args.adapt_window <= 0
                       or args.adapt_min_requests < 1 or not 0 <= args.adapt_margin < 1):
        raise ValueError(f"--adapt-interval and --adapt-window must be > 0, --adapt-min-requests "
                         f">= 1 and --adapt-margin in [0, 1), got {args.adapt_interval}, "
                         f"{args.adapt_window}, {args.adapt_min_requests} and {args.adapt_margin}")
    check_port_free(args.host, args.port)   # before minutes of loading, not after
    config = engine_config_from_args(args, args.model)
    deployment = deployment_from_args(args, config)
    if args.kv_cache_memory_gib is None and args.num_kv_blocks is None:
        config, deployment = _fit_kv_to_memory(args, config, deployment)
    for warning in deployment.warnings if deployment is not None else ():
        print(f"warning: {warning}", flush=True)
    slo = slo_from_args(args, deployment)
    if args.reject_late and slo is None:
        raise ValueError("--reject-late needs a TTFT SLO: give --ttft-slo and --tpot-slo (or a --plan)")
    monitor = plan_monitor_from_args(args)
    if args.adapt and monitor is None:
        raise ValueError("--adapt needs the plan's workload to be readable here (see the "
                         "warning above)")
    try:
        return asyncio.run(_serve(args, config, deployment, slo, monitor))
    finally:
        if monitor is not None:
            monitor.close()


def check_port_free(host: str, port: int) -> None:
    """Refuse at once a port another process holds, as uvicorn would after the model loaded."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} cannot be resolved: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as e:
            raise ValueError(f"--port {port} on {host} cannot be used: {e.strerror} "
                             "(another server holds it?); choose another --port") from None


def plan_monitor_from_args(args):
    """Under --plan, the monitor that sets the plan against the observed workload (None if the
    plan's workload cannot be read here); its predicted attainment only where the plan can be
    simulated on this machine."""
    if not args.plan:
        return None
    if args.drift_batch < 10 or args.drift_checks < 1:
        raise ValueError(f"--drift-batch must be >= 10 and --drift-checks >= 1, got "
                         f"{args.drift_batch} and {args.drift_checks}")
    from distserve.planner.plan import Plan
    from distserve.server.plan_monitor import PlanMonitor, plan_predictor
    plan = Plan.load(args.plan)
    try:
        predictor = plan_predictor(plan)
    except (ValueError, OSError) as e:
        print(f"warning: the plan's predicted attainment is not exported: {e}", flush=True)
        predictor = None
    try:
        return PlanMonitor(plan, predictor, min_requests=args.drift_batch,
                           consecutive=args.drift_checks)
    except (ValueError, OSError) as e:
        print(f"warning: no drift detection: the plan's workload {plan.workload!r} cannot be "
              f"read here ({e})", flush=True)
        return None


def _model_root(model: str | None) -> str | None:
    """The served model's folder or .gguf file, absolute (what /v1/models calls root)."""
    from distserve.models.locate import locate_model
    try:
        return str(locate_model(model)[1].resolve())
    except FileNotFoundError:
        return None


async def _serve(args, config, deployment, slo, monitor=None) -> int:
    import uvicorn

    from distserve.server.app import build_app

    print(f"loading {args.model or 'the built-in SmolLM2-135M-Instruct'} ...", flush=True)
    adapting = None
    if deployment is None:
        from distserve.engine.async_engine import AsyncEngine
        from distserve.engine.engine import Engine
        client = await asyncio.to_thread(lambda: AsyncEngine(Engine(config)))
        what = "1 colocated engine in-process"
    else:
        from distserve.controller import Controller
        launcher, host = _launcher(args, deployment)   # before anything runs on the loop
        client = Controller(deployment.specs, args.model, launcher,
                            transfer=deployment.transfer, host=host)
        kernels = _build_kernels_aside(args, config)
        try:
            await client.start()
        except BaseException:   # a failed start leaves no builder behind
            if kernels is not None:
                kernels.kill()
            raise
        if kernels is not None:
            await asyncio.to_thread(kernels.wait)
        adapting = _start_adaptation(args, client, monitor)
        what = ", ".join(f"{s.instance_id} ({_parallelism(s)}cpus {s.devices or 'any'})"
                         for s in deployment.specs)
        if args.launcher == "ray":
            what += f" on the Ray cluster at {launcher.ray.get_runtime_context().gcs_address}"
    app = build_app(client, args.served_model_name, args.api_key, slo,
                    max_body_bytes=args.max_request_bytes,
                    max_queued_requests=args.max_queued_requests, reject_late=args.reject_late,
                    plan_monitor=monitor, model_root=_model_root(args.model))
    name = args.served_model_name or client.model_name
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 with {what} "
          f"(context {client.max_model_len} tokens, {client.stats().num_blocks} KV blocks)",
          flush=True)
    http_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_graceful_shutdown=args.drain_timeout)
    server = _draining_server()(http_config)
    try:
        await server.serve()
    finally:   # SIGTERM and Ctrl-C come here too: every instance is stopped
        if adapting is not None:
            adapting.cancel()
        if deployment is None:
            client.shutdown()
        else:
            await client.shutdown()
    if server.stopped_by:
        print(f"stopped by signal {server.stopped_by[0]}: drained and shut down", flush=True)
    return 0


def _build_kernels_aside(args, config):
    """Where instances run on this machine's CPU: the process that builds the CPU kernels, or
    finds them built, alongside the instances' start. Its messages (what it builds, why, how
    long it took) reach this console, where an instance's go to its log; the instances wait
    for its build and then load it. None where there is nothing to build here."""
    import subprocess
    import sys

    from distserve.cluster.deployment import instance_device
    if (args.launcher != "local" or not instance_device(config).startswith("cpu")
            or os.environ.get("DISTSERVE_PAGED_KERNEL") == "0"):
        return None
    return subprocess.Popen([sys.executable, "-m", "distserve.models.paged_kernel"],
                            stdin=subprocess.DEVNULL)


def _start_adaptation(args, controller, monitor):
    """Under --adapt, the task that moves instances between prefill and decode (None else)."""
    if not args.adapt:
        return None
    from distserve.planner.adapt import Hysteresis
    from distserve.server.adaptation import Adaptation
    from distserve.server.plan_monitor import plan_problem
    adaptation = Adaptation(controller, monitor, plan_problem(monitor.plan), monitor.plan,
                            args.adapt_interval, Hysteresis(margin=args.adapt_margin),
                            min_observed=args.adapt_min_requests, window_s=args.adapt_window,
                            measure_speed=args.adapt_speed == "measured")
    print(f"adapting: every {args.adapt_interval:g} s the split of the instances between prefill "
          f"and decode is re-planned on the workload of the last {args.adapt_window:g} s",
          flush=True)
    return asyncio.get_running_loop().create_task(adaptation.run())


def _draining_server():
    import contextlib

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM or Ctrl-C uvicorn stops admitting, lets in-flight requests finish for
        --drain-timeout seconds, and then re-raises the signal, which would end the process
        before the deployment is shut down and leave its instances behind. This one keeps the
        signal to itself: serve() returns, and the caller shuts the deployment down."""
        stopped_by: list = []

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self.stopped_by = list(self._captured_signals)
                self._captured_signals.clear()

    return DrainingServer


def _launcher(args, deployment):
    """(launcher, the address the controller binds to, which every instance must reach)."""
    if args.launcher == "ray":
        from distserve.cluster.ray_launcher import RayLauncher
        launcher = RayLauncher(deployment.specs, args.ray_address)
        return launcher, launcher.ray.util.get_node_ip_address()
    from distserve.cluster.local import LocalLauncher
    return LocalLauncher(), "127.0.0.1"


def _parallelism(spec) -> str:
    """'TP 2 x PP 1, ' for an instance of several workers; nothing for one worker."""
    return f"TP {spec.tp} x PP {spec.pp}, " if spec.tp * spec.pp > 1 else ""
