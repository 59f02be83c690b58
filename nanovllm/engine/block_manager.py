from collections import deque

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1  # set once the block's KV is written and full; a freed block keeps it for reuse
        self.last_step = 0  # once freed: the latest step scheduled while it was in use, which may still write it


class BlockManager:
    """Paged KV blocks of one worker: ref counts and, optionally, prefix caching.

    A full block is named by a hash chained over all tokens up to its end, so two sequences that share a
    prompt prefix share its blocks. A block is named only once a finished step has written its KV
    (`cache_blocks`), so a lookup never finds KV that a failed or interrupted step left unwritten. Freed
    blocks keep their name until reused (LRU order), so a later request with the same prefix still finds them.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()
        self.num_cache_hits = 0  # blocks reused from the prefix cache, for tests and stats
        self.peak_used_blocks = 0
        self.latest_step = 0  # the number of the worker's latest scheduled step (the scheduler keeps it)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @staticmethod
    def compute_hash(token_ids: list[int], prefix: int = -1) -> int:
        h = xxhash.xxh64()
        if prefix != -1:
            h.update(prefix.to_bytes(8, "little"))
        h.update(np.array(token_ids, dtype=np.int64).tobytes())
        return h.intdigest()

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1:  # its old content is overwritten from now on: forget its name
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = -1
        block.ref_count = 1
        self.free_block_ids.remove(block_id)
        self.used_block_ids.add(block_id)
        self.peak_used_blocks = max(self.peak_used_blocks, len(self.used_block_ids))
        return block_id

    def _take_free(self) -> int:
        return self._take(self.free_block_ids[0])

    def _cached_block(self, h: int) -> int:
        block_id = self.hash_to_block_id.get(h, -1)
        return block_id if block_id != -1 and self.blocks[block_id].hash == h else -1

    def allocate(self, seq: Sequence):
        """Give `seq` blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table
        h = -1
        for i in range(seq.num_blocks - 1):  # the last block holds the last token, always recomputed for its logits
            if not self.enable_prefix_caching:
                break
            h = self.compute_hash(seq.block(i), h)
            block_id = self._cached_block(h)
            if block_id == -1:
                break
            if block_id in self.used_block_ids:
                self.blocks[block_id].ref_count += 1
            else:
                self._take(block_id)
                self.blocks[block_id].hash = h  # _take forgot it; it is still valid
                self.hash_to_block_id[h] = block_id
            seq.block_table.append(block_id)
            self.num_cache_hits += 1
        seq.num_cached_tokens = seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_hashed_blocks = len(seq.block_table)
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free())

    def cache_blocks(self, seq: Sequence, num_written: int):
        """The KV of `seq`'s first `num_written` tokens is written: name its full blocks for reuse."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_written // self.block_size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, num_full):
            prefix = self.blocks[seq.block_table[i - 1]].hash if i else -1
            h = self.compute_hash(seq.block(i), prefix)
            block = self.blocks[seq.block_table[i]]
            block.hash = h
            self.hash_to_block_id[h] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def allocate_blocks(self, n: int) -> list[int]:
        """Plain blocks, named by nobody (the destination of a KV copy)."""
        assert n <= self.num_free_blocks
        return [self._take_free() for _ in range(n)]

    def free_blocks(self, block_ids: list[int]):
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.last_step = self.latest_step
                self.used_block_ids.remove(block_id)
                self.free_block_ids.append(block_id)

    def last_step_writing(self, block_ids: list[int]) -> int:
        """The latest step that may still write these blocks: steps in flight up to it were scheduled while one
        of them belonged to a sequence that has since left (finished, preempted), and write its KV there."""
        return max((self.blocks[block_id].last_step for block_id in block_ids), default=0)

    def deallocate(self, seq: Sequence):
        self.free_blocks(seq.block_table)
        seq.block_table = []

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks `seq` lacks for all its tokens (a decode step writes the KV of its last one)."""
        return seq.num_blocks - len(seq.block_table)

    def grow(self, seq: Sequence):
        seq.block_table.extend(self._take_free() for _ in range(self.blocks_needed(seq)))
