"""Where a prompt step's launch spends host time, on one GPU (cuda:0).

    python benchmarks/prompt_step_host.py /path/to/checkpoint     # e.g. a random Qwen3-0.6B (bench.py makes one)

Runs 96 prompts of 800-2000 tokens (48 output tokens each) and reports, for the steps that carry prompt tokens:
the host time of the launch; for step 6, with the GPU idle before (synchronized), the launch's host time and
the time until the GPU is done: equal times mean the GPU waited on the host for the whole step. Steps 2 (prompt
tokens only) and 9 (a chunk beside decodes) launch behind a ~100-200 ms spin kernel instead: a launch that then
takes about the spin's length waited for the GPU (its launch queue full, or a sync), not for Python. Step 3 runs under
PyTorch's sync debug mode (a warning with its stack for each synchronizing call it detects), steps 4 and 5 under
cProfile (functions by own time), and step 7 under torch.profiler (operators by their own host time, CUDA API calls
included). Steps 1 (prompt tokens only) and 8 (a chunk beside decodes), and the first decode-only step of 64 or
more sequences (a CUDA graph), also run under torch.profiler with the CUDA activity, the GPU idle before: their
kernels' GPU time by kind (matmul, attention, Triton, other) against the step's span on the GPU, and the matmuls'
TFLOP/s and weight bandwidth; so whether a step is host- or GPU-bound, which kernels hold a GPU-bound one, and how
much of a decode graph's span is gaps between its small kernels. A diagnostic, not a benchmark: the profilers
inflate the host times they report (cProfile most, for Python-heavy calls).
"""
import cProfile, io, pstats, random, sys, time, traceback, warnings
import torch
from nanovllm import LLMEngine, SamplingParams
from nanovllm.engine.scheduler import model_sizes

engine = LLMEngine(sys.argv[1])
runner = engine.model_runner
rng = random.Random(0)
for _ in range(96):
    engine.add_request([rng.randrange(1000, 20000) for _ in range(rng.randint(800, 2000))],
                       SamplingParams(temperature=0.6, max_tokens=48, ignore_eos=True))
launch, count, profiled_decode = runner.launch, [0], []
SLEEP_CYCLES = 200_000_000  # a spin kernel of ~100-200 ms on an H100 or H200 (SLEEP_MS: what it took here)
torch.cuda._sleep(SLEEP_CYCLES)  # warm-up
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record(); torch.cuda._sleep(SLEEP_CYCLES); end.record(); end.synchronize()
SLEEP_MS = start.elapsed_time(end)


def show(message, category, filename, lineno, file=None, line=None):
    print(f"SYNC: {str(message)[:160]}")
    print("".join(traceback.format_stack(limit=12)[:-1]))


# Matmul weights per token (the layers' projections; the lm_head runs on the sampled rows only) and KV bytes.
MATMUL_PARAMS, KV_BYTES_PER_TOKEN = model_sizes(engine.config.hf_config, itemsize=2)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    if any(key in lower for key in ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_")):
        return "matmul"
    if any(key in lower for key in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if lower.startswith("_") or "triton" in lower:
        return "triton"
    return "other"


def profile_kernels(what: str, batch, tokens: int, kv_tokens: int = 0):
    """The step under torch.profiler (CPU and CUDA), with the GPU idle before: where its GPU time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter(); p = launch(batch); h = time.perf_counter() - t
        torch.cuda.synchronize(); g = time.perf_counter() - t
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70),
          flush=True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        print(f"{what}: the profiler saw no CUDA kernel", flush=True)
        return p
    by_kind, count = {}, {}
    for e in kernels:
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0) + e.time_range.elapsed_us() / 1e3
        count[kind] = count.get(kind, 0) + 1
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
    busy = sum(by_kind.values())
    print(f"{what}: profiled (CPU + CUDA), host launch {h * 1e3:.1f} ms, launch to done {g * 1e3:.1f} ms; "
          f"kernels {len(kernels)}, their GPU time {busy:.1f} ms over a span of {span:.1f} ms "
          f"({busy / span:.0%} busy)", flush=True)
    for kind in sorted(by_kind, key=by_kind.get, reverse=True):
        print(f"  {kind:<10} {by_kind[kind]:7.2f} ms in {count[kind]:4d} kernels", flush=True)
    if by_kind.get("matmul"):
        flop, weight_bytes = 2 * MATMUL_PARAMS * tokens, 2 * MATMUL_PARAMS
        print(f"  matmuls: {flop / 1e12:.2f} TFLOP in {by_kind['matmul']:.2f} ms = "
              f"{flop / by_kind['matmul'] / 1e9:.0f} TFLOP/s; weights {weight_bytes / 1e9:.2f} GB read at "
              f"{weight_bytes / by_kind['matmul'] / 1e6:.0f} GB/s", flush=True)
    if kv_tokens and by_kind.get("triton"):  # the decode attention is a Triton kernel
        print(f"  KV read by the decodes: {kv_tokens * KV_BYTES_PER_TOKEN / 1e9:.2f} GB "
              f"({kv_tokens} tokens); the Triton kernels' time includes the norms and the rotary", flush=True)
    return p


def traced(batch):
    if not batch.prefills:
        if len(batch.decodes) >= 64 and not profiled_decode:
            profiled_decode.append(True)  # a decode-only step (a CUDA graph) at a large batch, once
            return profile_kernels(f"decode step ({len(batch.decodes)} decodes)", batch, len(batch.decodes),
                                   kv_tokens=sum(end for _, end, _ in batch.decodes))
        return launch(batch)
    count[0] += 1
    prompt_tokens = sum(end - start for _, start, end in batch.prefills)
    what = f"prompt step {count[0]} ({prompt_tokens} prompt tokens, {len(batch.decodes)} decodes)"
    if count[0] in (1, 8):
        padded = runner.padded_prompt_tokens(prompt_tokens)
        return profile_kernels(what, batch, padded + len(batch.decodes))
    if count[0] in (2, 6, 9):
        # Step 6 with the GPU idle before; steps 2 and 9 with it kept busy ~200 ms: a launch that then takes about
        # as long as with the GPU idle is the host's own cost; one that takes ~200 ms waited for the GPU (a full
        # launch queue, or a sync).
        torch.cuda.synchronize()
        before = "GPU idle before"
        if count[0] != 6:
            torch.cuda._sleep(SLEEP_CYCLES)
            before = f"GPU busy {SLEEP_MS:.0f} ms before"
        t = time.perf_counter(); p = launch(batch); h = time.perf_counter() - t
        torch.cuda.synchronize(); g = time.perf_counter() - t
        print(f"{what}, {before}: host launch {h * 1e3:.1f} ms, launch to done {g * 1e3:.1f} ms", flush=True)
        return p
    if count[0] == 3:
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter(); p = launch(batch); h = time.perf_counter() - t
        torch.cuda.set_sync_debug_mode(0)
        print(f"{what}: sync debug mode on, host launch {h * 1e3:.1f} ms", flush=True)
        return p
    if count[0] in (4, 5):
        pr = cProfile.Profile()
        t = time.perf_counter(); pr.enable(); p = launch(batch); pr.disable(); h = time.perf_counter() - t
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(f"{what}: cProfile, host launch {h * 1e3:.1f} ms\n" + s.getvalue()[-3800:], flush=True)
        return p
    if count[0] == 7:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter(); p = launch(batch); h = time.perf_counter() - t
        print(f"{what}: torch.profiler, host launch {h * 1e3:.1f} ms\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
              flush=True)
        return p
    t = time.perf_counter(); p = launch(batch)
    print(f"{what}: host launch {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
    return p


runner.launch = traced  # every launch of the engine loop goes through it
while not engine.is_finished():
    engine.step()
print("done", engine.stats)
