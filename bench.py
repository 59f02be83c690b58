"""nanovllm against its baselines, every mode in one run: offline throughput, or online latency and goodput.

    python bench.py --random-model qwen3-0.6b              # offline, every mode the machine has the GPUs for
    python bench.py --model /path/to/ckpt --modes single,dp,pd --json results.json
    python bench.py --random-model qwen3-0.6b --modes single,dp,pd --online 10,20,40 \\
        --num-requests 300 --input-len 1024 3072 --output-len 128 384
    python bench.py --random-model qwen3-tiny --device cpu --num-requests 4 --input-len 8 32 --output-len 4 8

Modes, all on the same requests:
  single     one engine on one GPU
  dp         --dp-size independent single-GPU engines, one per GPU, each in its own process; request i goes
             to engine i mod N. What a user with N GPUs runs without PD.
  pd         one engine: prefill on GPU 0, decode on GPU 1, the engine's default PD policy
  pd-static  the same with pd_policy="static"
  tp         one engine with tensor_parallel_size=--tp-size
  hf         transformers' batched `generate` (offline only)

Requests (nano-vllm's workload): --num-requests prompts of random token ids, input and output lengths
uniform in --input-len and --output-len, ignore_eos, temperature 0.6, fixed seed.

Offline (the default): all requests are submitted at once; output tok/s over the wall time until the last
one finishes. `hf` runs the first --hf-requests of them through `generate` (left padding, batches of
--hf-batch; every row of a batch generates the batch's longest output and only requested tokens count).
Below the table, a roofline: what decode must read (weights once per step, each sequence's KV once per
token) and what prefill must compute, timed at this device's measured copy bandwidth and bf16 matmul rate;
`hf` is held against the same bound for the first --hf-requests, the requests it ran.

Online (--online RATES, in requests/s): for each rate, --num-requests requests arrive as a Poisson process
(seeded: the same arrival times and requests for every mode). Each engine's loop adds the requests that
have arrived, steps, and records when each token came back. Per mode and rate: TTFT (first token - arrival),
TPOT ((last token - first token) / (tokens - 1), per request), inter-token latency (every gap between a
request's consecutive tokens, pooled over requests; tokens one step() returns together have a gap of 0), and
goodput: requests per second that meet both --slo-ttft-ms and --slo-tpot-ms (BENCHMARKS.md says why these
defaults, and how each figure is defined). --repeat N serves each rate N times, each time with new requests
(the same for every mode), and reports each run: single runs of a mode can differ a lot (PD's did).

Each mode runs in its own processes, so one mode's memory never shows in another's; a mode's processes
start each timed run together at a barrier, and its time ends when the last of them is done. A mode that
fails is reported with its reason and the others still run; the exit status is then 1. Interrupted (Ctrl-C,
or SIGTERM, which `timeout` sends), it reports the modes that finished, and exits with status 1.
"""
import argparse
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

MODES = ("single", "dp", "pd", "pd-static", "tp", "hf")
SIBLING_FAILED = "stopped: another process of this mode failed"
# Engine options bench.py sets itself, from its own flags or per mode: an --option for one would clash or be ignored.
OWN_OPTIONS = {"max_model_len": "--max-model-len", "enforce_eager": "--enforce-eager",
               "tensor_parallel_size": "--tp-size", "device": "--device and --modes", "enable_two_gpu_pd": "--modes",
               "prefill_device_id": "--modes", "decode_device_id": "--modes"}


class BadArgument(Exception):
    """An argument found wrong only once the model is known (in the probe): reported as a message, no traceback."""


# ---- arguments ----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="Hugging Face-format checkpoint directory")
    model.add_argument("--random-model", help="write a random-weight checkpoint of this shape (e.g. qwen3-0.6b)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanovllm"))
    p.add_argument("--modes", type=_modes, help=f"comma-separated subset of {','.join(MODES)} "
                                                "(default: every mode this machine has the GPUs for)")
    p.add_argument("--dp-size", type=_positive_int, default=2, help="engines (GPUs) in dp mode")
    p.add_argument("--tp-size", type=_positive_int, default=2, help="tensor_parallel_size in tp mode")
    p.add_argument("--num-requests", type=_positive_int, default=256, help="offline: the batch; online: per rate")
    p.add_argument("--hf-requests", type=_positive_int, default=64)
    p.add_argument("--hf-batch", type=_positive_int, default=64)
    p.add_argument("--input-len", type=_positive_int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=_positive_int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--online", type=_rates, metavar="RATES",
                   help="comma-separated request rates in req/s: latency under Poisson arrivals, not throughput")
    p.add_argument("--repeat", type=_positive_int, default=1,
                   help="online: serve each rate this many times, each time with new requests, to show the spread "
                        "between runs")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: time to first token at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput: time per output token at most this")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="seconds: a timed run not done this long after its last arrival fails, and so does a "
                        "process that takes longer than this to load its model (no hangs)")
    p.add_argument("--device", choices=["cpu"], help="run everything on the CPU (pd: both sides on the CPU)")
    p.add_argument("--max-model-len", type=_positive_int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option (Config field) for the nanovllm modes, e.g. pd_policy=static; repeatable")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", type=int, default=0, metavar="STEP",
                   help="profile 10 engine steps from this one; print the top ops by GPU and by host time "
                        "(slows that run)")
    args = p.parse_args(argv)
    for name in ("input_len", "output_len"):
        low, high = getattr(args, name)
        if low > high:
            p.error(f"--{name.replace('_', '-')} {low} {high}: MIN must not exceed MAX")
    if args.repeat > 1 and not args.online:
        p.error("--repeat: only with --online (offline runs are repeated by running bench.py again)")
    if args.online and args.modes and "hf" in args.modes:
        p.error("--modes: hf has no online mode (transformers' generate takes no requests while it runs)")
    args.model = args.model and os.path.expanduser(args.model)  # --model=~/m reaches us unexpanded
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: no config.json there (expected a Hugging Face-format checkpoint directory)")
    if args.input_len[1] + args.output_len[1] > args.max_model_len:
        p.error(f"requests of up to {args.input_len[1]} + {args.output_len[1]} tokens do not fit in --max-model-len "
                f"{args.max_model_len}: the longest could not get all their tokens")
    for pair in args.option:
        key, equals, _ = pair.partition("=")
        if not equals:
            p.error(f"--option {pair!r}: expected KEY=VALUE")
        if key in OWN_OPTIONS:
            p.error(f"--option {key}: bench.py sets it; use {OWN_OPTIONS[key]}")
    return args


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return modes


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (req/s), got {text!r}") from None
    if not all(0 < r < math.inf for r in rates) or len(set(rates)) < len(rates):
        raise argparse.ArgumentTypeError(f"request rates must be positive and distinct, got {text!r}")
    return rates


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


# ---- the requests ----

@dataclass
class Request:
    index: int
    prompt: list[int]
    output_len: int
    arrival: float  # seconds after the timed run's start; 0 for every request offline


def timed_runs(args) -> list[list[Request]]:
    """The requests of each timed run: one offline batch, or one arrival sequence per online run (online_runs).

    Each run gets its own prompts (seed + k): an engine that served the previous run must find nothing
    of them in its prefix cache."""
    if not args.online:
        return [make_requests(args, args.seed)]
    return [make_requests(args, args.seed + k, rate) for k, (rate, _) in enumerate(online_runs(args))]


def online_runs(args) -> list[tuple[float, int]]:
    """(rate, repetition) of each online timed run, in order: every rate --repeat times."""
    return [(rate, i) for rate in args.online for i in range(args.repeat)]


def make_requests(args, seed: int, rate: float | None = None) -> list[Request]:
    with open(os.path.join(args.model, "config.json")) as f:
        max_id = min(10000, json.load(f)["vocab_size"] - 1)
    n, rng = args.num_requests, random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(*args.input_len))] for _ in range(n)]
    output_lens = [rng.randint(*args.output_len) for _ in range(n)]
    arrivals = [0.0] * n
    if rate:
        # Exponential gaps from one seed: every rate has the same pattern of bursts, scaled by 1 / rate.
        gaps = random.Random(args.seed)
        for i in range(1, n):
            arrivals[i] = arrivals[i - 1] + gaps.expovariate(rate)
    return [Request(i, *fields) for i, fields in enumerate(zip(prompts, output_lens, arrivals))]


def engine_options(mode: str, rank: int, args) -> dict:
    cpu = args.device == "cpu"
    options = dict(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, **_options(args.option))
    if mode in ("pd", "pd-static"):
        options.update(enable_two_gpu_pd=True, prefill_device_id="cpu" if cpu else 0,
                       decode_device_id="cpu" if cpu else 1)
    elif mode == "tp":
        options.update(tensor_parallel_size=args.tp_size, device="cpu" if cpu else None)
    else:  # single, or one of dp's engines
        options.update(device="cpu" if cpu else f"cuda:{rank}")
    if mode == "pd-static":
        options.update(pd_policy="static")
    return options


def _options(pairs: list[str]) -> dict:
    """--option KEY=VALUE pairs as engine options (VALUE read as a Python literal where it is one)."""
    import ast
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def num_processes(mode: str, args) -> int:
    return args.dp_size if mode == "dp" else 1


# ---- in a worker process: one engine (or transformers) and its timed runs ----

def worker_main(mode: str, rank: int, args, runs: list[list[Request]], barrier, conn):
    """Run one process's part of a mode; send the parent one dict per timed run, or an error and stop."""
    try:
        if mode == "probe":
            conn.send(probe(args))
        elif mode == "hf":
            serve_hf(args, runs[0], barrier, conn.send)
        else:
            serve(mode, rank, args, runs, barrier, conn.send)
    except threading.BrokenBarrierError:
        conn.send({"error": SIBLING_FAILED})
    except BadArgument as e:
        conn.send({"error": str(e)})
    except Exception as e:
        traceback.print_exc()
        barrier.abort()  # the mode's other processes must not wait for this one at the start line
        conn.send({"error": f"{type(e).__name__}: {e}"})


def serve(mode: str, rank: int, args, runs: list[list[Request]], barrier, send):
    """Load an engine and warm it up; then for each timed run, start with the mode's other processes at
    the barrier, serve this process's share of the requests, and send what happened."""
    import torch
    from nanovllm import LLM, SamplingParams
    world = num_processes(mode, args)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))  # dp's processes share the cores
    elif mode == "dp":
        torch.cuda.set_device(rank)  # whatever says just "cuda" stays on this process's own GPU
    llm = LLM(args.model, **engine_options(mode, rank, args))
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up: kernels compiled
    if args.profile and rank == 0:
        _profile_steps(llm, args.profile, 10)
    for requests in runs:
        mine = requests[rank::world]
        reset_counters(llm)
        _synchronize(_devices(llm))
        barrier.wait(timeout=patience_s(args, runs))
        token_times, token_workers, added, seconds = drive(llm, mine, args.timeout)
        wrong = [r.index for r in mine if len(token_times[r.index]) != r.output_len]
        if wrong:
            raise RuntimeError(f"requests {wrong[:8]} did not get the number of tokens they asked for")
        send(dict(requests=len(mine), token_times=token_times, token_workers=token_workers, added=added,
                  **counters(llm, seconds)))


def drive(llm, requests: list[Request], timeout: float) -> tuple[dict, dict, dict, float]:
    """Add each request once its arrival time has passed, step until all are done.

    Returns each request's token times (seconds since the start: when step() handed the token back), the
    worker each token came from, when it was added (after its arrival, once the step() call in progress
    returned), and the time the last request finished. Offline, every arrival is 0: all are added before the
    first step."""
    from nanovllm import SamplingParams
    token_times = {r.index: [] for r in requests}
    token_workers = {r.index: [] for r in requests}
    added = {}
    several = len(_runners(llm)) > 1  # PD: note the worker of every token (else it is worker 0's, noted at the end)
    index_of = {}  # engine request id -> Request.index
    next_up, unfinished = 0, len(requests)
    deadline = (requests[-1].arrival if requests else 0) + timeout
    start = time.perf_counter()
    while unfinished:
        now = time.perf_counter() - start
        while next_up < len(requests) and requests[next_up].arrival <= now:
            r = requests[next_up]
            params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=r.output_len)
            index_of[llm.add_request(r.prompt, params)] = r.index
            added[r.index] = time.perf_counter() - start
            next_up += 1
        if llm.is_finished():  # nothing to run until the next arrival
            if next_up == len(requests):
                raise RuntimeError(f"the engine is idle but {unfinished} requests never finished")
            time.sleep(max(0.0, requests[next_up].arrival - now))
            continue
        outputs = llm.step()
        now = time.perf_counter() - start
        for out in outputs:  # any number per request: tokens may come in batches
            index = index_of[out.request_id]
            token_times[index].append(now)
            if several:
                workers = token_workers[index]
                workers.append(_worker_of(llm, out.request_id, workers[-1] if workers else 0))
            unfinished -= out.finished
        if unfinished and now > deadline:
            raise TimeoutError(f"{unfinished} of {len(requests)} requests unfinished {timeout:.0f} s after "
                               f"the last arrival")
    seconds = time.perf_counter() - start
    if not several:
        token_workers = {index: [0] * len(times) for index, times in token_times.items()}
    return token_times, token_workers, added, seconds


# What follows reads the engine's internals: the one place to update when they move.

def _worker_of(llm, request_id: int, last: int) -> int:
    """The worker a request's latest token came from (a finished request has left the engine: `last`)."""
    seq = llm.requests.get(request_id)
    return seq.worker if seq is not None and seq.worker is not None else last


def _runners(llm) -> list:
    return llm.runners


def _block_managers(llm) -> list:
    return llm.scheduler.block_managers


def _devices(llm) -> list[str]:
    return [str(r.device) for r in _runners(llm)]


def reset_counters(llm):
    """Zero what the engine counts, so that a timed run reports itself, not the warm-up or the last rate."""
    for runner in _runners(llm):
        runner.busy_seconds = 0.0
    for block_manager in _block_managers(llm):
        block_manager.peak_used_blocks = 0
    for worker in llm.workers:
        worker.prompt_tokens, worker.launch_seconds, worker.longest_launch = 0, 0.0, 0.0
    llm.stats.update(kv_bytes=0, kv_copies=0, kv_seconds=0.0, wait_seconds=0.0)
    llm.scheduler.num_preemptions = llm.scheduler.num_backpressure_stalls = llm.scheduler.num_migrations = 0


def counters(llm, seconds: float) -> dict:
    import torch
    runners = _runners(llm)
    names = [f"{r.role} {r.device}" for r in runners]
    if len(set(names)) < len(names):  # PD with both sides on the CPU
        names = [f"{name} #{i}" for i, name in enumerate(names)]
    result = dict(seconds=seconds, kv_capacity_tokens={n: r.kv_capacity_tokens for n, r in zip(names, runners)},
                  busy_fraction={n: r.busy_seconds / seconds for n, r in zip(names, runners)},
                  host_launch_fraction={n: w.launch_seconds / seconds for n, w in zip(names, llm.workers)},
                  longest_launch_ms={n: 1e3 * w.longest_launch for n, w in zip(names, llm.workers)},
                  host_wait_fraction=llm.stats["wait_seconds"] / seconds,
                  preemptions=llm.scheduler.num_preemptions,
                  peak_kv_blocks_used={n: bm.peak_used_blocks for n, bm in zip(names, _block_managers(llm))})
    if llm.config.enable_two_gpu_pd:
        s = llm.stats
        result.update(kv_transfer_gb=s["kv_bytes"] / 1e9, kv_copies=s["kv_copies"],
                      kv_transfer_gb_s=s["kv_bytes"] / s["kv_seconds"] / 1e9 if s["kv_seconds"] else None,
                      backpressure_stalls=llm.scheduler.num_backpressure_stalls,
                      migrations=llm.scheduler.num_migrations,
                      prompt_tokens={n: w.prompt_tokens for n, w in zip(names, llm.workers)})
    if runners[0].is_cuda:
        result["peak_mem_gib"] = {str(r.device): torch.cuda.max_memory_reserved(r.device) / 2**30 for r in runners}
    return result


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
            averages = profiler.key_averages()
            print(averages.table(sort_by="device_time_total", row_limit=25), flush=True)
            print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)  # host-bound steps
        return outputs

    llm.step = profiled_step


def serve_hf(args, requests: list[Request], barrier, send):
    import torch
    from transformers import AutoModelForCausalLM
    requests = requests[:args.hf_requests]
    device = "cpu" if args.device == "cpu" else "cuda:0"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()

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
    barrier.wait(timeout=patience_s(args, [requests]))
    start, generated = time.perf_counter(), 0
    for i in range(0, len(requests), args.hf_batch):
        batch = requests[i:i + args.hf_batch]
        generated += generate([r.prompt for r in batch], max(r.output_len for r in batch)) * len(batch)
    _synchronize([device])
    result = dict(requests=len(requests), seconds=time.perf_counter() - start, generated_tokens=generated)
    if device != "cpu":
        result["peak_mem_gib"] = {device: torch.cuda.max_memory_reserved(device) / 2**30}
    send(result)


def _synchronize(devices):
    import torch
    for d in devices:
        if d != "cpu":
            torch.cuda.synchronize(d)


# ---- in the probe process: the machine, its ceilings and the workload's roofline ----

def probe(args) -> dict:
    """What the parent needs from the device side: the checkpoint, the machine, and (offline) the roofline."""
    import torch
    from transformers import AutoConfig
    if args.random_model:
        from nanovllm.utils.checkpoints import PRESETS, make_random_checkpoint
        if args.random_model not in PRESETS:
            raise BadArgument(f"--random-model {args.random_model!r}: not a known shape; choose from "
                              f"{', '.join(sorted(PRESETS))}")
        args.model = make_random_checkpoint(os.path.join(args.cache_dir, f"random-{args.random_model}"),
                                            args.random_model)
    hf_config = AutoConfig.from_pretrained(args.model)
    longest = args.input_len[1] + args.output_len[1]
    if longest > hf_config.max_position_embeddings:  # which also caps the engine's max_model_len
        raise BadArgument(f"requests of up to {args.input_len[1]} + {args.output_len[1]} tokens do not fit in the "
                          f"model's max_position_embeddings ({hf_config.max_position_embeddings})")
    result = dict(model=args.model, machine=_machine())
    if not args.online:
        ceilings = measure_device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda:0")
        requests = timed_runs(args)[0]
        result.update(ceilings=ceilings, roofline=roofline(hf_config, ceilings, requests),
                      hf_roofline=roofline(hf_config, ceilings, requests[:args.hf_requests]))
    return result


def _machine() -> dict:
    from importlib.metadata import version
    import torch
    info = dict(torch=torch.__version__, triton=version("triton"), transformers=version("transformers"),
                python=sys.version.split()[0], gpus=[])
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            pass
    return info


def measure_device(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured here."""
    import torch
    cpu = device == "cpu"
    n, size = (16 << 20, 512) if cpu else (1 << 30, 8192)  # on the CPU only a sanity check: keep it quick
    dtype = torch.float32 if cpu else torch.bfloat16
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    if cpu:
        copy_s, matmul_s = _time(lambda: dst.copy_(src), device), _time(lambda: a @ b, device)
    else:  # CUDA events over many runs, as the decode-kernel benchmark's copy: timing single calls from the host
        #    added the launch and the sync, and varied by 5-6% from run to run (session 23)
        import triton.testing
        copy_s, matmul_s = (triton.testing.do_bench(fn, return_mode="median") / 1e3
                            for fn in (lambda: dst.copy_(src), lambda: a @ b))
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


def step_bytes(hf_config) -> tuple[int, int]:
    """(weight bytes a decode step reads: every layer's matmuls and the LM head; KV bytes per token), in bf16."""
    from nanovllm.engine.scheduler import model_sizes
    params, kv_bytes_per_token = model_sizes(hf_config, itemsize=2)
    return 2 * (params + hf_config.vocab_size * hf_config.hidden_size), kv_bytes_per_token


def roofline(hf_config, ceilings: dict, requests: list[Request]) -> dict:
    """Least bytes decode must read and least FLOPs prefill must do, over these (offline) requests."""
    from nanovllm.engine.scheduler import model_sizes
    prompts, output_lens = [r.prompt for r in requests], [r.output_len for r in requests]
    layers, hidden, vocab = hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    body = model_sizes(hf_config, itemsize=2)[0]  # every layer's matmul weights
    step_weight_bytes, kv_bytes_per_token = step_bytes(hf_config)
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


# ---- in the parent: processes, one mode at a time ----

def worker_context(args):
    """Workers are forked from one server process. On a CPU run it imports torch & co. once, so that a
    worker starts in a fraction of a second instead of ~5 s. With GPUs it imports nothing: an import might
    already touch the CUDA driver, and a process that has must not fork processes that use CUDA."""
    context = mp.get_context("forkserver")
    if args.device == "cpu":
        context.set_forkserver_preload(["__main__", "torch", "transformers", "nanovllm"])
    return context


def patience_s(args, runs: list[list[Request]]) -> float:
    """How long one process may keep the others (or the parent) waiting: loading, then a timed run."""
    return args.timeout + max((run[-1].arrival for run in runs if run), default=0.0) + args.timeout


def run_processes(context, mode: str, args, runs: list[list[Request]], processes: int) -> list[list[dict]]:
    """Run `mode` in `processes` worker processes; return what each sent: a dict per timed run (the probe:
    one), or fewer ending in an error. A process that dies, or is silent for longer than `patience_s`,
    gets an error in place of what it did not send."""
    messages = 1 if mode == "probe" else len(runs)
    patience = patience_s(args, runs)
    barrier = context.Barrier(processes)
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    workers = [context.Process(target=worker_main, args=(mode, rank, args, runs, barrier, send),
                               name=f"{mode}-{rank}") for rank, (_, send) in enumerate(pipes)]
    received = [[] for _ in range(processes)]
    listening = {receive: rank for rank, (receive, _) in enumerate(pipes)}
    try:
        for worker in workers:
            worker.start()
        for _, send in pipes:
            send.close()  # the workers hold their own copies: a worker's death now reads as end-of-file
        while listening:
            ready = wait(list(listening), timeout=patience)
            if not ready:
                for rank in listening.values():
                    received[rank].append({"error": f"silent for {patience:.0f} s: stopped"})
                break
            for receive in ready:
                rank = listening[receive]
                try:
                    message = receive.recv()
                except EOFError:
                    workers[rank].join(timeout=10)
                    message = {"error": f"the process exited (exit code {workers[rank].exitcode}) before it was done"}
                received[rank].append(message)
                if "error" in message:
                    barrier.abort()
                if "error" in message or len(received[rank]) == messages:
                    del listening[receive]
    finally:
        for worker in workers:
            if worker.pid is not None:
                worker.join(timeout=0 if listening else 60)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
    return received


def run_mode(context, mode: str, args, runs: list[list[Request]]) -> list[dict]:
    """One result per timed run (offline: one; online: one per rate); a failed run has an "error"."""
    processes = num_processes(mode, args)
    print(f"[bench] {mode}: {processes} process{'es' if processes > 1 else ''} ...", flush=True)
    received = run_processes(context, mode, args, runs, processes)
    labels = [dict(rate=rate, repeat=repeat) for rate, repeat in online_runs(args)] if args.online else [{}]
    results = []
    for k, requests in enumerate(runs):
        parts = [sent[k] if k < len(sent) else sent[-1] for sent in received]  # after an error: that error
        result = dict(mode=mode, **labels[k])
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            result["error"] = min(errors, key=lambda e: e == SIBLING_FAILED)  # the cause, not its echo
        elif args.online:
            result.update(online_summary(requests, parts, args))
        else:
            result.update(offline_summary(requests[:args.hf_requests] if mode == "hf" else requests, parts))
        results.append(result)
    return results


def offline_summary(requests: list[Request], parts: list[dict]) -> dict:
    seconds = max(p["seconds"] for p in parts)  # from the common start to the last process's end
    input_tokens, output_tokens = sum(len(r.prompt) for r in requests), sum(r.output_len for r in requests)
    return dict(requests=len(requests), input_tokens=input_tokens, output_tokens=output_tokens, seconds=seconds,
                output_tok_s=output_tokens / seconds, total_tok_s=(input_tokens + output_tokens) / seconds,
                workers=worker_counters(parts))


def worker_counters(parts: list[dict]) -> list[dict]:
    """Each process's counters, without its per-request data (summarized per request instead)."""
    return [{k: v for k, v in p.items() if k not in ("token_times", "token_workers", "added")} for p in parts]


def online_summary(requests: list[Request], parts: list[dict], args) -> dict:
    token_times = {i: times for p in parts for i, times in p["token_times"].items()}
    token_workers = {i: workers for p in parts for i, workers in p["token_workers"].items()}
    added = {i: t for p in parts for i, t in p["added"].items()}
    per_request, gaps, causes = [], [], []
    for r in requests:
        times, workers = token_times[r.index], token_workers[r.index]
        request_gaps = [b - a for a, b in zip(times, times[1:])]
        gaps += request_gaps
        causes += gap_causes(workers)
        per_request.append(dict(
            index=r.index, arrival_s=r.arrival, prompt_len=len(r.prompt), output_len=r.output_len,
            tokens=len(times), ttft_ms=1e3 * (times[0] - r.arrival), e2e_ms=1e3 * (times[-1] - r.arrival),
            add_delay_ms=1e3 * (added[r.index] - r.arrival),  # part of the TTFT: the step() call in progress
            tpot_ms=1e3 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            max_itl_ms=1e3 * max(request_gaps) if request_gaps else None, worker_runs=worker_runs(workers)))
    seconds = max(p["seconds"] for p in parts)  # first arrival to last token, over all processes
    good = [q for q in per_request if q["ttft_ms"] <= args.slo_ttft_ms
            and (q["tpot_ms"] is None or q["tpot_ms"] <= args.slo_tpot_ms)]
    tpots = [q["tpot_ms"] for q in per_request if q["tpot_ms"] is not None]
    return dict(requests=len(requests), seconds=seconds,
                ttft_ms=_percentiles([q["ttft_ms"] for q in per_request]), tpot_ms=_percentiles(tpots),
                add_delay_ms=_percentiles([q["add_delay_ms"] for q in per_request]),
                itl_ms=dict(_percentiles([1e3 * g for g in gaps]), max=1e3 * max(gaps) if gaps else None),
                itl_tail=itl_tail(gaps, causes),
                slo_met=len(good), goodput_req_s=len(good) / seconds, achieved_req_s=len(requests) / seconds,
                output_tok_s=sum(q["tokens"] for q in per_request) / seconds,
                workers=worker_counters(parts),
                per_request=per_request)


def worker_runs(workers: list[int]) -> list[list[int]]:
    """Where a request's tokens came from, as [worker, tokens] runs: [[0, 1], [1, 200]] is a prefill on worker 0
    and 200 tokens decoded on worker 1 after one move; more runs are more moves (PD only)."""
    return [[worker, len(list(tokens))] for worker, tokens in itertools.groupby(workers)]


def gap_causes(workers: list[int]) -> list[str]:
    """What each gap between a request's tokens (made on `workers`) followed: a move to another worker ("moved"),
    the prompt step on the same worker ("first": from the first token to the second), or a decode step there
    ("worker 0", "worker 1"; each dp process is its own "worker 0")."""
    return ["moved" if a != b else "first" if i == 0 else f"worker {b}"
            for i, (a, b) in enumerate(zip(workers, workers[1:]))]


def itl_tail(gaps: list[float], causes: list[str]) -> dict:
    """Where the inter-token gaps above the p99 come from, by cause (`gap_causes`), with each cause's median and
    longest gap in ms (a move's hand-over, say, against a decode step's)."""
    p99 = percentile(gaps, 99)
    by_cause = {}
    for gap, cause in zip(gaps, causes):
        by_cause.setdefault(cause, []).append(gap)
    return {cause: dict(gaps=len(own), over_p99=sum(g > p99 for g in own), p50_ms=1e3 * percentile(own, 50),
                        max_ms=1e3 * max(own)) for cause, own in by_cause.items()}


def _percentiles(values: list[float]) -> dict:
    return dict(p50=percentile(values, 50), p99=percentile(values, 99))


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def default_modes(args, num_gpus: int) -> list[str]:
    """Every mode this machine has the GPUs for (on the CPU: all); hf only offline."""
    gpus_needed = {"single": 1, "dp": args.dp_size, "pd": 2, "pd-static": 2, "tp": args.tp_size, "hf": 1}
    return [m for m in MODES if (args.device == "cpu" or gpus_needed[m] <= num_gpus)
            and not (args.online and m == "hf")]


def _commit() -> str | None:
    """The git commit of this checkout, or None where this script is not at the top of one (e.g. a tree archived
    inside another checkout, which would otherwise be named by the outer commit)."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = ["git", "-C", here]
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        if os.path.realpath(top.stdout.strip()) != os.path.realpath(here):
            return None
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _code_fingerprint() -> str | None:
    """A hash of the engine's Python sources (the nanovllm package the runs import) and of this script: it names
    the code that ran, with or without git, and two runs of the same code have the same one."""
    spec = importlib.util.find_spec("nanovllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = os.path.abspath(spec.submodule_search_locations[0])
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)) + [os.path.abspath(__file__)]:
        digest.update(os.path.relpath(path, os.path.dirname(package)).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


# ---- the report ----

def print_report(report: dict):
    m = report["machine"]
    gpus = ", ".join(m["gpus"]) + f" (driver {m.get('driver', '?')})" if m["gpus"] else "no GPU"
    print(f"\nmachine: {gpus}; torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}, "
          f"Python {m['python']}; commit {report['commit']}, code {report['code']}")
    if report["online"]:
        print_online(report)
    else:
        print_offline(report)
    for res in report["results"]:
        for i, worker in enumerate(res.get("workers", [])):
            label = res["mode"] + (f" @ {res['rate']:g} req/s" if "rate" in res else "") + \
                (f" [{i}]" if len(res["workers"]) > 1 else "")
            extra = {k: v for k, v in worker.items() if k not in ("seconds", "peak_mem_gib")}
            print(f"{label}: seconds={worker['seconds']:.3g}, " + ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items()))


def print_offline(report: dict):
    c, r = report["ceilings"], report["roofline"]
    print(f"measured ceilings on {c['device']}: copy {c['copy_gb_s']:.0f} GB/s, "
          f"matmul {c['matmul_tflop_s']:.0f} TFLOP/s")
    print(f"roofline: decode reads {r['decode_tb']:.2f} TB ({r['decode_s']:.2f} s), prefill {r['prefill_tflop']:.1f} "
          f"TFLOP ({r['prefill_s']:.2f} s): bound {r['bound_s']:.2f} s = {r['bound_output_tok_s']:.0f} output tok/s "
          f"for the {r['output_tokens']} output tokens of the full workload")
    if any(res["mode"] == "hf" for res in report["results"]):
        h = report["hf_roofline"]
        print(f"hf, on the first requests only: bound {h['bound_s']:.2f} s = "
              f"{h['bound_output_tok_s']:.0f} output tok/s for their {h['output_tokens']} output tokens")
    print()
    header = f"{'mode':<10}{'reqs':>6}{'in tok':>9}{'out tok':>9}{'time s':>9}{'out tok/s':>11}{'tot tok/s':>11}" \
             f"{'of bound':>10}  peak mem GiB"
    print(header)
    print("-" * len(header))
    for res in report["results"]:
        if "error" in res:
            print(f"{res['mode']:<10}failed: {res['error']}")
            continue
        bound = report["hf_roofline"] if res["mode"] == "hf" else r  # hf ran only the first --hf-requests
        fraction = res["output_tok_s"] / bound["bound_output_tok_s"]
        print(f"{res['mode']:<10}{res['requests']:>6}{res['input_tokens']:>9}{res['output_tokens']:>9}"
              f"{res['seconds']:>9.2f}{res['output_tok_s']:>11.0f}{res['total_tok_s']:>11.0f}{fraction:>10.1%}  "
              f"{_memory(res)}")


def print_online(report: dict):
    slo = report["slo_ms"]
    for rate in report["online"]:
        results = [res for res in report["results"] if res["rate"] == rate]
        print(f"\nonline at {rate:g} req/s (Poisson), {report['requests']} requests; latencies in ms; goodput: "
              f"req/s with TTFT <= {slo['ttft']:g} ms and TPOT <= {slo['tpot']:g} ms")
        header = f"{'mode':<10}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>8}{'ITL p99':>9}{'max':>8}" \
                 f"{'goodput':>9}{'req/s':>8}{'out tok/s':>11}  peak mem GiB"
        print(header)
        print("-" * len(header))
        for res in results:
            label = _label(res, report)
            if "error" in res:
                print(f"{label:<10}failed: {res['error']}")
                continue
            t, p, i = res["ttft_ms"], res["tpot_ms"], res["itl_ms"]
            print(f"{label:<10}{_ms(t['p50']):>10}{_ms(t['p99']):>8}{_ms(p['p50']):>10}{_ms(p['p99']):>8}"
                  f"{_ms(i['p99']):>9}{_ms(i['max']):>8}{res['goodput_req_s']:>9.2f}{res['achieved_req_s']:>8.2f}"
                  f"{res['output_tok_s']:>11.0f}  {_memory(res)}")
        for res in results:
            tail = res.get("itl_tail", {})
            if len(tail) > 1:  # more than one worker or cause: say which the tail came from
                print(f"{_label(res, report)}: gaps over the inter-token p99, by cause: " + ", ".join(
                    f"{cause} {c['over_p99']} of {c['gaps']} (p50 {c['p50_ms']:.1f}, max {c['max_ms']:.1f} ms)"
                    for cause, c in sorted(tail.items())))


def _label(res: dict, report: dict) -> str:
    """The mode, and which run of it when each rate was served several times (--repeat)."""
    return res["mode"] + (f" #{res['repeat'] + 1}" if report.get("repeat", 1) > 1 else "")


def _memory(res: dict) -> str:
    memory = {d: g for worker in res["workers"] for d, g in worker.get("peak_mem_gib", {}).items()}
    return ", ".join(f"{d} {g:.1f}" for d, g in memory.items()) or "-"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---- the driver ----

def main():
    args = parse_args()
    context = worker_context(args)
    setup = run_processes(context, "probe", args, runs=[], processes=1)[0][0]
    if "error" in setup:
        sys.exit(f"bench: could not set up: {setup['error']}")
    args.model = setup["model"]
    if not setup["machine"]["gpus"]:
        args.device = "cpu"
    modes = args.modes or default_modes(args, len(setup["machine"]["gpus"]))
    runs = timed_runs(args)  # made once here, so every mode gets the very same requests
    results, unfinished = [], list(modes)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: report the modes done so far, as Ctrl-C does
    try:
        while unfinished:
            results += run_mode(context, unfinished[0], args, runs)
            unfinished.pop(0)
    except KeyboardInterrupt:
        print(f"[bench] interrupted: no results for {', '.join(unfinished)}", file=sys.stderr, flush=True)
    modes = [mode for mode in modes if mode not in unfinished]
    report = dict(machine=setup["machine"], commit=_commit(), code=_code_fingerprint(), argv=sys.argv[1:],
                  modes=modes, online=args.online, repeat=args.repeat, requests=args.num_requests, results=results)
    if args.online:
        report["slo_ms"] = dict(ttft=args.slo_ttft_ms, tpot=args.slo_tpot_ms)
    else:
        report.update(ceilings=setup["ceilings"], roofline=setup["roofline"], hf_roofline=setup["hf_roofline"])
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = sorted({res["mode"] for res in results if "error" in res}, key=modes.index)
    if failed:
        sys.exit(f"bench: {len(failed)} mode(s) failed: {', '.join(failed)} (reasons above)")
    if unfinished:
        sys.exit(f"bench: interrupted before {', '.join(unfinished)} finished")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
