"""Benchmarking any OpenAI-compatible server for goodput: workloads (ShareGPT, HumanEval,
LongBench-like, random, jsonl traces), a seeded arrival process, an async streaming client,
the paper's metrics, rate and SLO-scale sweeps, reports and plots. `distserve bench` is the
command (cli.py); nothing here imports the engine or the server."""
