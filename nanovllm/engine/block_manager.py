from collections import deque

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1  # set once the block is full; a freed block keeps it so its KV can be reused
        self.token_ids: list[int] = []

    def update(self, hash: int, token_ids: list[int]):
        self.hash = hash
        self.token_ids = token_ids

    def reset(self):
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


class BlockManager:
    """Paged KV blocks of one device: ref counts and, optionally, prefix caching.

    A full block is named by a hash chained over all tokens up to its end, so two sequences that share
    a prompt prefix share its blocks. Freed blocks keep their hash until reused (LRU order), so a
    later request with the same prefix still finds them.
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

    def _allocate_block(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.reset()
        self.free_block_ids.remove(block_id)
        self.used_block_ids.add(block_id)
        self.peak_used_blocks = max(self.peak_used_blocks, len(self.used_block_ids))
        return block

    def _deallocate_block(self, block_id: int):
        assert self.blocks[block_id].ref_count == 0
        self.used_block_ids.remove(block_id)
        self.free_block_ids.append(block_id)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks

    def allocate(self, seq: Sequence):
        """Give `seq` blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table
        h = -1
        cache_miss = not self.enable_prefix_caching
        for i in range(seq.num_blocks):
            token_ids = seq.block(i)
            full = len(token_ids) == self.block_size
            h = self.compute_hash(token_ids, h) if full and self.enable_prefix_caching else -1
            block_id = self.hash_to_block_id.get(h, -1)
            # The last token is always recomputed: its logits give the next token.
            last = i == seq.num_blocks - 1
            if block_id == -1 or last or self.blocks[block_id].token_ids != token_ids:
                cache_miss = True
            if cache_miss:
                block = self._allocate_block(self.free_block_ids[0])
            else:
                seq.num_cached_tokens += self.block_size
                self.num_cache_hits += 1
                block = self.blocks[block_id]
                if block_id in self.used_block_ids:
                    block.ref_count += 1
                else:
                    self._allocate_block(block_id)
            if h != -1:
                block.update(h, token_ids)
                self.hash_to_block_id[h] = block.block_id
            seq.block_table.append(block.block_id)

    def allocate_blocks(self, n: int) -> list[int]:
        """Plain blocks without prefix caching (PD mode: reserve decode-side blocks)."""
        assert n <= self.num_free_blocks
        return [self._allocate_block(self.free_block_ids[0]).block_id for _ in range(n)]

    def free_blocks(self, block_ids: list[int]):
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._deallocate_block(block_id)

    def deallocate(self, seq: Sequence):
        self.free_blocks(seq.block_table)
        seq.num_cached_tokens = 0
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Before a decode step: the newest token needs a fresh block when it starts one."""
        return self.num_free_blocks >= (len(seq) % self.block_size == 1)

    def may_append(self, seq: Sequence):
        block_table = seq.block_table
        last_block = self.blocks[block_table[-1]]
        if len(seq) % self.block_size == 1:
            block_table.append(self._allocate_block(self.free_block_ids[0]).block_id)
        elif len(seq) % self.block_size == 0 and self.enable_prefix_caching:
            # The newest token fills the last block: name it so that later requests can reuse it.
            prefix = self.blocks[block_table[-2]].hash if len(block_table) > 1 else -1
            if prefix != -1 or len(block_table) == 1:
                token_ids = seq.block(seq.num_blocks - 1)
                h = self.compute_hash(token_ids, prefix)
                last_block.update(h, token_ids)
                self.hash_to_block_id[h] = last_block.block_id
