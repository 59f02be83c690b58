"""bench.py and the kernel benchmark still run on tiny shapes, so that they cannot rot.

bench.py runs on the CPU (`--device cpu`: fp32, the engine's CPU default, for nanovllm and transformers
alike). The kernel benchmark's correctness check runs where the kernels run: whatever GPU is here in
bf16, else the CPU in fp32 through Triton's interpreter.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_all_modes_on_a_tiny_model(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--random-model", "qwen3-tiny", "--cache-dir",
                    str(tmp_path), "--device", "cpu", "--num-requests", "4", "--hf-requests", "2",
                    "--input-len", "8", "24", "--output-len", "4", "8", "--max-model-len", "128",
                    "--json", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert set(results) == {"single", "pd", "hf"}
    assert results["single"]["output_tokens"] == results["pd"]["output_tokens"] > 0
    assert all(r["output_tok_s"] > 0 for r in results.values())
    assert report["roofline"]["bound_s"] > 0


def test_decode_kernel_benchmark_checks_correctness():
    subprocess.run([sys.executable, str(ROOT / "tests" / "bench_decode_kernel.py"), "--check-only", "--tiny"],
                   check=True, capture_output=True)
