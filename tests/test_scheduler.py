"""Scheduler invariants: budgets respected, no request lost or duplicated, preemption frees blocks, states named.

The scheduler runs here without a model: `step` plays the engine, committing each batch with made-up tokens.
"""
from itertools import count
from types import SimpleNamespace

import pytest

from nanovllm import SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import LULL_MIN_STEPS, Scheduler
from nanovllm.engine.sequence import PENDING, Sequence, SequenceStatus

PROMPT_TOKEN = count(1)


def config(**overrides):
    return SimpleNamespace(**dict(dict(max_num_seqs=4, max_num_batched_tokens=64, chunked_prefill_tokens=16,
                                       max_model_len=32, eos_token_ids=(), enable_two_gpu_pd=False,
                                       kv_cache_block_size=4, pd_policy="adaptive"), **overrides))


def scheduler(num_blocks, **overrides):
    c = config(**overrides)
    return Scheduler(c, [BlockManager(num_blocks, c.kv_cache_block_size)])


def pd_scheduler(**overrides):
    """Two workers of 100 blocks each, in PD mode (a tiny model shape for the policy's cost model)."""
    c = config(enable_two_gpu_pd=True, hf_config=SimpleNamespace(num_hidden_layers=2, hidden_size=64,
                                                                intermediate_size=128, num_attention_heads=4,
                                                                num_key_value_heads=2), **overrides)
    return Scheduler(c, [BlockManager(100, c.kv_cache_block_size), BlockManager(100, c.kv_cache_block_size)])


def make(n_tokens, max_tokens=100):
    # Each prompt distinct, so that the prefix cache shares nothing.
    return Sequence([next(PROMPT_TOKEN)] * n_tokens, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True), 4)


def step(s, worker=0, token=7):
    batch = s.schedule(worker)
    s.apply_results(batch, s.check_results(batch, [token] * len(batch.sampled)))
    return batch


def test_prefill_respects_token_and_sequence_budgets():
    s = scheduler(100)
    seqs = [make(30) for _ in range(6)]
    for q in seqs:
        s.add(q)
    first = step(s)
    # 64 tokens: two whole 30-token prompts and a 4-token chunk of the third
    assert [(end - start) for _, start, end in first.prefills] == [30, 30, 4] and len(first.sampled) == 2
    assert [q.status for q in seqs[:3]] == [SequenceStatus.DECODING] * 2 + [SequenceStatus.PREFILLING]
    mixed = step(s)
    # now two sequences decode, so prompts get the chunk budget: 16 tokens, less one per decode
    assert len(mixed.decodes) == 2 and sum(end - start for _, start, end in mixed.prefills) == 14
    assert len(mixed.decodes) + len(mixed.prefills) <= 4  # max_num_seqs


def test_two_steps_in_flight_read_pending_tokens():
    s = scheduler(100)
    q = make(5)
    s.add(q)
    step(s)  # prefill: q now knows its first token
    first = s.schedule(0)  # launched, not collected: its token is PENDING
    assert first.decodes == [(q, 6, -1)] and q.token_ids[-1] == PENDING
    second = s.schedule(0)  # the next step reads that token from the first step's output row 0
    assert second.decodes == [(q, 7, 0)] and q.num_pending == 2
    s.apply_results(first, s.check_results(first, [11]))
    s.apply_results(second, s.check_results(second, [12]))
    assert q.completion_token_ids == [7, 11, 12] and q.num_pending == 0


def test_run_to_completion_under_preemption_loses_nothing():
    s = scheduler(12)  # 48 tokens for 4 sequences growing to 30
    seqs = [make(10, max_tokens=20) for _ in range(4)]
    for q in seqs:
        s.add(q)
    steps = 0
    while not s.is_finished():
        batch = step(s)
        assert len({q.seq_id for q in batch.seqs}) == len(batch.seqs)  # no duplicates
        steps += 1
        assert steps < 1000
    assert s.num_preemptions > 0
    assert all(q.is_finished and q.num_completion_tokens == 20 for q in seqs)
    assert s.block_managers[0].num_free_blocks == 12


def test_rollback_sends_a_failed_step_back_to_be_recomputed():
    s = scheduler(20)
    q = make(10)
    s.add(q)
    step(s)
    batch = s.schedule(0)
    failed = s.rollback([batch], RuntimeError("boom"))
    assert not failed and q.status == SequenceStatus.WAITING and q.num_failures == 1
    assert q.completion_token_ids == [7] and q.num_pending == 0  # the known token stays, the pending one goes
    assert s.block_managers[0].num_free_blocks == 20 and list(s.waiting) == [q]
    for _ in range(2):
        batch = s.schedule(0)
        failed = s.rollback([batch], RuntimeError("boom"))
    assert failed == [q] and q.finish_reason == "error" and "boom" in q.error and s.is_finished()


def test_abort_frees_everything():
    s = scheduler(20)
    a, b = make(10), make(10)
    s.add(a)
    s.add(b)
    step(s)
    s.abort(a)
    s.abort(b)
    assert a.finish_reason == b.finish_reason == "abort" and s.is_finished()
    assert s.block_managers[0].num_free_blocks == 20


def test_too_few_blocks_for_one_sequence_is_an_error():
    with pytest.raises(ValueError, match="too few for one sequence"):
        scheduler(8)


def longest_accepted_max_model_len(num_blocks: int) -> int:
    for max_model_len in range(4 * num_blocks, 0, -1):
        try:
            scheduler(num_blocks, max_model_len=max_model_len)
            return max_model_len
        except ValueError:
            pass


def test_a_pool_that_is_accepted_serves_the_longest_prompt():
    """Admission keeps a watermark of blocks free (1% of the pool, at least one); a pool the capacity check
    accepts must still admit and finish a prompt of max_model_len - 1 tokens, also where that is 2 blocks or more."""
    for num_blocks in (50, 200, 400):
        max_model_len = longest_accepted_max_model_len(num_blocks)
        s = scheduler(num_blocks, max_model_len=max_model_len)
        q = make(max_model_len - 1)
        s.add(q)
        steps = 0
        while not s.is_finished() and steps < 1000:
            step(s)
            steps += 1
        assert q.finish_reason == "length" and q.num_tokens == max_model_len, num_blocks
        assert s.block_managers[0].num_free_blocks == num_blocks


def test_static_pd_admits_no_more_than_max_num_seqs():
    """A finished prompt waits on worker 0 until its copy to worker 1 starts: it still counts as in flight."""
    s = pd_scheduler(pd_policy="static", max_num_seqs=2)
    seqs = [make(10) for _ in range(4)]
    for q in seqs:
        s.add(q)
    step(s)  # prefills two prompts: they wait on worker 0 for their copies
    assert not step(s).prefills  # the other two wait too
    assert [q.status for q in seqs[2:]] == [SequenceStatus.WAITING] * 2


def test_without_chunking_a_started_prompt_goes_before_decodes():
    """chunked_prefill_tokens=0: prompts run first, in steps of their own. A prompt that only part of a step's
    budget could start is finished in the next step, not after every running sequence has ended."""
    s = scheduler(100, chunked_prefill_tokens=0)
    first, second = make(30), make(50)
    s.add(first)
    s.add(second)
    assert [(end - start) for _, start, end in step(s).prefills] == [30, 34]  # the budget is 64
    nxt = step(s)
    assert not nxt.decodes and [(q, end - start) for q, start, end in nxt.prefills] == [(second, 16)]


def test_adaptive_pd_decodes_on_the_decode_worker_while_the_prefill_worker_has_prompts():
    """Online, worker 0's decodes would wait behind its prompt chunks (the inter-token tail PD exists to remove),
    and sequences moved there would move back once the prompts' load shows: while worker 0 has prompts, every
    sequence that fits decodes on worker 1."""
    s = pd_scheduler()
    seqs = [make(30) for _ in range(3)]
    for q in seqs:
        s.add(q)
    step(s)  # two prompts done, the third in progress

    def decodes_on(q):
        return q.migration[0] if q.migration else q.worker

    assert [decodes_on(q) for q in seqs[:2]] == [1, 1]
    s.start_migrations()  # rebalances first: worker 1 carries all the decode load, yet nothing moves back
    assert [decodes_on(q) for q in seqs[:2]] == [1, 1]


def test_a_decode_batch_lists_the_longest_contexts_first():
    """The decode attention kernel starts its programs in batch order; with the longest first, short sequences fill
    in at the end instead of a long one running on alone. Rows follow the new order."""
    s = scheduler(100, max_num_seqs=4, max_model_len=64)
    seqs = [make(n) for n in (5, 20, 9, 14)]
    for q in seqs:
        s.add(q)
    while s.waiting or s.prefilling[0]:
        step(s)
    batch = s.schedule(0)
    assert [end for _, end, _ in batch.decodes] == [21, 15, 10, 6]
    assert batch.sampled == [seqs[1], seqs[3], seqs[2], seqs[0]]
    assert [q.sampled_row for q in batch.sampled] == [0, 1, 2, 3]


def test_a_pending_token_is_read_only_from_the_workers_latest_step():
    """With several steps in flight, a step reads each PENDING input id from the previous step's output on the
    device. A sequence whose pending token came from an older step (it sat the latest one out) must wait until
    that token is known, or it would read another sequence's token."""
    s = scheduler(100, max_num_seqs=2)
    a, b = make(8), make(8)
    s.add(a)
    s.add(b)
    step(s)  # both prompts done, both decoding
    first = s.schedule(0)
    assert [(q, row) for q, _, row in first.decodes] == [(a, -1), (b, -1)]
    s.max_num_seqs = 1
    second = s.schedule(0)  # room for one: a, its input id read from row 0 of the first step's output
    assert [(q, row) for q, _, row in second.decodes] == [(a, 0)]
    s.max_num_seqs = 2
    third = s.schedule(0)  # b's pending token is in the first step, not the latest (second): b sits out
    assert [(q, row) for q, _, row in third.decodes] == [(a, 0)]
    for batch in (first, second, third):
        s.apply_results(batch, s.check_results(batch, [7] * len(batch.sampled)))
    assert [(q, row) for q, _, row in s.schedule(0).decodes] == [(a, -1), (b, -1)]  # all known now


def test_the_decode_worker_queues_more_steps_while_the_prefill_worker_has_prompts_but_no_backlog():
    """One host thread launches both GPUs, and a prompt step holds it longer than two decode steps last: while
    worker 0 has prompts, worker 1 keeps DEEP_QUEUE steps in flight, unless more prompt tokens wait than one step
    takes (then worker 0 is the bottleneck); otherwise every worker keeps two."""
    from nanovllm.engine.scheduler import DEEP_QUEUE
    s = pd_scheduler()
    assert [s.pipeline_depth(w) for w in (0, 1)] == [2, 2]
    s.add(make(30))
    assert [s.pipeline_depth(w) for w in (0, 1)] == [2, DEEP_QUEUE]
    s.add(make(30))
    s.add(make(30))  # 90 prompt tokens, one step takes 64: a backlog
    assert [s.pipeline_depth(w) for w in (0, 1)] == [2, 2]
    step(s)  # 64 computed, 26 left
    assert [s.pipeline_depth(w) for w in (0, 1)] == [2, DEEP_QUEUE]
    while s.waiting or s.prefilling[0]:
        step(s)
    assert [s.pipeline_depth(w) for w in (0, 1)] == [2, 2]


def test_the_decode_worker_queues_two_steps_while_it_has_prompt_chunks_of_its_own():
    """An eager step with a prompt chunk is hundreds of launches: six of them queued would fill CUDA's launch queue
    and block the one host thread that also feeds worker 0. Worker 1 keeps DEEP_QUEUE steps only while it decodes."""
    from nanovllm.engine.scheduler import DEEP_QUEUE
    s = pd_scheduler()
    s.add(make(30))
    assert s.pipeline_depth(1) == DEEP_QUEUE
    helper = make(30)
    s.prefilling[1].append(helper)  # a prompt worker 1 started under an earlier backlog, chunks still to compute
    assert s.pipeline_depth(1) == 2
    s.prefilling[1].remove(helper)
    s.policy.prefills_on = lambda worker: True  # it would start the next waiting prompt now
    assert s.pipeline_depth(1) == 2


def test_a_freed_block_remembers_the_latest_step_that_may_still_write_it():
    """A sequence that stops while later steps carrying it are in flight frees blocks those steps still write.
    A KV copy into such recycled blocks must wait for those steps (and, on a deep queue, only for them)."""
    s = scheduler(100, eos_token_ids=(99,))
    q = Sequence([next(PROMPT_TOKEN)] * 5, SamplingParams(temperature=0, max_tokens=100), 4)
    s.add(q)
    prefill = step(s)
    first, second = s.schedule(0), s.schedule(0)  # both carry q, both in flight
    assert (prefill.number, first.number, second.number) == (1, 2, 3)
    blocks, bm = list(q.block_table), s.block_managers[0]
    s.apply_results(first, s.check_results(first, [99]))  # q stops; the second step still writes its KV
    assert q.finish_reason == "stop" and not q.block_table
    assert bm.last_step_writing(blocks) == 3
    never_used = [b for b in range(100) if b not in blocks][:3]
    assert bm.last_step_writing(never_used) == 0


def test_a_prompt_completed_in_a_step_in_flight_decodes_in_the_next_step():
    """The step after the one that completes a prompt already decodes it, reading its first token (PENDING) from
    that step's output row, so a request's second token comes one step after its first, not two."""
    s = scheduler(100)
    a, b = make(5), make(5)
    s.add(a)
    s.add(b)
    prompts = s.schedule(0)  # both prompts complete here; not collected yet
    assert [q.status for q in (a, b)] == [SequenceStatus.DECODING] * 2 and not s.prefilling[0]
    decodes = s.schedule(0)
    assert [(q, end, row) for q, end, row in decodes.decodes] == [(a, 6, 0), (b, 6, 1)]
    s.apply_results(prompts, s.check_results(prompts, [11, 21]))
    s.apply_results(decodes, s.check_results(decodes, [12, 22]))
    assert a.completion_token_ids == [11, 12] and b.completion_token_ids == [21, 22]


def test_a_one_token_request_is_not_decoded_past_its_prompt_step():
    s = scheduler(100)
    q = make(5, max_tokens=1)
    s.add(q)
    prompt = s.schedule(0)
    assert not s.schedule(0)  # its pending token ends it: no step for a token after
    s.apply_results(prompt, s.check_results(prompt, [11]))
    assert q.finish_reason == "length" and q.completion_token_ids == [11] and s.is_finished()


def test_in_pd_a_completed_prompt_decodes_next_step_where_it_stays_and_its_copy_starts_at_once():
    """Adaptive PD: a prompt worker 1 started (under a backlog) decodes on worker 1 from its next step on, reading
    its first token PENDING. One placed on the other worker starts its KV copy at once, the copy waiting on the
    device for the step that computes the prompt; on its new worker it sits out until that token is known (it is
    in the old worker's output), and it is never decoded on the old one."""
    s = pd_scheduler()
    seqs = [make(30) for _ in range(7)]
    for q in seqs:
        s.add(q)
    on_0 = s.schedule(0)  # 64 tokens: two prompts done (placed on worker 1, to move), a chunk of the third
    assert on_0.sampled == seqs[:2] and [q.migration[0] for q in seqs[:2]] == [1, 1]
    on_1 = s.schedule(1)  # 146 tokens wait for worker 0: a backlog, so worker 1 starts prompts, while one remains
    assert on_1.sampled == seqs[3:5] and [q.worker for q in seqs[3:5]] == [1, 1]
    assert [q for q, _ in s.start_migrations()] == seqs[:2]  # tokens still PENDING
    assert s.copy_after(seqs[:2]) == on_0.number  # the copy waits for the prompts' step on the device
    assert [q for q, _, _ in s.schedule(0).decodes] == []  # in transit: not decoded on worker 0
    for q in seqs[:2]:
        s.finish_migration(q)  # the copies were done before worker 0's tokens were read
    next_on_1 = s.schedule(1)
    assert [(q, row) for q, _, row in next_on_1.decodes] == [(seqs[3], 0), (seqs[4], 1)]  # the moved ones wait
    s.apply_results(on_0, s.check_results(on_0, [5, 6]))
    assert [q.completion_token_ids for q in seqs[:2]] == [[5], [6]]
    assert [(q, row) for q, _, row in s.schedule(1).decodes if q in seqs[:2]] == [(seqs[0], -1), (seqs[1], -1)]


def test_a_sequence_that_ends_while_its_copy_is_in_flight_keeps_its_blocks_until_the_copy_is_done():
    s = pd_scheduler(eos_token_ids=(99,), pd_policy="static")  # every sequence moves
    a, b = (Sequence([next(PROMPT_TOKEN)] * 8, SamplingParams(temperature=0, max_tokens=100), 4) for _ in range(2))
    s.add(a)
    s.add(b)
    step_0 = s.schedule(0)
    assert [q for q, _ in s.start_migrations()] == [a, b]
    free = [bm.num_free_blocks for bm in s.block_managers]
    s.apply_results(step_0, s.check_results(step_0, [99, 5]))  # a's first token is EOS
    assert a.finish_reason == "stop" and a in s.migrating  # the copy still writes worker 1's blocks
    assert [bm.num_free_blocks for bm in s.block_managers] == free
    s.finish_migration(a)
    s.finish_migration(b)
    assert a not in s.migrating and s.block_managers[0].num_free_blocks == 100
    assert s.block_managers[1].num_free_blocks == 100 - b.num_blocks
    assert b.worker == 1 and b.completion_token_ids == [5]


def test_a_one_token_request_is_not_copied():
    s = pd_scheduler(pd_policy="static")
    q = make(8, max_tokens=1)
    s.add(q)
    prompt = s.schedule(0)
    assert s.start_migrations() == []  # its pending token ends it: a copy would be wasted
    s.apply_results(prompt, s.check_results(prompt, [5]))
    assert q.finish_reason == "length" and s.is_finished()
    assert [bm.num_free_blocks for bm in s.block_managers] == [100, 100]


def test_adaptive_pd_keeps_its_load_figures_exact_while_it_places_prompts():
    """Each placement weighs the workers' loads; after several prompts are placed in one step, the loads it keeps
    are what counting every sequence afresh gives."""
    s = pd_scheduler()
    s.block_managers[1].allocate_blocks(99)  # no room on worker 1: every prompt stays on worker 0
    seqs = [make(8) for _ in range(3)]
    for q in seqs:
        s.add(q)
    s.schedule(0)  # all three prompts complete in this step and are placed one after the other
    assert [q.worker for q in seqs] == [0, 0, 0] and not any(q.migration for q in seqs)
    kept = list(s.policy.loads())
    s.policy.changed()
    assert kept == s.policy.loads()


def test_adaptive_pd_sees_the_lull_after_a_batch_that_came_after_a_long_pause():
    """A second batch (another generate() call) after many steps without requests: the lull in which worker 0 takes
    decodes starts as soon after it as after the first, not many times the long pause later."""
    s = pd_scheduler()
    s.add(make(8))
    for _ in range(200):  # the first request's steps
        s.policy.rebalance()
    for _ in range(64):
        s.add(make(8))
    steps = 0
    s.policy.rebalance()  # the engine step in which they came
    while not s.policy.in_a_lull():
        s.policy.rebalance()
        steps += 1
    assert steps == LULL_MIN_STEPS + 1  # more than LULL_MIN_STEPS steps without a request (main: 160)
