"""Which sequences run where in each step: a plan per worker, under token, sequence and KV-block budgets.

A worker is one device's model runner and KV pool. Single-device mode has one worker; PD mode has two,
worker 0 (the prefill GPU) and worker 1 (the decode GPU). Every sequence moves through named states:

    WAITING -> PREFILLING (on worker 0) -> DECODING (on its worker) -> FINISHED
                                  \\-> MIGRATING (KV copied to the other worker) -> DECODING there

A policy (single, pd static, pd adaptive) decides the few things that differ between modes: which worker
decodes a sequence whose prompt is done, whether a prompt may be admitted now, and which running sequences
move to balance the workers. Steps run one ahead of the host (see Sequence), so a plan may reference tokens
that are still PENDING on the device.
"""
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable

from nanovllm.config import Config, admission_watermark, check_kv_pool
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.models.decoder import head_dim_of, kv_heads_of

DECODING, FINISHED = SequenceStatus.DECODING, SequenceStatus.FINISHED

MAX_FAILURES = 3  # a request that was in this many failed steps in a row fails with the error


@dataclass
class Batch:
    """One step's work on one worker. Output row i of the step is the next token of `sampled[i]`."""
    worker: int
    decodes: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, end, row): the KV of token end - 1,
    #                          whose id is PENDING in row `row` of the worker's previous step output (-1: known)
    # (seq, start, end): the step computes the KV of tokens [start, end)
    prefills: list[tuple[Sequence, int, int]] = field(default_factory=list)
    sampled: list[Sequence] = field(default_factory=list)  # decodes first, then the prompts this step completes
    epochs: dict[int, int] = field(default_factory=dict)  # seq_id -> epoch at launch: a reset since makes it stale
    resets: int = 0  # the scheduler's reset count at launch: unchanged at commit, no sequence can be stale
    number: int = 0  # its place among the worker's steps: 1, 2, ...

    def __bool__(self):
        return bool(self.decodes or self.prefills)

    @property
    def seqs(self) -> list[Sequence]:
        return [seq for seq, _, _ in self.decodes] + [seq for seq, _, _ in self.prefills]

    def sampling_prefills(self) -> list[int]:
        """Indices in `prefills` of the chunks that end their prompt, and so sample its next token."""
        completing = {seq.seq_id for seq in self.sampled[len(self.decodes):]}
        return [i for i, (seq, _, _) in enumerate(self.prefills) if seq.seq_id in completing]

    def is_current(self, seq: Sequence) -> bool:
        return self.epochs.get(seq.seq_id) == seq.epoch and not seq.is_finished


class Scheduler:

    def __init__(self, config: Config, block_managers: list[BlockManager],
                 check_stop: Callable[[Sequence, int], object] = lambda seq, token: None):
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunk_tokens = config.chunked_prefill_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(config.eos_token_ids)
        self.check_stop = check_stop  # stop-string check, supplied by the engine (needs the tokenizer)
        self.block_managers = block_managers
        self.block_size = config.kv_cache_block_size
        self.num_workers = len(block_managers)
        self.check_capacity()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[list[Sequence]] = [[] for _ in block_managers]  # per worker, in admission order
        self.decoding: list[list[Sequence]] = [[] for _ in block_managers]
        self.migrating: list[Sequence] = []
        self.num_batches = [0] * self.num_workers  # non-empty batches scheduled per worker: the latest one's number
        self.policy = make_policy(config, self)
        self.num_resets = 0  # sequences reset so far (preempted, rolled back, aborted)
        self.num_preemptions = 0
        self.num_migrations = 0
        self.num_backpressure_stalls = 0  # steps in which admission waited for room to decode
        self.num_added = 0  # requests ever added (a policy tells arrivals from it)

    def check_capacity(self):
        for i, bm in enumerate(self.block_managers):
            check_kv_pool(bm.num_blocks, self.config.max_model_len, self.config.kv_cache_block_size,
                          f"worker {i}'s " if self.num_workers > 1 else "")

    def watermark(self, worker: int) -> int:
        """Blocks kept free at admission so that running sequences can grow without preemption."""
        return admission_watermark(self.block_managers[worker].num_blocks)

    # ---- requests ----

    def add(self, seq: Sequence):
        self.waiting.append(seq)
        self.num_added += 1

    def is_finished(self) -> bool:
        return not self.waiting and not self.migrating and not any(self.prefilling) and not any(self.decoding)

    def num_admitted(self) -> int:
        """Sequences admitted and not finished: prefilling, decoding or moving, on any worker."""
        return sum(map(len, self.prefilling)) + sum(map(len, self.decoding)) + len(self.migrating)

    def abort(self, seq: Sequence):
        """Drop a request wherever it is. A MIGRATING sequence keeps its blocks until its copy is retired."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status != SequenceStatus.MIGRATING:
            self._leave(seq)
        self._finish(seq, "abort")

    # ---- planning ----

    def schedule(self, worker: int) -> Batch:
        """The next step's work for `worker`: its decodes, then prompt chunks within the token budget."""
        batch = Batch(worker, resets=self.num_resets)
        try:
            self._schedule_decodes(batch)
            self._schedule_prefills(batch)
            self._place_completed_prompts(batch)
        except BaseException:
            self.rollback([batch], error=None)
            raise
        if batch:
            self.num_batches[worker] += 1
            batch.number = self.block_managers[worker].latest_step = self.num_batches[worker]
        return batch

    def pipeline_depth(self, worker: int) -> int:
        """How many steps the engine keeps in flight on `worker` (the policy's call)."""
        return self.policy.pipeline_depth(worker)

    def prompt_backlog(self, limit: int) -> int:
        """Prompt tokens the prefill worker has yet to compute, counted until they pass `limit`."""
        total = 0
        for seq in chain(self.prefilling[self.policy.prefill_worker], self.waiting):
            total += seq.num_tokens - seq.num_computed_tokens
            if total > limit:
                break
        return total

    def prompts_wait_beyond_a_step(self) -> bool:
        """Without the head of the waiting queue, more prompt tokens are queued than the prefill worker computes
        in a step: it is the bottleneck, and prompts wait for it (TTFT) where two independent engines would have
        started them. (One long prompt alone does not count, however many steps it takes.)"""
        if not self.waiting:
            return False
        limit, head = self.max_num_batched_tokens, self.waiting[0].num_tokens - self.waiting[0].num_computed_tokens
        return self.prompt_backlog(limit + head) - head > limit

    def _schedule_decodes(self, batch: Batch):
        """One token for each sequence decoding here; when blocks run out, the newest sequences are preempted.
        (The hot loop of the host: it runs for every sequence at every step, so it is written flat.)"""
        if not self.chunk_tokens and batch.worker == self.policy.prefill_worker and self._prompt_ready(batch.worker):
            return  # chunking off: prompts go first, in steps of their own, and decodes wait (nano-vllm's policy)
        queue, bm, block_size = self.decoding[batch.worker], self.block_managers[batch.worker], self.block_size
        decodes, sampled, epochs = batch.decodes, batch.sampled, batch.epochs
        latest, this_batch = self.num_batches[batch.worker], self.num_batches[batch.worker] + 1
        i = 0
        while i < len(queue) and len(decodes) < self.max_num_seqs:
            seq = queue[i]
            i += 1
            waits_for_pending = seq.num_pending and (self._will_finish(seq) or seq.sampled_batch != latest)
            if seq.migration is not None or waits_for_pending:
                continue  # sits this step out: moving away, its last token is in flight, or its pending token is
                #           not in the worker's latest step (whose output the next step reads PENDING ids from)
            n = seq.num_tokens
            if n > len(seq.block_table) * block_size and not self._grow(queue, seq, bm):
                break  # it was the newest, and preempted itself
            decodes.append((seq, n, seq.sampled_row if seq.num_pending else -1))
            epochs[seq.seq_id] = seq.epoch
            seq.num_computed_tokens = n
            seq.append_pending()
        # Longest context first: the decode attention kernel starts its programs in batch order, and a long
        # sequence started last would run on alone at the end of every layer's kernel.
        decodes.sort(key=lambda decode: -decode[1])
        for row, (seq, _, _) in enumerate(decodes):
            seq.sampled_row, seq.sampled_batch = row, this_batch
            sampled.append(seq)

    def _grow(self, queue: list[Sequence], seq: Sequence, bm: BlockManager) -> bool:
        """A block for `seq`'s next token, preempting the newest sequences until one is free."""
        while bm.blocks_needed(seq) > bm.num_free_blocks:
            victim = queue[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        bm.grow(seq)
        return True

    def _prompt_ready(self, worker: int) -> bool:
        """A prompt chunk can run now: the rest of a prompt that a full step only started, or a new prompt."""
        started = self.prefilling[worker]
        return (any(seq.num_pending == 0 and seq.num_computed_tokens < seq.num_tokens for seq in started)
                or self._can_admit_now(worker))

    def _can_admit_now(self, worker: int) -> bool:
        if not self.waiting:
            return False
        seq = self.waiting[0]
        bm = self.block_managers[worker]
        return bm.num_free_blocks - seq.num_blocks >= self.watermark(worker) and self.policy.can_admit(seq)

    def _will_finish(self, seq: Sequence) -> bool:
        """Its PENDING token certainly ends it (length), so a step for the token after is wasted."""
        return seq.num_pending > 0 and (seq.num_completion_tokens >= seq.params.max_tokens
                                        or seq.num_tokens >= self.max_model_len)

    def _schedule_prefills(self, batch: Batch):
        w = batch.worker
        if not self.prefilling[w] and not self.policy.prefills_on(w):
            return
        if batch.decodes and not self.chunk_tokens:
            return  # chunking off: a prefill step runs alone (see _schedule_decodes)
        budget = min(self.chunk_tokens, self.max_num_batched_tokens) if batch.decodes else self.max_num_batched_tokens
        budget -= len(batch.decodes)
        num_seqs = len(batch.decodes)
        for seq in self.prefilling[w]:  # prompts already started: their next chunk
            if budget <= 0 or num_seqs >= self.max_num_seqs:
                return
            if seq.num_pending == 0 and seq.num_computed_tokens < seq.num_tokens:  # not its last chunk in flight
                budget -= self._add_chunk(batch, seq, budget)
                num_seqs += 1
        bm = self.block_managers[w]
        while self.waiting and budget > 0 and num_seqs < self.max_num_seqs and self.policy.prefills_on(w):
            seq = self.waiting[0]
            if bm.num_free_blocks - seq.num_blocks < self.watermark(w) or not self.policy.can_admit(seq):
                self.num_backpressure_stalls += 1
                return
            self.waiting.popleft()
            bm.allocate(seq)
            seq.worker, seq.status = w, SequenceStatus.PREFILLING
            self.prefilling[w].append(seq)
            self.policy.admitted(seq)
            budget -= self._add_chunk(batch, seq, budget)
            num_seqs += 1

    def _add_chunk(self, batch: Batch, seq: Sequence, budget: int) -> int:
        start = seq.num_computed_tokens
        end = min(seq.num_tokens, start + budget)
        batch.prefills.append((seq, start, end))
        self._launched(batch, seq, end)
        return end - start

    def _place_completed_prompts(self, batch: Batch):
        """The prompts this step completes decode from the next step on, where the policy places them: the next
        step reads each one's first token, still PENDING, from this step's output on the device, as it does
        for any decode. (Placed once their tokens came back, they sat the next step out, and every request's
        second token came two steps after its first.) A move to another worker still waits for the token."""
        for seq in batch.sampled[len(batch.decodes):]:
            self.prefilling[batch.worker].remove(seq)
            self._place(seq)

    def _launched(self, batch: Batch, seq: Sequence, end: int):
        """The step computes `seq`'s KV up to `end`; if that is all its tokens, it samples the next one."""
        batch.epochs[seq.seq_id] = seq.epoch
        seq.num_computed_tokens = end
        if end == seq.num_tokens:
            seq.sampled_row, seq.sampled_batch = len(batch.sampled), self.num_batches[batch.worker] + 1
            batch.sampled.append(seq)
            seq.append_pending()

    def preempt(self, seq: Sequence):
        """Free the sequence's KV and queue it first, to be recomputed: nothing is dropped."""
        self.num_preemptions += 1
        self._leave(seq)
        self._reset(seq)
        self.waiting.appendleft(seq)

    def _reset(self, seq: Sequence):
        seq.reset()
        self.num_resets += 1

    def _leave(self, seq: Sequence):
        """Take `seq` off its worker and free its blocks (and those reserved for it elsewhere)."""
        if seq.status == SequenceStatus.MIGRATING:
            self.migrating.remove(seq)  # only once its copy is done or abandoned: the copy reads and writes them
        else:
            queue = (self.prefilling if seq.status == SequenceStatus.PREFILLING else self.decoding)[seq.worker]
            queue.remove(seq)
        self.block_managers[seq.worker].deallocate(seq)
        if seq.migration is not None and seq.migration[1]:
            self.block_managers[seq.migration[0]].free_blocks(seq.migration[1])
        seq.migration = None
        self.policy.changed()

    # ---- results ----

    def check_results(self, batch: Batch, token_ids: list[int]) -> list[tuple]:
        """(seq, token, finish reason or None, stop-string state) for each current row of a finished step.
        Reads state and changes nothing, so it may raise (the stop-string check runs the tokenizer)."""
        maybe_stale = batch.resets != self.num_resets
        eos, max_model_len, results = self.eos_token_ids, self.max_model_len, []
        for seq, token_id in zip(batch.sampled, token_ids):
            if seq.status is FINISHED or (maybe_stale and not batch.is_current(seq)):
                continue
            params = seq.params
            num_known = seq.num_tokens - seq.num_pending + 1  # with this token
            stop = self.check_stop(seq, token_id) if params.stop else None
            if (token_id in eos and not params.ignore_eos) or (stop is not None and stop.cut is not None):
                reason = "stop"
            elif num_known - seq.num_prompt_tokens >= params.max_tokens or num_known >= max_model_len:
                reason = "length"
            else:
                reason = None
            results.append((seq, token_id, reason, stop))
        return results

    def apply_results(self, batch: Batch, results: list[tuple]):
        """Commit a finished step: its KV is written and its tokens are known. Never raises."""
        self._cache_written_blocks(batch)
        for seq, token_id, reason, stop in results:
            seq.token_ids[seq.num_tokens - seq.num_pending] = token_id
            seq.num_pending -= 1
            seq.num_failures = 0
            if reason is None and stop is None and seq.status is DECODING:
                continue
            if stop is not None:
                seq.detokenizer = stop
            if reason is not None:
                if stop is not None and stop.cut is not None:
                    seq.text = stop.text[:stop.cut]
                if seq.status != SequenceStatus.MIGRATING:  # in transit: its blocks go when the copy is retired
                    self._leave(seq)
                self._finish(seq, reason)
        self.policy.note_step(batch)

    def _cache_written_blocks(self, batch: Batch):
        """Name the blocks the step filled with KV, for the prefix cache."""
        bm = self.block_managers[batch.worker]
        if not bm.enable_prefix_caching:
            return
        maybe_stale, block_size = batch.resets != self.num_resets, self.block_size
        written = [(seq, end) for seq, end, _ in batch.decodes] + [(seq, end) for seq, _, end in batch.prefills]
        for seq, end in written:
            if end >= (seq.num_hashed_blocks + 1) * block_size and seq.status is not FINISHED \
                    and seq.worker == batch.worker and (not maybe_stale or batch.is_current(seq)):
                bm.cache_blocks(seq, end)

    def _place(self, seq: Sequence):
        """A prompt's last chunk is in the step being planned: decode where the policy says, here or (after a KV
        copy) on another worker."""
        seq.status = SequenceStatus.DECODING
        destination = self.policy.place(seq)  # before it counts anywhere: the policy adds it where it goes
        self.decoding[seq.worker].append(seq)
        if destination != seq.worker and seq.migration is None:
            self.move(seq, destination)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None):
        seq.drop_pending()
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, reason, error

    # ---- migrations between workers ----

    def move(self, seq: Sequence, destination: int):
        """Mark a DECODING sequence to move; its copy starts once its last token is known (start_migrations)."""
        seq.migration = (destination, [])
        self.policy.changed()

    def start_migrations(self) -> list[tuple[Sequence, list[tuple[int, int]]]]:
        """Sequences whose KV copy can start now, with their (source block, destination block) pairs. A copy
        may start while the sequence's last token is PENDING: the step computing it is launched, and the copy
        waits for that step on the device (`copy_after`). Not one whose pending token certainly ends it."""
        self.policy.rebalance()
        started = []
        for queue in self.decoding:
            for seq in [s for s in queue if s.migration is not None and not self._will_finish(s)]:
                destination, blocks = seq.migration
                bm = self.block_managers[destination]
                missing = seq.num_blocks - len(blocks)  # all of it, or growth since blocks were reserved at admission
                if missing > 0 and bm.num_free_blocks - missing < (0 if blocks else self.watermark(destination)):
                    if not blocks:
                        seq.migration = None  # no room there after all: stay
                        self.policy.changed()
                    continue
                blocks += bm.allocate_blocks(max(0, missing))
                queue.remove(seq)
                seq.status = SequenceStatus.MIGRATING
                self.migrating.append(seq)
                self.num_migrations += 1
                started.append((seq, list(zip(seq.block_table, blocks))))
        return started

    @staticmethod
    def copy_after(seqs: list[Sequence]) -> int:
        """The source worker's step a copy of these sequences' KV waits for: the latest that computes a token of
        theirs still PENDING (it writes their KV), or 0: all their tokens are known, so their KV is written."""
        return max((seq.sampled_batch for seq in seqs if seq.num_pending), default=0)

    def finish_migration(self, seq: Sequence):
        """Its KV is on the destination: free the source blocks and decode there (or drop it if aborted)."""
        self.migrating.remove(seq)
        self.block_managers[seq.worker].deallocate(seq)
        destination, blocks = seq.migration
        seq.migration = None
        if seq.is_finished:  # aborted in transit
            self.block_managers[destination].free_blocks(blocks)
            return
        seq.worker, seq.block_table, seq.num_hashed_blocks = destination, blocks, 0
        seq.sampled_batch = -1  # a PENDING token here is in the old worker's output: known first, then decoded
        seq.status = SequenceStatus.DECODING
        self.decoding[destination].append(seq)
        self.policy.changed()

    # ---- failures ----

    def rollback(self, batches: list[Batch], error: BaseException | None,
                 migrations: list[Sequence] = ()) -> list[Sequence]:
        """Steps (and copies) that failed or were interrupted: send their sequences back to be recomputed.

        The caller has waited for the devices, so no copy still touches the blocks freed here. Each sequence is
        WAITING again with its known tokens; KV its steps were writing was never named in the prefix cache. A
        request in MAX_FAILURES failed steps in a row fails with the error instead (Ctrl-C does not count).
        Returns the requests that failed for good.
        """
        victims = {seq.seq_id: seq for seq in migrations}
        for batch in batches:
            victims.update((seq.seq_id, seq) for seq in batch.seqs if batch.is_current(seq))
        failed = []
        for seq in sorted(victims.values(), key=lambda s: s.seq_id, reverse=True):
            if seq.status == SequenceStatus.WAITING:
                continue
            if seq.is_finished:  # aborted in transit: only its blocks are left
                self.finish_migration(seq)
                continue
            self._leave(seq)
            self._reset(seq)
            if isinstance(error, Exception):
                seq.num_failures += 1
            if seq.num_failures >= MAX_FAILURES:
                self._finish(seq, "error", f"{type(error).__name__}: {error}")
                failed.append(seq)
            else:
                self.waiting.appendleft(seq)
        return failed


# ---- policies ----

class SingleDevice:
    """One worker prefills and decodes everything."""
    prefill_worker = 0

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def can_admit(self, seq: Sequence) -> bool:
        return True

    def prefills_on(self, worker: int) -> bool:
        """Whether `worker` may start a waiting prompt now. The prefill worker does; in PD the other also starts the
        next one while worker 0 is the bottleneck (`Scheduler.prompts_wait_beyond_a_step`), and decodes it where it
        was prefilled, no copy. (One device: only worker 0 is ever asked.)"""
        return worker == self.prefill_worker or self.scheduler.prompts_wait_beyond_a_step()

    def admitted(self, seq: Sequence):
        pass

    def place(self, seq: Sequence) -> int:
        """The worker on which a sequence decodes, decided when its prompt's last chunk is planned."""
        return seq.worker

    def note_step(self, batch: Batch):
        pass

    def changed(self):
        pass

    def rebalance(self):
        pass

    def pipeline_depth(self, worker: int) -> int:
        """Two steps in flight, the host preparing one while the device runs the other. A decode worker gets
        DEEP_QUEUE while worker 0 computes prompts without a backlog: one host thread launches both GPUs, and a
        prompt step holds it ~30 ms, longer than two decode steps last, so a shallow queue runs dry. With more
        prompt tokens waiting than one step takes, worker 0 is the bottleneck and the host's time is its: prompt
        steps are host-bound, and each decode step launched in between delays them (BENCHMARKS.md, session 22).
        Only while that worker has no prompt chunk of its own: its decode steps are one graph launch each, but a
        step with a chunk was hundreds of eager launches (session 28; since session 29 chunks up to 16,384 tokens
        replay prompt-step graphs, so the rule may cost more than it saves: not yet measured), and a GPU queues
        only ~700-1,200 launches (H200, session 28's probe); beyond that the host blocks inside a launch until the
        GPU drains, and the other GPU starves."""
        s = self.scheduler
        if worker == self.prefill_worker or not (s.waiting or s.prefilling[self.prefill_worker]):
            return 2
        if s.prefilling[worker] or self.prefills_on(worker):
            return 2
        return DEEP_QUEUE if s.prompt_backlog(s.max_num_batched_tokens) <= s.max_num_batched_tokens else 2


DEEP_QUEUE = 6  # decode steps of ~5 ms: ~30 ms of work queued on the decode GPU


class StaticPD(SingleDevice):
    """Worker 0 prefills, worker 1 decodes everything (M1). A prompt is admitted only when worker 1 can hold
    it: its decode blocks are reserved at admission (back-pressure), and the sequence moves there.

    Worker 1 also starts a waiting prompt while more prompt tokens wait than worker 0 computes in a step (the
    same rule as adaptive's): the prompts would otherwise queue behind one GPU where two independent engines split
    them (TTFT). It prefills it in chunks of `chunked_prefill_tokens` beside its decodes, which bounds what
    they wait, and decodes it in place, no copy."""

    def can_admit(self, seq: Sequence) -> bool:
        s = self.scheduler  # (decoding on worker 0: prompts done there whose copies have not started yet)
        return (s.num_admitted() < s.max_num_seqs
                and s.block_managers[1].num_free_blocks - seq.num_blocks >= s.watermark(1))

    def admitted(self, seq: Sequence):
        if seq.worker != 1:
            seq.migration = (1, self.scheduler.block_managers[1].allocate_blocks(seq.num_blocks))

    def place(self, seq: Sequence) -> int:
        return 1  # its blocks there were reserved at admission, or it was prefilled there


class AdaptivePD(SingleDevice):
    """Both workers decode; worker 0 also prefills, with priority. A finished prompt decodes where the
    projected step time is lower, and running sequences move between the workers to keep them balanced.

    A worker's load is the KV it reads per decode step, in tokens (the sum of its sequences' lengths), plus,
    on worker 0, its recent prefill work in the same units: a prompt token costs about as much time as reading
    `prefill_token_cost` tokens of KV (for a matmul:bandwidth ratio near an H100's). Worker 1 takes every
    sequence while its load stays below worker 0's, so with light traffic this is pure PD and no prefill ever
    pauses a decode; past that, worker 0's spare time and memory decode the rest.

    While worker 0 has prompts to compute, every finished prompt that fits on worker 1 decodes there, and nothing
    moves onto worker 0: its decodes would wait on its prompt chunks, and sequences moved there would move back once
    the prompts' load shows (BENCHMARKS.md, session 21: better latency tails online at 32-48 req/s, mixed at 16,
    about 1.5% slower offline). The same holds between prompts while requests keep arriving: worker 0 takes decodes
    only in a lull, no request for many times the usual gap between requests (the end of an offline batch, where
    dp's engines each end with a few long sequences), or when worker 1 has no room. Session 30 measured adaptive
    PD, which moved decodes onto worker 0 whenever it had no prompt, online on the Qwen3-8B shape: 3-7x static's
    moves (1,364 for 200 requests at 6 req/s) and worse TTFT and inter-token p99s than static at every rate.
    """

    def __init__(self, scheduler: Scheduler):
        super().__init__(scheduler)
        params, kv_bytes_per_token = model_sizes(scheduler.config.hf_config, itemsize=2)  # costed as bf16 on a GPU
        self.prefill_token_cost = 2 * params / MATMUL_PER_BYTE / kv_bytes_per_token
        self.prefill_rate = 0.0  # prompt tokens worker 0 computes per engine step, moving average
        self._prefill_tokens = 0  # since the last engine step
        self._loads: list[float] | None = None
        self.steps = 0  # engine steps so far (rebalance runs once in each)
        self.last_arrival = 0  # the engine step in which the latest request came
        self.arrival_gap = 0.0  # engine steps between requests, moving average (a batch at once: 0)
        self._num_added = 0

    def can_admit(self, seq: Sequence) -> bool:
        s = self.scheduler
        return s.num_admitted() < s.max_num_seqs * s.num_workers

    def note_step(self, batch: Batch):
        if batch.worker == self.prefill_worker:
            self._prefill_tokens += sum(end - start for _, start, end in batch.prefills)
        self._loads = None

    def changed(self):
        self._loads = None

    def loads(self) -> list[float]:
        if self._loads is None:
            s = self.scheduler
            loads = [0.0] * s.num_workers
            for w, queue in enumerate(s.decoding):
                for seq in queue:
                    loads[seq.migration[0] if seq.migration else w] += seq.num_tokens
            for seq in s.migrating:
                loads[seq.migration[0]] += seq.num_tokens
            loads[self.prefill_worker] += self.prefill_rate * self.prefill_token_cost
            self._loads = loads
        return self._loads

    def has_room(self, worker: int, seq: Sequence) -> bool:
        s = self.scheduler
        return (s.block_managers[worker].num_free_blocks - seq.num_blocks >= s.watermark(worker)
                and len(s.decoding[worker]) < s.max_num_seqs)

    def has_prompt_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.prefilling[self.prefill_worker])

    def _count_engine_step(self):
        """The moving averages the policy weighs by: worker 0's prompt tokens per step, steps between requests."""
        self.prefill_rate = 0.9 * self.prefill_rate + 0.1 * self._prefill_tokens  # decays while worker 0 idles
        self._prefill_tokens = 0
        self._loads = None
        self.steps += 1
        arrived = self.scheduler.num_added - self._num_added  # requests since the last engine step
        if arrived:
            # A gap per request: the steps since the last arrival, then a gap of 0 for each other request of this
            # step, so that a batch after a long pause (a second generate() call) reads as requests coming fast.
            gap = self.steps - self.last_arrival - 1
            self.arrival_gap = (0.9 * self.arrival_gap + 0.1 * gap) * 0.9 ** (arrived - 1)
            self._num_added, self.last_arrival = self.scheduler.num_added, self.steps

    def in_a_lull(self) -> bool:
        """No request came for LULL_GAPS times the usual gap (and LULL_MIN_STEPS): no prompt is due soon."""
        return self.steps - self.last_arrival > max(LULL_MIN_STEPS, LULL_GAPS * self.arrival_gap)

    def keeps_worker_0_for_prompts(self) -> bool:
        """Worker 0's decodes would wait on prompt chunks, now or soon: it takes none while another worker has room."""
        return self.has_prompt_work() or not self.in_a_lull()

    def place(self, seq: Sequence) -> int:
        loads = self.loads()  # without `seq`, which is in no worker's queue yet
        target = min(range(len(loads)), key=lambda w: (loads[w], -w))
        if self.keeps_worker_0_for_prompts():  # elsewhere if there is room
            target = next((w for w in range(len(loads)) if w != self.prefill_worker and self.has_room(w, seq)), target)
        if target != seq.worker and not self.has_room(target, seq):
            target = seq.worker
        loads[target] += seq.num_tokens
        return target

    def rebalance(self):
        """Once per engine step: move sequences off the busier worker while that narrows the gap (a few)."""
        self._count_engine_step()
        s = self.scheduler
        for _ in range(MAX_MOVES_PER_STEP):
            loads = self.loads()
            busy, idle = sorted(range(len(loads)), key=loads.__getitem__, reverse=True)[:2]
            if idle == self.prefill_worker and self.keeps_worker_0_for_prompts():
                return  # no moves onto the prefill worker while prompts are there or due: they would come back
            gap = loads[busy] - loads[idle]
            if gap < REBALANCE_GAP * sum(loads):
                return
            movable = [seq for seq in s.decoding[busy] if seq.migration is None and seq.num_tokens <= gap / 2
                       and self.has_room(idle, seq)]
            if not movable:
                return
            seq = max(movable, key=lambda q: q.params.max_tokens - q.num_completion_tokens)  # most work left
            s.move(seq, idle)
            loads[busy] -= seq.num_tokens
            loads[idle] += seq.num_tokens
            self._loads = loads


MATMUL_PER_BYTE = 250  # flop/s over bytes/s: H100 ~295, H200 ~206


def model_sizes(hf, itemsize: int) -> tuple[int, int]:
    """(matmul parameters of the layers, KV bytes per token): what the cost models weigh work by."""
    kv_heads = kv_heads_of(hf)
    head_dim = head_dim_of(hf)
    params = hf.num_hidden_layers * (hf.hidden_size * (hf.num_attention_heads + kv_heads) * head_dim * 2
                                     + 3 * hf.hidden_size * hf.intermediate_size)
    return params, 2 * hf.num_hidden_layers * kv_heads * head_dim * itemsize


MAX_MOVES_PER_STEP = 4
LULL_GAPS = 8  # a Poisson stream goes this many mean gaps without a request with probability e^-8, 0.03%
LULL_MIN_STEPS = 8  # engine steps: at the end of an offline batch worker 0 starts decoding this late
REBALANCE_GAP = 0.1  # a gap under this share of the total load is left alone: moves cost a copy and a step


def make_policy(config: Config, scheduler: Scheduler) -> SingleDevice:
    if not config.enable_two_gpu_pd:
        return SingleDevice(scheduler)
    return {"static": StaticPD, "adaptive": AdaptivePD}[config.pd_policy](scheduler)
