from collections import deque
from typing import Callable

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides which sequences run in each step, under token, sequence and KV-block budgets.

    Single-device mode (nano-vllm's policy): a step is either a prefill batch of waiting sequences or a
    decode batch of running ones; when blocks run out, the newest running sequence is preempted and
    recomputed later.

    PD mode: the prefill device and the decode device each have their own BlockManager. A sequence is
    admitted only when the decode side can hold it (back-pressure); it is prefilled with prefill-side
    blocks, its KV is copied into decode-side blocks reserved at admission, and once the copy is done
    its prefill-side blocks are released and it decodes on the decode device.
    """

    def __init__(self, config: Config, num_blocks: int, num_prefill_blocks: int = 0,
                 is_stopped: Callable[[Sequence], bool] = lambda seq: False):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos = config.eos
        self.is_stopped = is_stopped  # stop-string check, supplied by the engine (needs the tokenizer)
        self.pd = config.enable_two_gpu_pd
        block_size = config.kv_cache_block_size
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=not self.pd)
        self.prefill_block_manager = BlockManager(num_prefill_blocks, block_size) if self.pd else self.block_manager
        max_seq_blocks = (config.max_model_len + block_size - 1) // block_size
        # PD: keep this many decode blocks free at admission, so that running sequences can grow.
        self.watermark = max(1, num_blocks // 100) if self.pd else 0
        for name, bm in (("decode", self.block_manager), ("prefill", self.prefill_block_manager)):
            if bm.num_blocks < max_seq_blocks + self.watermark:
                raise ValueError(
                    f"{'the ' + name + ' side ' if self.pd else ''}KV cache has {bm.num_blocks} blocks of "
                    f"{block_size} tokens, too few for one sequence of max_model_len={config.max_model_len} "
                    f"(needs {max_seq_blocks + self.watermark}); lower max_model_len or give more blocks")
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # decoding (PD: on the decode device)
        self.num_in_prefill = 0  # PD: admitted, not yet decoding (being prefilled or in transit)
        self.prefilled: list[Sequence] = []  # PD: prefill done, KV still on the prefill device
        self.num_preemptions = 0
        self.num_backpressure_stalls = 0  # PD: steps in which admission waited for decode-side blocks

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running and not self.num_in_prefill

    # ---- single-device mode ----

    def schedule(self) -> tuple[list[Sequence], bool]:
        scheduled = self.schedule_prefill()
        if scheduled:
            return scheduled, True
        return self.schedule_decode(), False

    # ---- both modes ----

    def schedule_prefill(self) -> list[Sequence]:
        scheduled = []
        num_batched_tokens = 0
        while self.waiting and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if num_batched_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.prefill_block_manager.can_allocate(seq):
                break
            if self.pd and not self._decode_side_has_room(seq, len(scheduled)):
                self.num_backpressure_stalls += 1
                break
            self.prefill_block_manager.allocate(seq)
            if self.pd:
                seq.decode_block_table = self.block_manager.allocate_blocks(seq.num_blocks)
                self.num_in_prefill += 1
            num_batched_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            if not self.pd:
                self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _decode_side_has_room(self, seq: Sequence, num_scheduled: int) -> bool:
        num_seqs = len(self.running) + self.num_in_prefill + num_scheduled
        free = self.block_manager.num_free_blocks
        return num_seqs < self.max_num_seqs and free - seq.num_blocks >= self.watermark

    def schedule_decode(self) -> list[Sequence]:
        scheduled = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def preempt(self, seq: Sequence):
        """Free the sequence's KV and queue it first, to be recomputed: nothing is dropped."""
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sampled token; finish and free the sequences that are done."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            seq.append_token(token_id)
            if self._check_finished(seq):
                finished.append(seq)
                self._free(seq)
            elif self.pd and seq.decode_block_table:
                self.prefilled.append(seq)
        return finished

    def _check_finished(self, seq: Sequence) -> bool:
        params = seq.params
        if not params.ignore_eos and seq.last_token == self.eos:
            seq.finish_reason = "stop"
        elif params.stop and self.is_stopped(seq):
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        else:
            return False
        seq.status = SequenceStatus.FINISHED
        return True

    def _free(self, seq: Sequence):
        if self.pd and seq.decode_block_table:  # PD: finished by its prefill, so nothing to transfer
            self.prefill_block_manager.deallocate(seq)
            self.block_manager.free_blocks(seq.decode_block_table)
            seq.decode_block_table = []
            self.num_in_prefill -= 1
        else:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)

    # ---- PD mode: hand-over from the prefill device to the decode device ----

    def get_prefilled_sequences(self) -> list[Sequence]:
        """Sequences whose prefill finished since the last call and that go on decoding: their KV is to be
        copied to the decode device (see transfer_pairs), then finish_transfer hands them over."""
        seqs, self.prefilled = self.prefilled, []
        return seqs

    def transfer_pairs(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """(prefill block, decode block) pairs to copy for prefilled sequences that go on decoding."""
        return [pair for seq in seqs for pair in zip(seq.block_table, seq.decode_block_table)]

    def finish_transfer(self, seqs: list[Sequence]):
        """The KV of `seqs` is on the decode device: release prefill-side blocks and start decoding."""
        for seq in seqs:
            self.prefill_block_manager.deallocate(seq)
            seq.block_table, seq.decode_block_table = seq.decode_block_table, []
            self.num_in_prefill -= 1
            self.running.append(seq)
