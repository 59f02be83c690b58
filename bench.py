"""Offline throughput: nanovllm single-device vs PD (two GPUs) vs transformers, in one run.

    python bench.py --random-model qwen3-0.6b                      # all modes the machine allows
    python bench.py --model /path/to/ckpt --modes single,pd --json results.json
    python bench.py --random-model qwen3-tiny --device cpu --num-requests 4 --input-len 8 32 --output-len 4 8

Workload (nano-vllm's): --num-requests requests with random token ids, input and output lengths uniform in
--input-len and --output-len, ignore_eos, temperature 0.6, fixed seed. The `hf` mode runs the first
--hf-requests of the same requests through transformers' batched `generate` (left padding, batches of
--hf-batch; every row of a batch generates the batch's longest output and only requested tokens count).

Each mode runs in its own process, so one mode's memory never shows in another's. The roofline below the
table is what decode must read (weights once per step, each sequence's KV once per token) and what
prefill must compute, timed at this device's measured copy bandwidth and bf16 matmul rate.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

MODES = ("single", "pd", "hf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="Hugging Face-format checkpoint directory")
    model.add_argument("--random-model", help="write a random-weight checkpoint of this shape (e.g. qwen3-0.6b)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanovllm"))
    p.add_argument("--modes", default=None, help="comma-separated subset of single,pd,hf (default: all that fit)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--hf-requests", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--output-len", type=int, nargs=2, default=[100, 1024])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu to run everything on the CPU (PD mode: cpu/cpu)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option (Config field) for the nanovllm modes, e.g. pd_policy=static; repeatable")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", type=int, default=0, metavar="STEP",
                   help="profile 10 engine steps from this one and print the top kernels (slows that run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one mode, write JSON to --out
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(args) -> tuple[list[list[int]], list[int]]:
    from transformers import AutoConfig
    max_id = min(10000, AutoConfig.from_pretrained(args.model).vocab_size - 1)
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(*args.input_len))] for _ in range(args.num_requests)]
    output_lens = [rng.randint(*args.output_len) for _ in range(args.num_requests)]
    return prompts, output_lens


# ---- one mode, in a worker process ----

def run_mode(args) -> dict:
    prompts, output_lens = workload(args)
    devices = _devices(args)
    if args.worker == "hf":
        prompts, output_lens = prompts[:args.hf_requests], output_lens[:args.hf_requests]
        result = _run_hf(args, prompts, output_lens, devices[0])
    else:
        result = _run_nanovllm(args, prompts, output_lens, devices)
    result.update(mode=args.worker, requests=len(prompts), input_tokens=sum(map(len, prompts)),
                  output_tokens=sum(output_lens))
    result["output_tok_s"] = result["output_tokens"] / result["seconds"]
    result["total_tok_s"] = (result["output_tokens"] + result["input_tokens"]) / result["seconds"]
    if devices[0] != "cpu":
        result["peak_mem_gib"] = {d: torch.cuda.max_memory_reserved(d) / 2**30 for d in devices}
    return result


def _devices(args) -> list[str]:
    if args.device == "cpu":
        return ["cpu"]
    return ["cuda:0", "cuda:1"] if args.worker == "pd" else ["cuda:0"]


def _run_nanovllm(args, prompts, output_lens, devices) -> dict:
    from nanovllm import LLM, SamplingParams
    options = dict(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, **_options(args.option))
    if args.worker == "pd":
        pd_devices = ("cpu", "cpu") if devices == ["cpu"] else (0, 1)
        options.update(enable_two_gpu_pd=True, prefill_device_id=pd_devices[0], decode_device_id=pd_devices[1])
    else:
        options.update(device=devices[0])
    llm = LLM(args.model, **options)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up: kernels compiled
    runners = [llm.prefill_runner, llm.decode_runner] if args.worker == "pd" else [llm.model_runner]
    for runner in runners:
        runner.busy_seconds = 0.0
    llm.stats.update(kv_bytes=0, kv_copies=0, kv_seconds=0.0)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    if args.profile:
        _profile_steps(llm, args.profile, 10)
    _synchronize(devices)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _synchronize(devices)
    seconds = time.perf_counter() - start
    assert [len(o["token_ids"]) for o in outputs] == output_lens
    result = dict(seconds=seconds, kv_capacity_tokens={f"{r.role} {r.device}": r.kv_capacity_tokens for r in runners},
                  busy_fraction={f"{r.role} {r.device}": r.busy_seconds / seconds for r in runners},
                  preemptions=llm.scheduler.num_preemptions,
                  peak_kv_blocks_used={f"{r.role} {r.device}": bm.peak_used_blocks for r, bm in
                                       zip(runners, _block_managers(llm))})
    if args.worker == "pd":
        s = llm.stats
        result.update(kv_transfer_gb=s["kv_bytes"] / 1e9, kv_copies=s["kv_copies"],
                      kv_transfer_gb_s=s["kv_bytes"] / s["kv_seconds"] / 1e9 if s["kv_seconds"] else None,
                      backpressure_stalls=llm.scheduler.num_backpressure_stalls)
    return result


def _options(pairs: list[str]) -> dict:
    import ast
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _block_managers(llm) -> list:
    return llm.scheduler.block_managers


def _profile_steps(llm, first: int, count: int):
    """Wrap llm.step so that steps [first, first + count) run under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    step, calls = llm.step, [0]
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def profiled_step():
        calls[0] += 1
        if calls[0] == first:
            profiler.start()
        outputs = step()
        if calls[0] == first + count - 1:
            profiler.stop()
            print(profiler.key_averages().table(sort_by="device_time_total", row_limit=25), flush=True)
        return outputs

    llm.step = profiled_step


def _run_hf(args, prompts, output_lens, device) -> dict:
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    generated = 0

    def generate(batch_prompts, max_new):
        width = max(map(len, batch_prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch_prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=True, temperature=0.6, top_k=0, top_p=1.0, pad_token_id=0)
        return out.shape[1] - width

    generate([[1, 2, 3]], 4)  # warm-up
    _synchronize([device])
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch):
        batch_lens = output_lens[i:i + args.hf_batch]
        generated += generate(prompts[i:i + args.hf_batch], max(batch_lens)) * len(batch_lens)
    _synchronize([device])
    return dict(seconds=time.perf_counter() - start, generated_tokens=generated)


def _synchronize(devices):
    for d in devices:
        if d != "cpu":
            torch.cuda.synchronize(d)


# ---- the device's ceilings and the workload's roofline ----

def measure_device(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured here."""
    cpu = device == "cpu"
    n, size = (64 << 20, 1024) if cpu else (1 << 30, 8192)
    dtype = torch.float32 if cpu else torch.bfloat16
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    copy_s = _time(lambda: dst.copy_(src), device)
    matmul_s = _time(lambda: a @ b, device)
    return dict(device=torch.cuda.get_device_name(device) if not cpu else "cpu",
                copy_gb_s=2 * n / copy_s / 1e9, matmul_tflop_s=2 * size ** 3 / matmul_s / 1e12)


def _time(fn, device, repeat=10) -> float:
    fn()
    _synchronize([device])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _synchronize([device])
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def roofline(args, hf_config, ceilings: dict) -> dict:
    """Least bytes decode must read and least FLOPs prefill must do, over the whole workload."""
    prompts, output_lens = workload(args)
    layers, hidden = hf_config.num_hidden_layers, hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", heads)
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    itemsize = 2  # bf16
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * itemsize
    vocab = hf_config.vocab_size
    body = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                     + 3 * hidden * hf_config.intermediate_size)  # matmul weights per layer
    step_weight_bytes = (body + vocab * hidden) * itemsize  # all layers and the LM head, read once a step
    decode_steps = max(output_lens) - 1  # the first token comes from prefill; one step per later token
    # Decode step j (j = 2..n) of a request with prompt length P attends over P + j - 1 tokens.
    kv_reads = sum((n - 1) * len(p) + (n - 1) * n // 2 for p, n in zip(prompts, output_lens))
    decode_bytes = decode_steps * step_weight_bytes + kv_reads * kv_bytes_per_token
    prefill_flops = sum(2 * body * len(p) + 2 * vocab * hidden + 2 * layers * heads * head_dim * len(p) ** 2
                        for p in prompts)
    decode_s = decode_bytes / (ceilings["copy_gb_s"] * 1e9)
    prefill_s = prefill_flops / (ceilings["matmul_tflop_s"] * 1e12)
    return dict(decode_tb=decode_bytes / 1e12, prefill_tflop=prefill_flops / 1e12, decode_s=decode_s,
                prefill_s=prefill_s, bound_s=decode_s + prefill_s, output_tokens=sum(output_lens),
                bound_output_tok_s=sum(output_lens) / (decode_s + prefill_s))


# ---- the driver ----

def main():
    args = parse_args()
    if args.random_model:
        from nanovllm.utils.checkpoints import make_random_checkpoint
        args.model = make_random_checkpoint(os.path.join(args.cache_dir, f"random-{args.random_model}"),
                                            args.random_model)
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(run_mode(args), f)
        return
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    args.device = "cpu" if cpu else None
    modes = args.modes.split(",") if args.modes else [m for m in MODES if m != "pd" or cpu
                                                      or torch.cuda.device_count() >= 2]
    ceilings = measure_device("cpu" if cpu else "cuda:0")
    from transformers import AutoConfig
    bound = roofline(args, AutoConfig.from_pretrained(args.model), ceilings)
    results = [_spawn(mode, args) for mode in modes]
    report = dict(machine=_machine(), ceilings=ceilings, roofline=bound, results=results, argv=sys.argv[1:])
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _spawn(mode: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", mode, "--out", out.name]
        if args.random_model:
            cmd += ["--model", args.model]
            i = cmd.index("--random-model")
            del cmd[i:i + 2]
        if args.device == "cpu" and "--device" not in argv:
            cmd += ["--device", "cpu"]
        print(f"[bench] running mode {mode} ...", flush=True)
        subprocess.run(cmd, check=True)
        with open(out.name) as f:
            return json.load(f)


def _machine() -> dict:
    info = dict(torch=torch.__version__, python=sys.version.split()[0])
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            pass
    return info


def print_report(report: dict):
    c, r = report["ceilings"], report["roofline"]
    print(f"\nmachine: {report['machine']}")
    print(f"measured ceilings on {c['device']}: copy {c['copy_gb_s']:.0f} GB/s, matmul {c['matmul_tflop_s']:.0f} TFLOP/s")
    print(f"roofline: decode reads {r['decode_tb']:.2f} TB ({r['decode_s']:.2f} s), prefill {r['prefill_tflop']:.1f} "
          f"TFLOP ({r['prefill_s']:.2f} s): bound {r['bound_s']:.2f} s = {r['bound_output_tok_s']:.0f} output tok/s "
          f"for the {r['output_tokens']} output tokens of the full workload\n")
    header = f"{'mode':<7}{'reqs':>6}{'in tok':>9}{'out tok':>9}{'time s':>9}{'out tok/s':>11}{'tot tok/s':>11}" \
             f"{'of bound':>10}  peak mem GiB"
    print(header)
    print("-" * len(header))
    for res in report["results"]:
        fraction = res["output_tok_s"] / r["bound_output_tok_s"]
        mem = ", ".join(f"{d} {g:.1f}" for d, g in res.get("peak_mem_gib", {}).items()) or "-"
        print(f"{res['mode']:<7}{res['requests']:>6}{res['input_tokens']:>9}{res['output_tokens']:>9}"
              f"{res['seconds']:>9.2f}{res['output_tok_s']:>11.0f}{res['total_tok_s']:>11.0f}{fraction:>10.1%}  {mem}")
    for res in report["results"]:
        extra = {k: v for k, v in res.items() if k in ("kv_capacity_tokens", "peak_kv_blocks_used",
                                                     "busy_fraction", "preemptions",
                                                     "kv_transfer_gb", "kv_copies", "kv_transfer_gb_s",
                                                     "backpressure_stalls", "generated_tokens")}
        print(f"{res['mode']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items()))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


if __name__ == "__main__":
    main()
