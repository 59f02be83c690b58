"""bench.py and the kernel benchmark still run on tiny shapes, so that they cannot rot.

bench.py runs on the CPU (`--device cpu`: fp32, the engine's CPU default, for nanovllm and transformers
alike). The kernel benchmark's correctness check runs where the kernels run: whatever GPU is here in
bf16, else the CPU in fp32 through Triton's interpreter.

No timings are asserted: only that every mode ran, and that its numbers exist and agree with each other.
"""
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402


def run_bench(model: str, out: Path, *flags) -> subprocess.CompletedProcess:
    # One thread per process: the tiny model's matmuls are faster that way, and dp's two processes share 2 cores.
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), "--model", model, "--device", "cpu",
                           "--input-len", "8", "24", "--output-len", "4", "8", "--max-model-len", "128",
                           "--timeout", "120", "--json", str(out), *flags],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_offline_runs_every_mode_on_the_same_requests(qwen3_path, tmp_path):
    # tp across 3 devices cannot split the tiny model's 4 heads: that mode must fail, and only that mode.
    out = tmp_path / "offline.json"
    run = run_bench(qwen3_path, out, "--modes", "single,dp,pd,tp,hf", "--tp-size", "3", "--num-requests", "4",
                    "--hf-requests", "2")
    assert run.returncode == 1 and "1 mode(s) failed: tp" in run.stderr, run.stderr[-4000:]
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert list(results) == ["single", "dp", "pd", "tp", "hf"]
    assert results["tp"]["error"]  # its reason, in the JSON and in the table:
    assert any(line.startswith("tp") and "failed: " in line for line in run.stdout.splitlines())
    del results["tp"]
    assert results["single"]["output_tokens"] == results["dp"]["output_tokens"] == results["pd"]["output_tokens"] > 0
    assert results["hf"]["requests"] == 2
    assert all(r["output_tok_s"] > 0 for r in results.values())
    dp = results["dp"]
    assert [w["requests"] for w in dp["workers"]] == [2, 2]  # requests dealt out in turn to the 2 engines
    assert dp["seconds"] == max(w["seconds"] for w in dp["workers"])  # until the last process is done
    for worker in dp["workers"]:
        assert all(0 < f <= 1 for f in worker["busy_fraction"].values())
        assert all(blocks > 0 for blocks in worker["peak_kv_blocks_used"].values())
    [pd] = results["pd"]["workers"]  # random prompts: no prefix-cache hits, and no preemption here
    assert sum(pd["prompt_tokens"].values()) == results["pd"]["input_tokens"] and pd["preemptions"] == 0
    assert report["roofline"]["bound_s"] > 0
    assert report["hf_roofline"]["output_tokens"] == results["hf"]["output_tokens"]  # hf's bound: its own requests
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert report["machine"]["torch"] and report["machine"]["gpus"] == gpus  # what the machine has, used or not


def test_step_trace_accounts_for_every_step(qwen3_path, tmp_path):
    """benchmarks/step_trace.py, on the CPU: every step recorded once, and summed into its table."""
    out = tmp_path / "trace.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_trace.py"), "--model", qwen3_path,
                          "--device", "cpu", "--num-requests", "4", "--input-len", "8", "24", "--output-len", "4", "8",
                          "--max-model-len", "128", "--json", str(out)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-4000:]
    trace = json.loads(out.read_text())
    steps, summary = trace["steps"], trace["summary"]
    assert sum(row["steps"] for row in summary["rows"]) == len(steps) == summary["steps"] > 0
    # Each request's first token comes from its prompt's step, every later one from a decode.
    assert sum(step["decodes"] for step in steps) == summary["roofline"]["output_tokens"] - 4
    assert all(step["gpu_ms"] > 0 for step in steps)
    assert summary["longest_gap"]["ms"] == max(step["gap_ms"] for step in steps)
    assert "gc" in summary and "cycle collector" in run.stdout


def test_step_trace_times_the_collections_of_the_cycle_collector():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_trace
    with step_trace.gc_pauses({}) as pauses:
        gc.collect()  # a full collection
        gc.collect(0)
    assert pauses[2][0] == 1 and pauses[0][0] >= 1 and pauses[2][2] > 0


def test_online_measures_latency_of_every_request(qwen3_path, tmp_path):
    out = tmp_path / "online.json"
    run = run_bench(qwen3_path, out, "--modes", "single,dp", "--online", "50", "--num-requests", "6")
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert list(results) == ["single", "dp"] and all(r["rate"] == 50 for r in results.values())
    assert "online at 50 req/s" in run.stdout
    # The same requests, arriving at the same times, in both modes.
    single, dp = ([(q["arrival_s"], q["prompt_len"], q["output_len"]) for q in r["per_request"]]
                  for r in results.values())
    assert single == dp and len(single) == 6
    assert [w["requests"] for w in results["dp"]["workers"]] == [3, 3]
    for r in results.values():
        for q in r["per_request"]:
            assert q["tokens"] == q["output_len"]
            assert 0 < q["ttft_ms"] <= q["e2e_ms"] and 0 <= q["add_delay_ms"] < q["ttft_ms"]
            assert 0 < q["tpot_ms"] <= q["max_itl_ms"]  # output lengths are >= 4, so every request has gaps
            assert q["worker_runs"] == [[0, q["tokens"]]]  # one device per process: no moves
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "add_delay_ms"):
            assert 0 <= r[metric]["p50"] <= r[metric]["p99"]
        assert r["itl_ms"]["p99"] <= r["itl_ms"]["max"]
        assert 0 <= r["goodput_req_s"] <= r["achieved_req_s"]
        assert r["achieved_req_s"] == pytest.approx(6 / r["seconds"])
        assert r["slo_met"] == sum(q["ttft_ms"] <= 1000 and q["tpot_ms"] <= 100 for q in r["per_request"])
        # One device per process: every gap is between two tokens of "worker 0" (the first after the prompt step:
        # "first"), and each gap is counted once.
        assert sorted(r["itl_tail"]) == ["first", "worker 0"]
        assert r["itl_tail"]["first"]["gaps"] == 6
        assert r["itl_tail"]["worker 0"]["gaps"] == sum(q["tokens"] - 2 for q in r["per_request"])


def test_the_inter_token_tail_is_split_by_cause():
    """PD: a gap after a request moved between workers is "moved", else it is the worker's that made both tokens."""
    gaps = [0.001] * 98 + [0.050, 0.040]  # p99 lies between the two largest
    causes = ["worker 1"] * 98 + ["moved", "worker 0"]
    tail = bench.itl_tail(gaps, causes)
    assert tail == {"worker 1": dict(gaps=98, over_p99=0, p50_ms=1.0, max_ms=1.0),
                    "moved": dict(gaps=1, over_p99=1, p50_ms=50.0, max_ms=50.0),
                    "worker 0": dict(gaps=1, over_p99=0, p50_ms=40.0, max_ms=40.0)}
    assert bench.worker_runs([0, 1, 1, 1, 0, 0, 1]) == [[0, 1], [1, 3], [0, 2], [1, 1]]  # three moves
    assert bench.gap_causes([0, 1, 1, 1, 0, 0]) == ["moved", "worker 1", "worker 1", "moved", "worker 0"]
    assert bench.gap_causes([1, 1, 1]) == ["first", "worker 1"]  # prefilled and decoded on worker 1: no move


def test_decode_kernel_benchmark_checks_correctness():
    subprocess.run([sys.executable, str(ROOT / "tests" / "bench_decode_kernel.py"), "--check-only", "--tiny"],
                   check=True, capture_output=True)


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/dir"], "--model /no/such/dir: no config.json there"),
    (["--timeout", "0"], "--timeout: must be a positive number"),
    (["--timeout", "-1"], "--timeout: must be a positive number"),
    (["--input-len", "50", "60", "--output-len", "10", "20", "--max-model-len", "64"],
     "requests of up to 60 + 20 tokens do not fit in --max-model-len 64"),
    (["--option", "max_model_len=64"], "--option max_model_len: bench.py sets it; use --max-model-len"),
    (["--option", "device=cuda:1"], "--option device: bench.py sets it; use --device and --modes"),
    (["--option", "pd_policy"], "--option 'pd_policy': expected KEY=VALUE"),
])
def test_bad_arguments_fail_before_anything_runs(qwen3_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["--model", qwen3_path, *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_model_path_may_start_with_a_tilde(qwen3_path, monkeypatch):
    monkeypatch.setenv("HOME", os.path.dirname(qwen3_path))  # --model=~/m reaches bench.py unexpanded
    assert bench.parse_args([f"--model=~/{os.path.basename(qwen3_path)}"]).model == qwen3_path


def test_arguments_that_need_the_model_fail_with_a_message_not_a_traceback(qwen3_path, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--random-model", "qwen3-huge", "--device", "cpu",
                          "--cache-dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-4000:]
    assert run.stderr.strip().endswith("--random-model 'qwen3-huge': not a known shape; choose from llama-tiny, "
                                       "qwen2-tiny, qwen3-0.6b, qwen3-8b, qwen3-tiny")
    args = bench.parse_args(["--model", qwen3_path, "--input-len", "1000", "1000", "--output-len", "30", "30"])
    with pytest.raises(bench.BadArgument, match=r"up to 1000 \+ 30 tokens do not fit in the model's "
                                                r"max_position_embeddings \(1024\)"):
        bench.probe(args)


def test_hf_is_held_against_the_roofline_of_the_requests_it_ran(qwen3_path, capsys):
    # hf runs only the first --hf-requests: fewer sequences share each step's weight reads, so their bound in tok/s
    # is lower than the full workload's, and a fraction of the full workload's bound would understate hf.
    args = bench.parse_args(["--model", qwen3_path, "--device", "cpu", "--num-requests", "8", "--hf-requests", "2",
                             "--input-len", "8", "24", "--output-len", "4", "8", "--max-model-len", "128"])
    setup = bench.probe(args)
    first_two = bench.timed_runs(args)[0][:2]
    assert setup["hf_roofline"]["output_tokens"] == sum(r.output_len for r in first_two)
    assert setup["roofline"]["output_tokens"] == sum(r.output_len for r in bench.timed_runs(args)[0])
    ceilings = dict(device="cpu", copy_gb_s=1.0, matmul_tflop_s=1.0)
    roofline = dict(setup["roofline"], bound_output_tok_s=1000.0)
    hf_roofline = dict(setup["hf_roofline"], bound_output_tok_s=500.0)
    result = dict(requests=2, input_tokens=30, output_tokens=10, seconds=1.0, total_tok_s=40.0, workers=[{}])
    bench.print_offline(dict(ceilings=ceilings, roofline=roofline, hf_roofline=hf_roofline, results=[
        dict(result, mode="single", output_tok_s=100.0), dict(result, mode="hf", output_tok_s=100.0)]))
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:2] in ("si", "hf")}
    assert rows["single"][7] == "10.0%" and rows["hf"][7] == "20.0%"


def test_online_repeats_each_rate_with_new_requests(qwen3_path, tmp_path):
    out = tmp_path / "online.json"
    run = run_bench(qwen3_path, out, "--modes", "single", "--online", "50", "--num-requests", "4", "--repeat", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["rate"], r["repeat"]) for r in results] == [(50, 0), (50, 1)]
    first, second = ([(q["prompt_len"], q["output_len"], q["arrival_s"]) for q in r["per_request"]] for r in results)
    assert first != second  # new requests: the engine's prefix cache holds the first run's prompts
    assert "single #1" in run.stdout and "single #2" in run.stdout


def test_repeat_needs_online(qwen3_path, tmp_path):
    run = run_bench(qwen3_path, tmp_path / "x.json", "--modes", "single", "--repeat", "2")
    assert run.returncode != 0 and "--repeat: only with --online" in run.stderr


def test_a_tree_copied_inside_a_checkout_is_named_by_its_code_not_the_outer_commit(tmp_path):
    """Branches are often benchmarked as trees archived inside the main checkout: the report must not give them
    the outer commit, and its code fingerprint tells their code apart (and equal code alike)."""
    outer = tmp_path / "outer"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(outer)]
    outer.mkdir()
    subprocess.run(git + ["init", "-q"], check=True)
    (outer / "README").write_text("outer\n")
    subprocess.run(git + ["add", "README"], check=True)
    subprocess.run(git + ["commit", "-qm", "outer"], check=True)

    def copy_tree(name: str) -> Path:
        tree = outer / name
        (tree / "bench.py").parent.mkdir(parents=True)
        (tree / "bench.py").write_bytes((ROOT / "bench.py").read_bytes())
        for source in (ROOT / "nanovllm").rglob("*.py"):
            target = tree / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        return tree

    def identity(tree: Path) -> list:
        code = "import bench; print(bench._commit(), bench._code_fingerprint())"
        run = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=str(tree)))
        return run.stdout.split()

    same, changed = copy_tree("same"), copy_tree("changed")
    with open(changed / "nanovllm" / "engine" / "scheduler.py", "a") as f:
        f.write("# a branch's change\n")
    (commit, fingerprint), (_, other) = identity(same), identity(changed)
    assert commit == "None" and len(fingerprint) == 12 and other != fingerprint
    assert identity(copy_tree("again")) == ["None", fingerprint]


def test_an_interrupted_run_reports_the_modes_that_finished(qwen3_path, tmp_path):
    """SIGTERM (what `timeout` sends) while the second mode runs: the first mode's figures still come out."""
    out = tmp_path / "partial.json"
    command = [sys.executable, "-u", str(ROOT / "bench.py"), "--model", qwen3_path, "--device", "cpu",
               "--input-len", "8", "24", "--output-len", "4", "8", "--max-model-len", "128", "--num-requests", "4",
               "--modes", "single,dp", "--json", str(out)]
    bench_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    for line in bench_process.stdout:
        seen.append(line)
        if line.startswith("[bench] dp:"):  # single is done, dp has started
            bench_process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = bench_process.communicate(timeout=120)
    stdout = "".join(seen) + stdout
    assert bench_process.returncode == 1 and "interrupted before dp finished" in stderr, stderr[-4000:]
    assert any(line.startswith("single ") for line in stdout.splitlines())
    report = json.loads(out.read_text())
    assert report["modes"] == ["single"] and [r["mode"] for r in report["results"]] == ["single"]
    assert report["results"][0]["output_tok_s"] > 0
