"""Offline throughput of one model on one GPU (tp1), tensor-parallel over N GPUs (tpN), and data-parallel:
N independent engines, one per GPU, each serving every N-th request (dpN).

    python tests/bench_tensor_parallel.py --random-model qwen3-8b --modes tp1,tp2,dp2
    python tests/bench_tensor_parallel.py --random-model qwen3-tiny --device cpu --num-requests 4 --input-len 8 24 --output-len 4 8

Workload as bench.py's: --num-requests random prompts, input and output lengths uniform in --input-len and
--output-len, ignore_eos, temperature 0.6, fixed seed. Each mode runs in fresh processes, timed from the
first request to the last token after a warm-up; a dp run starts its N processes together and counts the
slowest one's time (its engines share nothing but the host's CPUs).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="Hugging Face-format checkpoint directory")
    model.add_argument("--random-model", help="write (once) a random-weight checkpoint of this preset")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanovllm"))
    p.add_argument("--modes", default="tp1,tp2,dp2", help="comma-separated tpN / dpN")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--output-len", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu: run every engine on the CPU")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs=3, type=int, metavar=("TP", "PART", "PARTS"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(args) -> tuple[list[list[int]], list[int]]:
    with open(os.path.join(args.model, "config.json")) as f:
        max_id = min(10000, json.load(f)["vocab_size"] - 1)
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(*args.input_len))] for _ in range(args.num_requests)]
    return prompts, [rng.randint(*args.output_len) for _ in range(args.num_requests)]


def run_worker(args):
    """One engine with tensor_parallel_size TP, serving requests PART, PART + PARTS, ...; writes JSON to --out."""
    from nanovllm import LLM, SamplingParams
    tp, part, parts = args.worker
    prompts, output_lens = workload(args)
    prompts, output_lens = prompts[part::parts], output_lens[part::parts]
    options = dict(device="cpu", num_kv_cache_blocks=64, kv_cache_block_size=16) if args.device == "cpu" else {}
    llm = LLM(args.model, tensor_parallel_size=tp, max_model_len=args.max_model_len, **options)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up: kernels compiled
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start  # the tokens are on the host: the devices are done
    assert [len(o["token_ids"]) for o in outputs] == output_lens
    result = dict(seconds=seconds, input_tokens=sum(map(len, prompts)), output_tokens=sum(output_lens),
                  kv_capacity_tokens=llm.model_runner.kv_capacity_tokens, preemptions=llm.scheduler.num_preemptions)
    llm.close()
    with open(args.out, "w") as f:
        json.dump(result, f)


def run_mode(mode: str, args) -> dict:
    kind, n = mode[:2], int(mode[2:])
    engines = [(n, 0, 1)] if kind == "tp" else [(1, i, n) for i in range(n)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n)))).split(",")
    print(f"[bench] running {mode} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        for tp, part, parts in engines:
            env = dict(os.environ)
            if kind == "dp" and args.device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = visible[part]
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--model", args.model,
                   "--worker", str(tp), str(part), str(parts), "--out", os.path.join(tmp, f"{part}.json")]
            if args.random_model:
                del cmd[cmd.index("--random-model"):cmd.index("--random-model") + 2]
            workers.append(subprocess.Popen(cmd, env=env))
        if any(worker.wait() for worker in workers):
            raise RuntimeError(f"a {mode} worker failed")
        results = [json.load(open(os.path.join(tmp, f"{part}.json"))) for _, part, _ in engines]
    seconds = max(r["seconds"] for r in results)
    output_tokens, input_tokens = sum(r["output_tokens"] for r in results), sum(r["input_tokens"] for r in results)
    return dict(mode=mode, gpus=n, seconds=seconds, output_tokens=output_tokens, output_tok_s=output_tokens / seconds,
                total_tok_s=(output_tokens + input_tokens) / seconds, output_tok_s_per_gpu=output_tokens / seconds / n,
                kv_capacity_tokens=[r["kv_capacity_tokens"] for r in results],
                preemptions=sum(r["preemptions"] for r in results))


def main():
    args = parse_args()
    if args.random_model:
        from nanovllm.utils.checkpoints import make_random_checkpoint
        path = os.path.join(args.cache_dir, f"random-{args.random_model}")
        start, existed = time.perf_counter(), os.path.exists(os.path.join(path, "config.json"))
        args.model = make_random_checkpoint(path, args.random_model)
        if not existed:
            print(f"[bench] wrote {path} in {time.perf_counter() - start:.0f}s", flush=True)
    if args.worker:
        return run_worker(args)
    results = [run_mode(mode, args) for mode in args.modes.split(",")]
    print(f"{'mode':>5} {'GPUs':>4} {'seconds':>8} {'output tok/s':>12} {'total tok/s':>11} {'out tok/s/GPU':>13} "
          f"{'preempt':>7}  KV tokens per engine")
    for r in results:
        print(f"{r['mode']:>5} {r['gpus']:>4} {r['seconds']:>8.1f} {r['output_tok_s']:>12.0f} {r['total_tok_s']:>11.0f} "
              f"{r['output_tok_s_per_gpu']:>13.0f} {r['preemptions']:>7}  {r['kv_capacity_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, argv=sys.argv[1:]), f, indent=2)


if __name__ == "__main__":
    main()
