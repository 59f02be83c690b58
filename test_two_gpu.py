"""Prefill/decode disaggregation: PD mode must give the same tokens as single-device mode.

    pytest test_two_gpu.py -s        # on a machine with two GPUs; the GPU cases skip (with a reason) otherwise

On CPU the same path runs with "cpu" for both sides, in fp32: two runners, two KV caches, real copies.
On two GPUs (cuda:0 prefills, cuda:1 decodes; single-device runs on cuda:0) the model is a random-weight
Qwen3-0.6B-shape checkpoint made on the spot (no network); each test names its dtype.
"""
import gc
import os
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.checkpoints import make_random_checkpoint

TWO_GPUS = torch.cuda.device_count() >= 2
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def prompts(n: int, min_len: int, max_len: int, seed: int = 0, vocab: int = 10000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def generate(path, batch, params=GREEDY, inspect=lambda llm: None, **options) -> list[list[int]]:
    """Greedy tokens from a fresh engine (`inspect` sees it afterwards), then its GPU memory is freed:
    the next engine sizes its KV cache from what is free."""
    llm = LLM(path, **options)
    tokens = [o["token_ids"] for o in llm.generate(batch, params, use_tqdm=False)]
    inspect(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


def test_pd_on_cpu_matches_single_device(tmp_path):
    path = make_random_checkpoint(str(tmp_path / "m"), "qwen3-tiny", initializer_range=0.3)
    batch = prompts(10, 5, 80, vocab=500)
    small = dict(dtype="float32", kv_cache_block_size=16, max_model_len=256, max_num_batched_tokens=256)
    single = generate(path, batch, **small, device="cpu", num_kv_cache_blocks=128)
    stalls = []
    pd = generate(path, batch, **small, enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu",
                  num_kv_cache_blocks=24, num_prefill_kv_cache_blocks=24,
                  inspect=lambda llm: stalls.append(llm.scheduler.num_backpressure_stalls))
    assert pd == single
    assert stalls[0] > 0


@pytest.fixture(scope="module")
def qwen3_06b():
    return make_random_checkpoint(os.path.expanduser("~/.cache/nanovllm/random-qwen3-0.6b"), "qwen3-0.6b")


# Small engines: 8 decode CUDA graphs instead of 36 and a smaller warm-up batch, so each engine starts sooner.
SMALL_GPU_ENGINE = dict(max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=4096)
SINGLE_GPU = dict(device="cuda:0", **SMALL_GPU_ENGINE)
PD_GPUS = dict(enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=1, **SMALL_GPU_ENGINE)


def near_tie_gaps(path, batch, a, b) -> list[float]:
    """Where two greedy runs part ways, how far apart transformers' logits of the two tokens are."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0")
    gaps = []
    with torch.no_grad():
        for prompt, x, y in zip(batch, a, b):
            n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
            if n is not None:
                logits = model(torch.tensor([prompt + x[:n]], device="cuda:0")).logits[0, -1].float()
                gaps.append(abs(float(logits[x[n]] - logits[y[n]])))
    return gaps


BF16_BATCH = prompts(24, 20, 600, seed=1)
FP32_BATCH, FP32_PARAMS = prompts(48, 100, 800, seed=2), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def single_gpu_bf16(qwen3_06b):
    """One GPU's tokens for BF16_BATCH: the reference of both PD policies (one engine start instead of two)."""
    return generate(qwen3_06b, BF16_BATCH, **SINGLE_GPU, dtype="bfloat16")


@pytest.fixture(scope="module")
def single_gpu_fp32(qwen3_06b):
    return generate(qwen3_06b, FP32_BATCH, FP32_PARAMS, **SINGLE_GPU, dtype="float32")


@needs_two_gpus
@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_pd_matches_single_gpu_bf16(qwen3_06b, single_gpu_bf16, policy):
    # bf16 kernels may round differently on the two paths (e.g. torch.compile picks reduction
    # configs per device from the first shape it sees), which can flip a near-tie: any divergence
    # must be one, judged by transformers' logits (the same bound as tests/test_gpu.py).
    batch, single = BF16_BATCH, single_gpu_bf16
    devices = []
    pd = generate(qwen3_06b, batch, **PD_GPUS, pd_policy=policy, dtype="bfloat16", inspect=lambda llm: devices.extend(
        [llm.prefill_runner.kv_cache.device, llm.decode_runner.kv_cache.device]))
    assert devices == [torch.device("cuda:0"), torch.device("cuda:1")]
    matched = sum(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(pd, single))
    gaps = near_tie_gaps(qwen3_06b, batch, pd, single)
    identical = sum(x == y for x, y in zip(pd, single))
    print(f"\nbf16 PD ({policy}) vs single: {identical}/{len(batch)} sequences identical, "
          f"{matched}/{sum(map(len, pd))} tokens before the first divergence; logit gaps there: "
          f"{[round(g, 4) for g in gaps]}")
    assert all(g <= 0.1 for g in gaps)


@needs_two_gpus
@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_pd_under_back_pressure_and_preemption_fp32(qwen3_06b, single_gpu_fp32, policy):
    # Many requests and small KV pools (24 blocks of 256 tokens on each GPU in adaptive mode, on the decode
    # GPU in static mode): admission waits, decoding preempts, and (adaptive) sequences move between GPUs.
    # Batches differ between the modes here, so compare in fp32, where rounding cannot flip a token.
    batch, params, single = FP32_BATCH, FP32_PARAMS, single_gpu_fp32
    engines = []
    pools = dict(num_kv_cache_blocks=24, num_prefill_kv_cache_blocks=24 if policy == "adaptive" else -1)
    pd = generate(qwen3_06b, batch, params, dtype="float32", **pools, **PD_GPUS, pd_policy=policy,
                  inspect=lambda llm: engines.append((llm.scheduler, llm.stats)))
    s, stats = engines[0]
    print(f"\n{policy}: back-pressure stalls {s.num_backpressure_stalls}, preemptions {s.num_preemptions}, "
          f"migrations {s.num_migrations}, GPU0 peak blocks {s.block_managers[0].peak_used_blocks} of "
          f"{s.block_managers[0].num_blocks}, KV moved {stats['kv_bytes'] / 1e9:.2f} GB in "
          f"{stats['kv_copies']} copies")
    assert pd == single
    assert s.num_backpressure_stalls > 0 and s.num_preemptions > 0 and s.num_migrations > 0
    if policy == "static":
        prompt_blocks = sum(-(-len(p) // 256) for p in batch)
        assert s.block_managers[0].peak_used_blocks < prompt_blocks  # it never held every prompt at once
    for bm in s.block_managers:
        assert bm.num_free_blocks == bm.num_blocks


@needs_two_gpus
def test_bad_gpu_configs(qwen3_06b):
    with pytest.raises(ValueError, match="two different GPUs"):
        LLM(qwen3_06b, **dict(PD_GPUS, decode_device_id="cuda:0"), dtype="bfloat16")
    with pytest.raises(ValueError, match="does not exist"):
        LLM(qwen3_06b, **dict(PD_GPUS, decode_device_id=torch.cuda.device_count()), dtype="bfloat16")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(qwen3_06b, **PD_GPUS, dtype="bfloat16", tensor_parallel_size=2)


@needs_two_gpus
def test_pd_kv_copies_through_host_memory_fp32(qwen3_06b):
    # What pd_fallback="host" does where the GPUs lack peer access: the same KV, staged in pinned host memory.
    batch = prompts(8, 100, 600, seed=3)
    single = generate(qwen3_06b, batch, **SINGLE_GPU, dtype="float32")
    llm = LLM(qwen3_06b, **PD_GPUS, dtype="float32")
    llm.config.kv_via_host = True  # this machine has peer access: force the fallback path
    pd = [o["token_ids"] for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    assert llm.scheduler.num_migrations > 0 and llm.stats["kv_bytes"] > 0
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    assert pd == single
