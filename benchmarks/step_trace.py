"""Where one GPU's time goes on bench.py's offline workload: every step timed with CUDA events.

    python benchmarks/step_trace.py --random-model qwen3-0.6b [--option chunked_prefill_tokens=0] [--json F]

Takes bench.py's arguments (same requests, same engine options, single mode on cuda:0; with --device cpu, a
smoke run on the CPU, timed by the wall clock). For every step it
records the decode batch, the KV bytes those decodes read, the prompt tokens, the step's GPU time (events
around the launch, on the stream), the host time spent launching it, and the GPU's idle gap before it.
Then it sums them up by kind: decode-only steps by batch size, with their bandwidth against the measured
copy ceiling; steps with prompt tokens; idle gaps. A step whose host launch time is close to its GPU time
is host-bound: the GPU waited inside it for kernels to be enqueued.
"""
import contextlib
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402

BUCKETS = [(1, 8), (9, 32), (33, 64), (65, 128), (129, 256), (257, 1 << 30)]


class Stamp:
    """A point in a step: a CUDA event on the runner's stream, or on the CPU (where a launch runs the whole
    step) the wall clock. elapsed_time in ms, like torch.cuda.Event's."""

    def __init__(self, cuda: bool):
        import torch
        self.event = torch.cuda.Event(enable_timing=True) if cuda else None

    def record(self):
        if self.event is not None:
            self.event.record()
        else:
            self.time = time.perf_counter()

    def elapsed_time(self, end: "Stamp") -> float:
        if self.event is not None:
            return self.event.elapsed_time(end.event)
        return (end.time - self.time) * 1e3


def trace_launches(runner, records: list):
    """Wrap runner.launch: stamps before and after each step's work on the runner's stream."""
    launch = runner.launch

    def traced(batch):
        start, end = Stamp(runner.is_cuda), Stamp(runner.is_cuda)
        host_start = time.perf_counter()
        start.record()
        pending = launch(batch)
        end.record()
        records.append(dict(decodes=len(batch.decodes), kv_tokens=sum(end_ for _, end_, _ in batch.decodes),
                            prompt_tokens=sum(e - s for _, s, e in batch.prefills),
                            host_ms=(time.perf_counter() - host_start) * 1e3, events=(start, end)))
        return pending

    runner.launch = traced


def allocator_counts(runner) -> dict:
    """Counters of the CUDA caching allocator. A retry frees cached blocks and calls cudaFree, which waits for the
    whole GPU: inside a step, that turns an asynchronous launch into a synchronous one."""
    if not runner.is_cuda:
        return {}
    import torch
    stats = torch.cuda.memory_stats(runner.device)
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    counts = {k: stats.get(k, 0) for k in keys}
    # The pinned host pool (every step's inputs go through pin_memory()): a new block is a cudaHostAlloc, slow and
    # possibly synchronizing, so a pool that keeps growing during the run would stall launches.
    host = getattr(torch.cuda, "host_memory_stats", dict)()
    counts.update({f"host {k}": host.get(k, 0) for k in ("num_host_alloc", "host_alloc_time.total")})
    return counts


@contextlib.contextmanager
def gc_pauses(pauses: dict):
    """Collections of Python's cycle collector in the block, by generation: [count, total ms, longest ms]. A full
    (generation 2) collection walks every object not frozen; the engine freezes its start-up heap while it works."""
    started = [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1e3
        count, total, longest = pauses.get(info["generation"], (0, 0.0, 0.0))
        pauses[info["generation"]] = (count + 1, total + ms, max(longest, ms))

    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)


def summarize(records: list, hf, copy_gb_s: float, wall_s: float) -> dict:
    weight_bytes, kv_bytes = bench.step_bytes(hf)
    previous_end = None
    for r in records:
        start, end = r.pop("events")
        r["gpu_ms"] = start.elapsed_time(end)
        r["gap_ms"] = max(0.0, previous_end.elapsed_time(start)) if previous_end is not None else 0.0
        previous_end = end
        r["bytes"] = weight_bytes + r["kv_tokens"] * kv_bytes
    rows = []
    for lo, hi in BUCKETS:
        steps = [r for r in records if not r["prompt_tokens"] and lo <= r["decodes"] <= hi]
        if steps:
            rows.append(_row(f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode >{lo - 1}", steps, copy_gb_s))
    for name, steps in [("mixed", [r for r in records if r["prompt_tokens"] and r["decodes"]]),
                        ("prefill only", [r for r in records if r["prompt_tokens"] and not r["decodes"]])]:
        if steps:
            rows.append(_row(name, steps, copy_gb_s))
    gpu_s = sum(r["gpu_ms"] for r in records) / 1e3
    gaps_s = sum(r["gap_ms"] for r in records) / 1e3
    longest = max(range(len(records)), key=lambda i: records[i]["gap_ms"], default=None)
    return dict(wall_s=wall_s, steps=len(records), gpu_s=gpu_s, idle_gaps_s=gaps_s,
                idle_gap_fraction=gaps_s / wall_s, rows=rows,
                longest_gap=dict(step=longest, ms=records[longest]["gap_ms"]) if longest is not None else None)


def _row(name: str, steps: list, copy_gb_s: float) -> dict:
    gpu_s = sum(r["gpu_ms"] for r in steps) / 1e3
    moved = sum(r["bytes"] for r in steps)
    host_bound = sum(r["host_ms"] > 0.8 * r["gpu_ms"] for r in steps)
    return dict(kind=name, steps=len(steps), gpu_s=gpu_s, mean_gpu_ms=gpu_s * 1e3 / len(steps),
                mean_host_ms=sum(r["host_ms"] for r in steps) / len(steps), host_bound_steps=host_bound,
                gb_s=moved / gpu_s / 1e9, of_copy=moved / gpu_s / 1e9 / copy_gb_s,
                prompt_tokens=sum(r["prompt_tokens"] for r in steps), gaps_s=sum(r["gap_ms"] for r in steps) / 1e3)


def main():
    args = bench.parse_args()
    import torch
    from transformers import AutoConfig
    from nanovllm import LLM, SamplingParams
    setup = bench.probe(args)  # makes the random checkpoint; measures the ceilings and the roofline
    args.model = setup["model"]
    hf = AutoConfig.from_pretrained(args.model)
    requests = bench.timed_runs(args)[0]
    llm = LLM(args.model, **bench.engine_options("single", 0, args))
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    records = []
    runner = llm.runners[0]
    trace_launches(runner, records)
    bench._synchronize([str(runner.device)])
    before = allocator_counts(runner)
    with gc_pauses({}) as pauses:
        _, _, _, wall_s = bench.drive(llm, requests, args.timeout)
    bench._synchronize([str(runner.device)])
    summary = summarize(records, hf, setup["ceilings"]["copy_gb_s"], wall_s)
    summary["allocator"] = {k: v - before[k] for k, v in allocator_counts(runner).items()}
    summary["gc"] = {f"generation {g}": dict(collections=c, total_ms=t, longest_ms=m)
                     for g, (c, t, m) in sorted(pauses.items())}
    summary.update(options=args.option, ceilings=setup["ceilings"], roofline=setup["roofline"],
                   gpu=torch.cuda.get_device_name(runner.device) if runner.is_cuda else "cpu",
                   output_tok_s=setup["roofline"]["output_tokens"] / wall_s)
    print(f"{summary['gpu']} options {args.option}: {summary['output_tok_s']:.0f} output tok/s, "
          f"{summary['output_tok_s'] / setup['roofline']['bound_output_tok_s']:.1%} of bound; wall {wall_s:.2f} s, "
          f"{len(records)} steps, GPU in steps {summary['gpu_s']:.2f} s, idle gaps {summary['idle_gaps_s']:.2f} s "
          f"({summary['idle_gap_fraction']:.1%})")
    print(f"{'kind':<16}{'steps':>6}{'GPU s':>8}{'ms/step':>9}{'host ms':>9}{'host-bound':>11}{'GB/s':>8}"
          f"{'of copy':>8}{'prompt tok':>11}{'gaps s':>8}")
    for r in summary["rows"]:
        print(f"{r['kind']:<16}{r['steps']:>6}{r['gpu_s']:>8.2f}{r['mean_gpu_ms']:>9.2f}{r['mean_host_ms']:>9.2f}"
              f"{r['host_bound_steps']:>11}{r['gb_s']:>8.0f}{r['of_copy']:>8.1%}{r['prompt_tokens']:>11}"
              f"{r['gaps_s']:>8.2f}")
    print("during the run, the caching allocator's", ", ".join(f"{k}: {v}" for k, v in summary["allocator"].items()))
    if summary["longest_gap"]:
        print(f"longest idle gap: {summary['longest_gap']['ms']:.1f} ms, before step {summary['longest_gap']['step']}")
    collections = "; ".join(f"{g}: {v['collections']} collections, {v['total_ms']:.1f} ms, "
                            f"longest {v['longest_ms']:.1f} ms" for g, v in summary["gc"].items())
    print("Python's cycle collector:", collections or "no collections")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, steps=records), f)


if __name__ == "__main__":
    main()
