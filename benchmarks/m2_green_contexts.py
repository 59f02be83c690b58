"""M2 on one GPU: SM partitions with green contexts, on vs off, in one run (design: M2_SM_PARTITIONS.md).

    python benchmarks/m2_green_contexts.py      # about 4 minutes on one H100; writes $OUT/m2_green_contexts.json

Models are built in memory with random weights (no checkpoint: an 8B one takes minutes to write), through the
engine's ModelRunner, so every path measured is the engine's own: its CUDA graphs, its partitioned paths
(engine/partitions.py), one `launch` per step (model, LM head, sampling). Sections, each reported even if
another fails:

1. probe: does a green-context partition bound a GEMM's speed; are the driver-made halves disjoint; do two
   contexts from torch's GreenContext.create overlap; which partition does a CUDA graph run on.
2. correctness: each step run twice on the same state, without and with partitions (the plain run's tokens go
   on): a tiny random model in fp32 must give identical tokens; Qwen3-0.6B shape in bf16 may differ only at
   near-ties (logit gap <= 0.1). Steps: a prefill, then mixed steps (decodes beside prompt chunks: prefill
   beside decode), then decode-only steps of 64 (the attention/FFN pipeline).
3. part 1, the attention/FFN pipeline: decode step time, tok/s, at batch 64/128/256, each sequence with
   CONTEXT tokens of KV (distinct blocks), for Qwen3-0.6B and Qwen3-8B shapes: plain (off), the pipeline on
   two ordinary streams (overlap without partitions), and with attention on 32/64/96/112 SMs.
4. part 2, prefill beside decode: one mixed step, 128 decodes (CONTEXT tokens each) + a 2048-token prompt
   chunk: decodes alone, prefill alone, sequential (today's mixed step), and side by side with the decodes on
   16..112 SMs; and which split the engine's rule picks for this step.
"""
import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanovllm.config import Config  # noqa: E402
from nanovllm.engine.model_runner import ModelRunner  # noqa: E402
from nanovllm.engine.partitions import Partition, SMPartitions, split_sms, unsupported_reason  # noqa: E402
from nanovllm.engine.scheduler import Batch  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402
from nanovllm.models.decoder import DecoderForCausalLM  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402
from nanovllm.utils.checkpoints import PRESETS  # noqa: E402

BLOCK = 256
CONTEXT = 1000  # KV tokens per decoding sequence in the timed steps (4 blocks of 256 each)
PREFILL_CHUNK = 2048
NEAR_TIE = 0.1  # as tests/test_gpu.py: logits of a random Qwen3-0.6B spread over about +-3
GREEDY = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM"}
DEVICE = torch.device("cuda:0")


def log(message: str):
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- models with random weights, made on the GPU ----

class RandomRunner(ModelRunner):
    """The engine's ModelRunner, with random weights drawn on the GPU instead of loaded, and CUDA graphs only
    for the batch sizes measured."""
    init_std = 0.02
    graph_sizes = (64, 128, 256)

    def _build_model(self) -> DecoderForCausalLM:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.config.dtype)
        try:
            with torch.device(self.device):
                model = DecoderForCausalLM(self.config.hf_config)
        finally:
            torch.set_default_dtype(default_dtype)
        generator = torch.Generator(self.device).manual_seed(0)
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):  # norms stay 1, as a freshly initialized Hugging Face model's
                param.data.normal_(0, self.init_std, generator=generator)
        return model.eval()

    def _graph_batch_sizes(self) -> list[int]:
        return [size for size in self.graph_sizes if size <= self.config.max_num_seqs]


def make_runner(preset: str, dtype: str, num_blocks: int, init_std: float) -> RandomRunner:
    from transformers import AutoConfig
    spec = dict(PRESETS[preset])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.architectures = [ARCHITECTURES[model_type]]
    path = tempfile.mkdtemp(prefix=f"m2-{preset}-")
    config.save_pretrained(path)  # config.json only: the weights are drawn on the GPU
    max_model_len = min(2304, spec["max_position_embeddings"])
    RandomRunner.init_std = init_std
    return RandomRunner(Config(path, device=str(DEVICE), dtype=dtype, kv_cache_block_size=BLOCK,
                               num_kv_cache_blocks=num_blocks, max_num_seqs=256, max_model_len=max_model_len,
                               max_num_batched_tokens=max_model_len), DEVICE.index)


def release():
    """Give back the memory of what the caller has just dropped (graphs and runners hold cycles)."""
    gc.collect()
    torch.cuda.empty_cache()


def make_seqs(lengths: list[int], first_block: int, vocab: int, seed: int, room: int = 24) -> list[Sequence]:
    """Sequences of random tokens, each with its own KV blocks from `first_block` on (`room` tokens to grow)."""
    rng = random.Random(seed)
    seqs, block = [], first_block
    for length in lengths:
        seq = Sequence([rng.randrange(vocab) for _ in range(length)], GREEDY, BLOCK)
        num_blocks = math.ceil((length + room) / BLOCK)
        seq.block_table = list(range(block, block + num_blocks))
        block += num_blocks
        seqs.append(seq)
    return seqs


def decode_batch(seqs: list[Sequence]) -> Batch:
    return Batch(0, decodes=[(seq, seq.num_tokens, -1) for seq in seqs], sampled=list(seqs))


# ---- 1. probe ----

def probe() -> dict:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8192, 4096, dtype=torch.bfloat16, device=DEVICE)
    outs = [torch.empty(8192, 4096, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]

    def gemms(streams, reps=10) -> float:
        """ms per rep of one GEMM on each stream at once (all forked from and joined to the current stream)."""
        main = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for stream, out in zip(streams, outs):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                for _ in range(reps):
                    torch.matmul(a, b, out=out)
        for stream in streams:
            main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        return start.elapsed_time(end) / reps

    def replays(graph, stream, reps=10) -> float:
        main = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            for _ in range(reps):
                graph.replay()
        main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        return start.elapsed_time(end) / reps

    plain = torch.cuda.Stream(DEVICE)
    small, big = split_sms(DEVICE, 32)
    gemms([plain])  # warm-up
    result = dict(gemm="8192x8192 @ 8192x4096 bf16", small_sms=small.sms, big_sms=big.sms,
                  full_ms=gemms([plain]), small_ms=gemms([small.stream]), big_ms=gemms([big.stream]),
                  small_and_big_at_once_ms=gemms([small.stream, big.stream]))
    try:
        from torch.cuda.green_contexts import GreenContext
        torch_contexts = [GreenContext.create(num_sms=64, device_id=DEVICE.index) for _ in range(2)]
        torch_streams = [context.Stream() for context in torch_contexts]
        result.update(torch_api_one_64_ms=gemms(torch_streams[:1]), torch_api_two_64_at_once_ms=gemms(torch_streams))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        result["torch_api_error"] = f"{type(e).__name__}: {e}"
    try:
        captured = {}
        for name, stream in (("full", plain), ("small", small.stream)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                torch.matmul(a, b, out=outs[0])
            captured[name] = graph
        result["graph_captured_full_replayed_on_small_ms"] = replays(captured["full"], small.stream)
        result["graph_captured_small_replayed_on_main_ms"] = replays(captured["small"], plain)
        graph = torch.cuda.CUDAGraph()  # one graph, a GEMM on each partition
        with torch.cuda.graph(graph, stream=small.stream):
            big.stream.wait_stream(small.stream)
            with torch.cuda.stream(big.stream):
                torch.matmul(a, b, out=outs[1])
            torch.matmul(a, b, out=outs[0])
            small.stream.wait_stream(big.stream)
        result["graph_across_both_partitions_ms"] = replays(graph, plain)
    except Exception as e:  # noqa: BLE001
        result["graph_error"] = f"{type(e).__name__}: {e}"
    return result


# ---- 2. correctness ----

def check_parity(runner: RandomRunner, parts: SMPartitions, num_prompts: int, lengths: tuple[int, int],
                 chunk: int, decode_steps: int, seed: int) -> dict:
    """Prefill 3/4 of the prompts; decode them while the rest are prefilled `chunk` tokens at a time (mixed steps);
    then decode all together. Each step runs plain, then partitioned, on the same state; the plain tokens go on."""
    rng = random.Random(seed)
    vocab = min(10000, runner.config.hf_config.vocab_size)
    seqs = make_seqs([rng.randint(*lengths) for _ in range(num_prompts)], 0, vocab, seed, room=decode_steps + 8)
    first, rest = seqs[:num_prompts * 3 // 4], seqs[num_prompts * 3 // 4:]
    stats = dict(steps=0, tokens=0, differ=0, max_gap=0.0, max_abs_logit_diff=0.0)

    def step(batch: Batch):
        inputs = runner.host_inputs(batch)
        with torch.inference_mode():
            plain = runner.model.compute_logits(runner.forward(inputs)).float()
            partitioned = runner.model.compute_logits(parts.forward(inputs)).float()
        tokens, others = plain.argmax(-1), partitioned.argmax(-1)
        rows = (tokens != others).nonzero().flatten()
        gap = float((plain[rows, tokens[rows]] - plain[rows, others[rows]]).max()) if len(rows) else 0.0
        stats.update(steps=stats["steps"] + 1, tokens=stats["tokens"] + len(tokens),
                     differ=stats["differ"] + len(rows), max_gap=max(stats["max_gap"], gap),
                     max_abs_logit_diff=max(stats["max_abs_logit_diff"],
                                            float((plain - partitioned).abs().max())))
        for seq, token in zip(batch.sampled, tokens.tolist()):
            seq.append_token(token)

    step(Batch(0, prefills=[(seq, 0, len(seq)) for seq in first], sampled=list(first)))
    done = {seq.seq_id: 0 for seq in rest}
    while any(done[seq.seq_id] < seq.num_prompt_tokens for seq in rest):
        prefills = [(seq, done[seq.seq_id], min(seq.num_prompt_tokens, done[seq.seq_id] + chunk))
                    for seq in rest if done[seq.seq_id] < seq.num_prompt_tokens]
        completing = [seq for seq, _, end in prefills if end == seq.num_prompt_tokens]
        batch = Batch(0, decodes=[(seq, seq.num_tokens, -1) for seq in first], prefills=prefills,
                      sampled=first + completing)
        for seq, _, end in prefills:
            done[seq.seq_id] = end
        step(batch)
    for _ in range(decode_steps):
        step(decode_batch(seqs))
    stats["paths"] = dict(parts.steps)
    return stats


# ---- timing ----

def time_steps(runner: RandomRunner, parts: SMPartitions | None, batch: Batch, steps: int, warmup: int = 2) -> float:
    """Seconds per engine step (`launch`: model, LM head, sampling), steps queued back to back as the engine does."""
    runner.partitions = parts
    try:
        for _ in range(warmup):
            runner.launch(batch)
        torch.cuda.synchronize(DEVICE)
        start = time.perf_counter()
        for _ in range(steps):
            runner.launch(batch)
        torch.cuda.synchronize(DEVICE)
        return (time.perf_counter() - start) / steps
    finally:
        runner.partitions = None


def part1(runner: RandomRunner, seqs: list[Sequence], batches: list[int], attention_sms: list[int],
          steps: int) -> list[dict]:
    variants = {"off": None,
                "streams": SMPartitions(runner, pipeline=(Partition(None, torch.cuda.Stream(DEVICE)),
                                                          Partition(None, torch.cuda.Stream(DEVICE))))}
    for sms in attention_sms:
        variants[f"attention {sms}"] = SMPartitions(runner, pipeline=split_sms(DEVICE, sms))
    rows = []
    for bs in batches:
        batch = decode_batch(seqs[:bs])
        row = dict(batch=bs)
        for name, parts in variants.items():
            row[name] = bs / time_steps(runner, parts, batch, steps)
            if parts is not None:
                assert parts.steps["pipeline"] > 0, f"{name}: the pipeline did not run"
        best = max((name for name in variants if name != "off"), key=row.get)
        row.update(best=best, gain=row[best] / row["off"] - 1)
        rows.append(row)
        log(f"part 1, batch {bs}: " + ", ".join(f"{name} {row[name]:,.0f}" for name in variants) + " tok/s")
    del variants
    release()
    return rows


class pinned_split:
    """Make `parts` choose split k for every step (to time each split with one set of captured graphs)."""

    def __init__(self, parts: SMPartitions, k: int):
        self.parts, self.k = parts, k

    def __enter__(self):
        self.parts.choose_split = lambda inputs: self.k

    def __exit__(self, *exc):
        del self.parts.choose_split


def part2(runner: RandomRunner, seqs: list[Sequence], prompt: Sequence, decode_sms: list[int], steps: int) -> dict:
    decodes = seqs[:128]
    mixed = Batch(0, decodes=[(seq, seq.num_tokens, -1) for seq in decodes], prefills=[(prompt, 0, PREFILL_CHUNK)],
                  sampled=decodes + [prompt])
    result = dict(decodes=len(decodes), context=CONTEXT, prefill_tokens=PREFILL_CHUNK,
                  decode_alone_ms=1e3 * time_steps(runner, None, decode_batch(decodes), steps),
                  prefill_alone_ms=1e3 * time_steps(runner, None, Batch(0, prefills=[(prompt, 0, PREFILL_CHUNK)],
                                                                        sampled=[prompt]), steps),
                  sequential_ms=1e3 * time_steps(runner, None, mixed, steps))
    parts = SMPartitions(runner, splits=[split_sms(DEVICE, sms) for sms in decode_sms])
    result["rule_picks"] = parts.splits[parts.choose_split(runner.host_inputs(mixed))][0].sms
    result["split_ms"] = {}
    for k, (decode, prefill) in enumerate(parts.splits):
        with pinned_split(parts, k):
            result["split_ms"][decode.sms] = 1e3 * time_steps(runner, parts, mixed, steps)
    best = min(result["split_ms"], key=result["split_ms"].get)
    result.update(best_split=best, gain=result["sequential_ms"] / result["split_ms"][best] - 1,
                  rule_gain=result["sequential_ms"] / result["split_ms"][result["rule_picks"]] - 1)
    splits = ", ".join(f"decode {sms} SMs {ms:.2f}" for sms, ms in result["split_ms"].items())
    log(f"part 2: sequential {result['sequential_ms']:.2f} ms, {splits}; rule picks {result['rule_picks']}")
    del parts
    release()
    return result


# ---- the run ----

def section(results: dict, name: str, fn, *args):
    log(f"{name} ...")
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - one section failing must not hide the others
        traceback.print_exc()
        results[name] = dict(error=f"{type(e).__name__}: {e}")
    save(results)  # after every section: a run stopped by a time limit keeps what it measured


def save(results: dict):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "m2_green_contexts.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


def model_sections(results: dict, preset: str, args):
    """Correctness (0.6B only), part 1 and part 2 for one model shape, on one runner."""
    num_blocks = 256 * math.ceil((CONTEXT + 24) / BLOCK) + PREFILL_CHUNK // BLOCK + 8
    runner = make_runner(preset, "bfloat16", num_blocks, init_std=0.02)
    log(f"{preset}: runner ready ({num_blocks} KV blocks)")
    vocab = runner.config.hf_config.vocab_size
    if preset == "qwen3-0.6b":
        def correctness(runner):  # the partitions are built inside the section: their failure must not end the run
            parts = SMPartitions(runner, pipeline=split_sms(DEVICE, 64),
                                 splits=[split_sms(DEVICE, sms) for sms in (32, 64, 96)])
            return check_parity(runner, parts, 64, (100, 600), 128, 8, 1)
        section(results, f"correctness {preset} bf16", correctness, runner)
        release()
    with torch.inference_mode():
        runner.kv_cache.normal_()  # the timed steps read KV they never wrote: make it ordinary numbers
    seqs = make_seqs([CONTEXT] * 256, 0, vocab, seed=2)
    prompt = make_seqs([PREFILL_CHUNK], seqs[-1].block_table[-1] + 1, vocab, seed=3, room=0)[0]
    steps = args.steps_8b if preset == "qwen3-8b" else args.steps
    section(results, f"part 1 {preset}", part1, runner, seqs, args.batches, args.attention_sms, steps)
    section(results, f"part 2 {preset}", part2, runner, seqs, prompt, args.decode_sms, steps)
    del runner
    release()


def correctness_tiny() -> dict:
    runner = make_runner("qwen3-tiny", "float32", 160, init_std=0.3)  # varied tokens: see tests/conftest.py
    parts = SMPartitions(runner, pipeline=split_sms(DEVICE, 64), splits=[split_sms(DEVICE, sms) for sms in (32, 96)])
    return check_parity(runner, parts, 64, (20, 300), 64, 8, 0)


def print_table(results: dict):
    p = results.get("probe", {})
    print(f"\n== M2 SM partitions: {results['device']}, {results['sms']} SMs, torch {results['torch']}, "
          f"CUDA {results['cuda']} ==")
    if "error" in p:
        print(f"probe: {p['error']}")
    elif p:
        print(f"probe ({p['gemm']}, ms): whole GPU {p['full_ms']:.2f} | {p['small_sms']} SMs {p['small_ms']:.2f} | "
              f"{p['big_sms']} SMs {p['big_ms']:.2f} | both at once {p['small_and_big_at_once_ms']:.2f} "
              f"(disjoint if ~{max(p['small_ms'], p['big_ms']):.2f})")
        if "torch_api_error" in p:
            print(f"  torch GreenContext.create: {p['torch_api_error']}")
        else:
            print(f"  torch GreenContext.create(64) x2: one {p['torch_api_one_64_ms']:.2f}, two at once "
                  f"{p['torch_api_two_64_at_once_ms']:.2f} (~1x one: disjoint; ~2x: the same SMs)")
        if "graph_error" in p:
            print(f"  graphs: {p['graph_error']}")
        else:
            print(f"  graphs: captured on whole GPU, replayed on {p['small_sms']}-SM stream "
                  f"{p['graph_captured_full_replayed_on_small_ms']:.2f}; captured on {p['small_sms']}-SM stream, "
                  f"replayed on main {p['graph_captured_small_replayed_on_main_ms']:.2f} (a graph keeps the "
                  f"partition it was captured on if ~{p['small_ms']:.2f})")
            print(f"  one graph, a GEMM on each partition: {p['graph_across_both_partitions_ms']:.2f} (each node on "
                  f"its partition if ~{p['small_and_big_at_once_ms']:.2f}; both on the {p['small_sms']}-SM one if "
                  f"~{2 * p['small_ms']:.2f})")
    for name, r in results.items():
        if name.startswith("correctness"):
            if "error" in r:
                print(f"{name}: {r['error']}")
                continue
            verdict = ("identical" if r["differ"] == 0 else
                       "near-ties only" if r["max_gap"] <= NEAR_TIE and "bf16" in name else "MISMATCH")
            print(f"{name}: {r['differ']} of {r['tokens']} tokens differ in {r['steps']} steps (max gap "
                  f"{r['max_gap']:.3f}, max |logit diff| {r['max_abs_logit_diff']:.2e}): {verdict}; paths {r['paths']}")
    for name, rows in results.items():
        if not name.startswith("part 1"):
            continue
        if isinstance(rows, dict):
            print(f"{name}: {rows['error']}")
            continue
        names = [key for key in rows[0] if key not in ("batch", "best", "gain")]
        print(f"{name} (decode tok/s, {CONTEXT} KV tokens per sequence):")
        print("  batch | " + " | ".join(f"{n:>13}" for n in names) + " | best")
        for row in rows:
            print(f"  {row['batch']:>5} | " + " | ".join(f"{row[n]:>13,.0f}" for n in names)
                  + f" | {row['best']} ({row['gain']:+.1%})")
    for name, r in results.items():
        if not name.startswith("part 2"):
            continue
        if "error" in r:
            print(f"{name}: {r['error']}")
            continue
        splits = " | ".join(f"{sms}: {ms:.2f}" for sms, ms in r["split_ms"].items())
        print(f"{name} (ms per mixed step: {r['decodes']} decodes x {r['context']} + {r['prefill_tokens']}-token "
              f"prefill): decodes alone {r['decode_alone_ms']:.2f}, prefill alone {r['prefill_alone_ms']:.2f}, "
              f"sequential {r['sequential_ms']:.2f}")
        print(f"  side by side, decode SMs -> ms: {splits}; best {r['best_split']} ({r['gain']:+.1%}); "
              f"rule picks {r['rule_picks']} ({r['rule_gain']:+.1%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    parser.add_argument("--attention-sms", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 96, 112])
    parser.add_argument("--decode-sms", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 32, 48, 64, 80, 96, 112])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (0.6B)")
    parser.add_argument("--steps-8b", type=int, default=8, help="timed steps per measurement (8B)")
    args = parser.parse_args()
    reason = unsupported_reason(DEVICE)
    if reason:
        sys.exit(f"green contexts are not available: {reason}")
    props = torch.cuda.get_device_properties(DEVICE)
    results = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                   cuda=torch.version.cuda, context_tokens=CONTEXT)
    section(results, "probe", probe)
    section(results, "correctness qwen3-tiny fp32", correctness_tiny)
    release()
    for preset in args.models.split(","):
        model_sections(results, preset, args)
    results["seconds"] = time.perf_counter() - START
    save(results)
    print_table(results)
    failed = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
    sys.exit(1 if failed else 0)


START = time.perf_counter()
if __name__ == "__main__":
    main()
