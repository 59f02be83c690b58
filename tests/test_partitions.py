"""M2's SM partitions (engine/partitions.py): the option is checked and refused clearly where green contexts cannot
work; the partitioned paths give the same tokens as the plain ones.

On CPU (fp32) the partitions are stream-less labels, so their work runs inline, in the order the GPU would issue
it: that checks the bookkeeping (nano-batches, the split of a mixed step, the order of the sampled rows) against
the plain engine, exactly. On a GPU with green contexts the same comparison runs on real partitions: fp32 tokens
identical to the engine without partitions, and bf16 within near-ties of transformers (test_gpu.py's rule).
"""
import gc
import os

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, Config, SamplingParams
from nanovllm.engine.partitions import Partition, SMPartitions, unsupported_reason

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# Small prefill budgets, so that prompts are chunked and most steps are mixed (decodes beside a prompt chunk).
CPU = dict(device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=256, max_num_batched_tokens=64,
           chunked_prefill_tokens=40, num_kv_cache_blocks=128)


# ---- the option, on CPU ----

@pytest.mark.parametrize("spec, error, message", [
    ({"attention_sms": 64}, ValueError, "need a CUDA GPU, and the device is cpu"),
    ({}, ValueError, "needs attention_sms and/or decode_sms"),
    ({"attention": 64}, ValueError, "unknown key"),
    ({"attention_sms": 60}, ValueError, "multiples of 8"),
    ({"decode_sms": [32, 4]}, ValueError, "multiples of 8"),
    ({"attention_sms": True}, TypeError, r"sm_partitions\['attention_sms'\] must be an int"),
    ({"decode_sms": "64"}, TypeError, "must be an int or a non-empty list of ints"),
    ({"attention_sms": 64, "pipeline_min_batch": 1}, ValueError, "pipeline_min_batch"),
    ([64], TypeError, "sm_partitions must be dict or None"),
])
def test_bad_or_impossible_sm_partitions_are_refused_before_loading(qwen3_path, spec, error, message):
    with pytest.raises(error, match=message):
        Config(qwen3_path, device="cpu", sm_partitions=spec)


def test_decode_partitions_need_mixed_steps(qwen3_path):
    with pytest.raises(ValueError, match="chunked_prefill_tokens"):
        Config(qwen3_path, device="cpu", chunked_prefill_tokens=0, max_num_batched_tokens=4096,
               sm_partitions={"decode_sms": 64})


def test_green_contexts_are_unsupported_on_cpu():
    assert "CUDA GPU" in unsupported_reason(torch.device("cpu"))


# ---- the paths, on CPU ----

def test_partitioned_paths_give_the_same_tokens_on_cpu(qwen3_path):
    prompts = random_prompts(12, 5, 60, seed=4)
    plain = LLM(qwen3_path, **CPU).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(qwen3_path, **CPU)
    runner = llm.model_runner
    runner.partitions = SMPartitions(runner, pipeline=(Partition(64, None), Partition(68, None)),
                                     splits=[(Partition(32, None), Partition(100, None)),
                                             (Partition(96, None), Partition(36, None))], pipeline_min_batch=4)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in plain]
    assert runner.partitions.steps["pipeline"] > 0 and runner.partitions.steps["side_by_side"] > 0


def test_interleaved_forward_matches_forward_on_cpu(qwen3_path):
    from nanovllm.engine.partitions import Lanes, split_decodes
    from nanovllm.engine.scheduler import Batch
    from nanovllm.engine.sequence import Sequence
    llm = LLM(qwen3_path, **CPU)
    runner = llm.model_runner
    seqs = [Sequence(prompt, GREEDY, 16) for prompt in random_prompts(5, 3, 40, seed=5)]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(4 * i, 4 * i + 4))
    runner.run(Batch(0, prefills=[(seq, 0, len(seq)) for seq in seqs], sampled=seqs))
    with torch.inference_mode():
        inputs = runner.host_inputs(Batch(0, decodes=[(seq, len(seq), -1) for seq in seqs], sampled=seqs))
        input_ids, positions, ctx = runner._decode_tensors(inputs)
        expected = runner.model(input_ids, positions, ctx)
        nanos = split_decodes(input_ids, positions, ctx, 2)
        assert [len(ids) for ids, _, _ in nanos] == [2, 3]
        interleaved = runner.model.model.forward_interleaved(nanos, Lanes(None, None, 2))
    torch.testing.assert_close(interleaved, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(runner.model.compute_logits(interleaved).argmax(-1),
                       runner.model.compute_logits(expected).argmax(-1))


def test_each_mixed_step_gives_the_decodes_a_partition_after_their_share_of_the_work(qwen3_path):
    from nanovllm.engine.scheduler import Batch
    from nanovllm.engine.sequence import Sequence
    runner = LLM(qwen3_path, **CPU).model_runner
    parts = SMPartitions(runner, splits=[(Partition(sms, None), Partition(128 - sms, None)) for sms in (96, 32, 64)])
    assert [decode.sms for decode, _ in parts.splits] == [32, 64, 96]
    decoding = Sequence([1] * 200, GREEDY, 16)
    decoding.block_table = list(range(13))
    prompt = Sequence([1] * 4000, GREEDY, 16)

    def chosen(prefill_tokens: int) -> int:
        inputs = runner.host_inputs(Batch(0, decodes=[(decoding, 200, -1)], prefills=[(prompt, 0, prefill_tokens)],
                                          sampled=[decoding]))
        share = parts.cost.decode(inputs) / (parts.cost.decode(inputs) + parts.cost.prefill(inputs))
        sms = parts.splits[parts.choose_split(inputs)][0].sms
        assert sms >= 128 * share or sms == 96  # enough for its share, unless none is
        assert all(smaller.sms < 128 * share for smaller, _ in parts.splits if smaller.sms < sms)  # the smallest
        return sms

    # This tiny model's weights weigh little against a prompt's matmuls: 40 prompt tokens leave the decodes over
    # 90% of the work, 4000 under 2%.
    assert chosen(40) == 96
    assert chosen(4000) == 32


# ---- on a GPU with green contexts ----

gpu = pytest.mark.skipif(not torch.cuda.is_available() or unsupported_reason(torch.device("cuda:0")) is not None,
                         reason="needs a CUDA GPU with green contexts (CUDA 12.4+ driver)")
GPU_FP32 = dict(device="cuda:0", dtype="float32", kv_cache_block_size=16, max_model_len=512, max_num_seqs=128,
                max_num_batched_tokens=512, chunked_prefill_tokens=256, num_kv_cache_blocks=2048)
PARTITIONS = {"attention_sms": 64, "decode_sms": [32, 64, 96], "pipeline_min_batch": 16}


def generate(path, prompts, params=GREEDY, **options):
    """Tokens from a fresh engine, and which partitioned paths ran; the engine is freed afterwards."""
    llm = LLM(path, **options)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    partitions = llm.model_runner.partitions
    steps = dict(partitions.steps) if partitions else {}
    del llm, partitions
    gc.collect()
    torch.cuda.empty_cache()
    return [o["token_ids"] for o in outputs], steps


@gpu
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_fp32_tokens_are_the_same_with_partitions(qwen3_path, enforce_eager):
    prompts = random_prompts(48, 20, 300, seed=6)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain, _ = generate(qwen3_path, prompts, params, enforce_eager=enforce_eager, **GPU_FP32)
    partitioned, steps = generate(qwen3_path, prompts, params, enforce_eager=enforce_eager,
                                  sm_partitions=PARTITIONS, **GPU_FP32)
    assert partitioned == plain
    assert steps.get("pipeline", 0) > 0 and steps.get("side_by_side", 0) > 0


@gpu
def test_bf16_tokens_with_partitions_are_within_near_ties_of_transformers():
    from test_gpu import MAX_TOKENS, NEAR_TIE, hf_greedy_with_logits
    from nanovllm.utils.checkpoints import make_random_checkpoint
    path = make_random_checkpoint(os.path.join(os.path.expanduser("~/.cache/nanovllm"), "random-qwen3-0.6b"),
                                  "qwen3-0.6b")
    prompts = random_prompts(16, 20, 600, seed=0, vocab=10000)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ours, steps = generate(path, prompts, params, device="cuda:0", dtype="bfloat16", max_model_len=1024,
                           max_num_batched_tokens=1024, chunked_prefill_tokens=512,
                           sm_partitions=dict(PARTITIONS, pipeline_min_batch=8))
    assert steps.get("pipeline", 0) > 0 and steps.get("side_by_side", 0) > 0
    gaps = []
    for tokens, (ref_tokens, ref_logits) in zip(ours, hf_greedy_with_logits(path, prompts, MAX_TOKENS)):
        n = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        if n is not None:
            gaps.append(float(ref_logits[n, ref_tokens[n]] - ref_logits[n, tokens[n]]))
    assert all(gap <= NEAR_TIE for gap in gaps), gaps
