"""Where a prompt step's launch spends host time, on one GPU (cuda:0).

    python benchmarks/prompt_step_host.py /path/to/checkpoint     # e.g. a random Qwen3-0.6B (bench.py makes one)

Runs 96 prompts of 800-2000 tokens (48 output tokens each) and reports, for the steps that carry prompt tokens:
the host time of the launch; for steps 2 and 6, with the GPU idle before (synchronized), the launch's host time and
the time until the GPU is done: equal times mean the GPU waited on the host for the whole step. Step 3 runs under
PyTorch's sync debug mode (a warning with its stack for each synchronizing call it detects), steps 4 and 5 under
cProfile (functions by own time), and step 7 under torch.profiler (operators by their own host time, CUDA API calls
included). A diagnostic, not a benchmark: the profilers inflate the host times they report (cProfile most, for
Python-heavy calls).
"""
import cProfile, io, pstats, random, sys, time, traceback, warnings
import torch
from nanovllm import LLMEngine, SamplingParams

engine = LLMEngine(sys.argv[1])
runner = engine.model_runner
rng = random.Random(0)
for _ in range(96):
    engine.add_request([rng.randrange(1000, 20000) for _ in range(rng.randint(800, 2000))],
                       SamplingParams(temperature=0.6, max_tokens=48, ignore_eos=True))
launch, count = runner.launch, [0]


def show(message, category, filename, lineno, file=None, line=None):
    print(f"SYNC: {str(message)[:160]}")
    print("".join(traceback.format_stack(limit=12)[:-1]))


def traced(batch):
    if not batch.prefills:
        return launch(batch)
    count[0] += 1
    prompt_tokens = sum(end - start for _, start, end in batch.prefills)
    what = f"prompt step {count[0]} ({prompt_tokens} prompt tokens, {len(batch.decodes)} decodes)"
    if count[0] in (2, 6):
        torch.cuda.synchronize()
        t = time.perf_counter(); p = launch(batch); h = time.perf_counter() - t
        torch.cuda.synchronize(); g = time.perf_counter() - t
        print(f"{what}, GPU idle before: host launch {h * 1e3:.1f} ms, launch to done {g * 1e3:.1f} ms", flush=True)
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
