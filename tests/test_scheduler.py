"""Scheduler invariants: budgets respected, no request lost or duplicated, preemption frees blocks."""
from itertools import count

from nanovllm import SamplingParams
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus


class FakeConfig:
    max_num_seqs = 4
    max_num_batched_tokens = 64
    max_model_len = 32
    eos = -1
    enable_two_gpu_pd = False
    kv_cache_block_size = 4

PROMPT_TOKEN = count(1)


def make(n_tokens, max_tokens=100):
    # Each prompt distinct, so that the prefix cache shares nothing.
    return Sequence([next(PROMPT_TOKEN)] * n_tokens, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True), 4)


def test_prefill_respects_token_and_sequence_budgets():
    s = Scheduler(FakeConfig(), num_blocks=100)
    seqs = [make(30) for _ in range(6)]
    for q in seqs:
        s.add(q)
    batch, is_prefill = s.schedule()
    assert is_prefill and len(batch) == 2  # 64 tokens fit two 30-token prompts
    batch2, _ = s.schedule()
    batch3, _ = s.schedule()
    assert len(batch2) == 2 and len(batch3) == 2
    batch4, is_prefill = s.schedule()
    assert not is_prefill and len(batch4) == 4  # max_num_seqs


def test_run_to_completion_under_preemption_loses_nothing():
    s = Scheduler(FakeConfig(), num_blocks=12)  # 48 tokens for 4 sequences growing to 32
    seqs = [make(10, max_tokens=20) for _ in range(4)]
    for q in seqs:
        s.add(q)
    steps = 0
    while not s.is_finished():
        batch, _ = s.schedule()
        assert len(set(q.seq_id for q in batch)) == len(batch)  # no duplicates
        assert all(q.status == SequenceStatus.RUNNING for q in batch)
        s.postprocess(batch, [7] * len(batch))
        steps += 1
        assert steps < 1000
    assert s.num_preemptions > 0
    assert all(q.is_finished and q.num_completion_tokens == 20 for q in seqs)
    assert s.block_manager.num_free_blocks == 12


def test_too_few_blocks_for_one_sequence_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="too few for one sequence"):
        Scheduler(FakeConfig(), num_blocks=7)
