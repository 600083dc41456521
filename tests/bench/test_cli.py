"""`distserve bench` end to end against the loopback stand-in server: results, sweeps, plots,
dry runs and bad input."""

import argparse
import json
import socket
import subprocess
import sys

import pytest

from distserve.bench import cli

pytestmark = pytest.mark.usefixtures("bench_tokenizer")  # load it once, outside any test's time

SMALL = ["--dataset", "random", "--random-input-len", "16", "--random-output-len", "6",
         "--num-prompts", "6", "--disable-tqdm", "--request-timeout", "20"]


def bench(base_url, *args):
    return cli.main(["--base-url", base_url, *SMALL, *args])


def check_run(result, n):
    """The invariants of one run's result document."""
    assert result["num_success"] + result["num_failed"] == result["num_requests"] == n == len(result["requests"])
    assert result["request_goodput"] <= result["request_throughput"] + 1e-12
    assert 0.0 <= result["slo_attainment"] <= min(result["ttft_attainment"], result["tpot_attainment"]) <= 1.0
    good = 0
    for r in result["requests"]:
        assert set(r) >= {"ttft", "tpot", "e2el", "input_len", "output_len", "success", "error"}
        assert r["success"] == (r["error"] == "")
        if r["success"]:
            assert 0 < r["ttft"] <= r["e2el"] and r["tpot"] >= 0
            good += r["ttft"] <= result["ttft_slo"] and r["tpot"] <= result["tpot_slo"]
    assert result["slo_attainment"] == pytest.approx(good / n)


def test_single_run_prints_the_vllm_block_and_saves_json(serve_fake, tmp_path, capsys):
    _, url = serve_fake("ok")
    out = tmp_path / "r.json"
    assert bench(url, "--request-rate", "50", "--ttft-slo", "2", "--tpot-slo", "0.5",
                 "--ignore-eos", "--save-result", str(out)) == 0
    text = capsys.readouterr().out
    for line in ("============ Serving Benchmark Result ============", "Successful requests:",
                 "Failed requests:", "Benchmark duration (s):", "Request goodput (req/s):",
                 "P99 TTFT (ms):", "Median TPOT (ms):", "Mean ITL (ms):", "P90 E2EL (ms):",
                 "Both SLOs met (%):", "TTFT SLO met (%):", "TPOT SLO met (%):"):
        assert line in text, line
    result = json.loads(out.read_text())
    check_run(result, 6)
    assert result["model"] == "fake-model" and result["num_success"] == 6
    assert all(r["output_len"] == 6 for r in result["requests"])


def test_rate_sweep_with_plot(serve_fake, tmp_path, capsys):
    server, url = serve_fake("serial", num_gpus=2)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert bench(url, "--request-rate", "5,100", "--ttft-slo", "0.3", "--tpot-slo", "0.05",
                 "--save-result", str(out), "--plot", str(png)) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "rate_sweep" and doc["num_gpus"] == 2
    assert [p["request_rate"] for p in doc["points"]] == [5.0, 100.0]
    for run in doc["runs"]:
        check_run(run, 6)
    assert doc["num_success"] + doc["num_failed"] == 12
    assert len(server.bodies) == 13  # the test request, then 6 per rate
    if doc["goodput"] is not None:
        assert doc["per_gpu_goodput"] == pytest.approx(doc["goodput"] / 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Rate Sweep" in capsys.readouterr().out
    # each rate ran its own seed: no prompt repeats across runs
    prompts = [b["prompt"] for b in server.bodies[1:]]
    assert len(set(prompts)) == 12


def test_slo_scale_sweep_uses_one_run(serve_fake, tmp_path, capsys):
    server, url = serve_fake("ok")
    out = tmp_path / "scale.json"
    assert bench(url, "--request-rate", "inf", "--ttft-slo", "0.2", "--tpot-slo", "0.02",
                 "--slo-scale", "0.01,1,100", "--save-result", str(out), "--plot", str(tmp_path / "s.png")) == 0
    doc = json.loads(out.read_text())
    check_run(doc, 6)
    sweep = doc["slo_scale_sweep"]
    attained = [p["slo_attainment"] for p in sweep["points"]]
    assert [p["slo_scale"] for p in sweep["points"]] == [0.01, 1.0, 100.0]
    assert attained == sorted(attained) and attained[0] == 0.0 and attained[-1] == 1.0
    assert sweep["min_slo_scale"] is not None and 0.01 < sweep["min_slo_scale"] <= 100
    assert len(server.bodies) == 7
    assert "SLO Scale Sweep" in capsys.readouterr().out


def test_failed_requests_are_counted_not_fatal(serve_fake, tmp_path):
    _, url = serve_fake("flaky")
    out = tmp_path / "f.json"
    assert bench(url, "--ttft-slo", "5", "--tpot-slo", "1", "--save-result", str(out)) == 0
    doc = json.loads(out.read_text())
    check_run(doc, 6)
    assert doc["num_failed"] == 3 and all("HTTP 500" in r["error"] for r in doc["requests"] if not r["success"])


@pytest.mark.parametrize("mode,message", [("error500", "HTTP 500: engine exploded"),
                                          ("malformed", "malformed SSE chunk")])
def test_a_server_that_only_fails_exits_nonzero_and_saves(serve_fake, tmp_path, capsys, mode, message):
    _, url = serve_fake(mode)
    out = tmp_path / "e.json"
    assert bench(url, "--save-result", str(out)) == 1
    assert message in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["num_success"] == 0 and message in doc["requests"][0]["error"]


def test_unreachable_server(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "u.json"
    assert bench(f"http://127.0.0.1:{port}", "--save-result", str(out)) == 1
    assert "cannot reach the server" in capsys.readouterr().err
    assert "cannot reach" in json.loads(out.read_text())["error"]


@pytest.mark.parametrize("args,message", [
    (["--request-rate", "fast"], "--request-rate 'fast'"),
    (["--request-rate", "1,2", "--slo-scale", "1,2", "--ttft-slo", "1"], "not both"),
    (["--request-rate", "1,2"], "needs --ttft-slo"),
    (["--ttft-slo", "-1"], "--ttft-slo must be > 0"),
    (["--dataset", "jsonl"], "--dataset-path"),
])
def test_bad_arguments_exit_2_naming_the_value(args, message, capsys):
    assert cli.main(["--base-url", "http://127.0.0.1:9", *SMALL, *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--dataset", "alpaca"])
    assert exc.value.code == 2 and "invalid choice: 'alpaca'" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["sharegpt", "humaneval", "longbench", "random"])
def test_dry_run_prints_lengths_and_sends_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert cli.main(["--dataset", dataset, "--num-prompts", "40", "--dry-run", "--base-url",
                     "http://127.0.0.1:9", "--save-result", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"Dataset: {dataset} (40 requests)" in text and "Input tokens: mean" in text
    assert json.loads(out.read_text())["lengths"]["count"] == 40


def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser(prog="distserve")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--request-rate", "2", "--num-prompts", "3"])
    assert args.func is cli.run and args.request_rate == "2" and args.num_prompts == 3


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "distserve.bench.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--request-rate" in done.stdout


def test_interrupted_run_saves_what_it_has(tmp_path):
    from distserve.bench.metrics import RequestRecord
    from distserve.bench.runner import RunConfig
    from distserve.bench.workload import BenchRequest, Workload

    workload = Workload("random", [BenchRequest("a", 3, 2), BenchRequest("b", 3, 2)])
    done = RequestRecord(3, 2, success=True, output_len=2, ttft=0.1, last_token_time=0.2, e2el=0.25, itl=[0.1])
    state = cli.State(records=[done, RequestRecord(3, 2, error="cancelled")])
    state.current = (RunConfig("http://x", "m", request_rate=1.0), workload, 0.0, {}, 1.0, 1.0)
    out = tmp_path / "partial.json"
    cli._save_partial(argparse.Namespace(save_result=str(out)), state)
    doc = json.loads(out.read_text())
    assert doc["interrupted"] and doc["num_success"] == 1 and doc["num_failed"] == 1
    assert doc["requests"][1]["error"] == "cancelled"
