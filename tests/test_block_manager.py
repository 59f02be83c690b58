"""Invariants of the paged KV block manager: ref counts, hashes, prefix reuse, freeing.

A block is named in the prefix cache only once a step has written its KV (cache_blocks), never at allocation:
a step that fails must not leave unwritten KV for a later request to find.
"""
from nanovllm import SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence

BS = 4


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(), BS)


def written(bm, s):
    """Allocate `s` and pretend a step wrote the KV of all its tokens."""
    bm.allocate(s)
    bm.cache_blocks(s, s.num_tokens)
    return s


def test_allocate_and_free_return_every_block():
    bm = BlockManager(10, BS)
    a = seq(range(10))  # 3 blocks, the last partial
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    assert [bm.blocks[b].ref_count for b in a.block_table] == [1, 1, 1]
    bm.deallocate(a)
    assert bm.num_free_blocks == 10 and a.block_table == []


def test_blocks_are_named_only_once_written():
    bm = BlockManager(10, BS)
    a = seq(range(10))
    bm.allocate(a)
    assert all(bm.blocks[b].hash == -1 for b in a.block_table)  # allocated, KV not written yet
    b = seq(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0  # so nothing can be reused
    bm.cache_blocks(a, 6)  # a step wrote the first 6 tokens: only block 0 is full and written
    assert bm.blocks[a.block_table[0]].hash != -1 and bm.blocks[a.block_table[1]].hash == -1


def test_full_blocks_get_chained_hashes():
    bm = BlockManager(10, BS)
    a = written(bm, seq(range(10)))
    first, second, last = (bm.blocks[b] for b in a.block_table)
    assert first.hash == BlockManager.compute_hash([0, 1, 2, 3])
    assert second.hash == BlockManager.compute_hash([4, 5, 6, 7], first.hash)  # chained: depends on the prefix
    assert last.hash == -1  # partial blocks are not named


def test_shared_prefix_is_reused_and_ref_counted():
    bm = BlockManager(10, BS)
    a = written(bm, seq(range(10)))
    b = seq(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.deallocate(b)
    assert bm.num_free_blocks == 10


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(10, BS)
    a = written(bm, seq(range(9)))
    cached = a.block_table[:2]
    bm.deallocate(a)
    again = seq(list(range(8)) + [50])
    bm.allocate(again)
    assert again.block_table[:2] == cached and again.num_cached_tokens == 8


def test_a_reused_block_loses_its_old_name():
    bm = BlockManager(3, BS)
    a = written(bm, seq(range(5)))  # block 0 named [0..3]
    bm.deallocate(a)
    b = written(bm, seq([7] * 12))  # takes all three blocks, block 0's old content is overwritten
    bm.deallocate(b)
    c = seq(range(5))
    bm.allocate(c)
    assert c.num_cached_tokens == 0  # the name [0..3] must not lead to b's KV


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(10, BS)
    a = written(bm, seq(range(8)))  # exactly two full blocks
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_different_prefix_does_not_match():
    bm = BlockManager(10, BS)
    written(bm, seq([1, 2, 3, 4, 5]))
    other = seq([1, 2, 3, 9, 5])
    bm.allocate(other)
    assert other.num_cached_tokens == 0


def test_decode_grows_a_block_at_the_boundary_and_names_full_blocks():
    bm = BlockManager(10, BS)
    a = written(bm, seq(range(4)))
    a.append_pending()  # 5 tokens: the sampled token starts block 1
    assert bm.blocks_needed(a) == 1
    bm.grow(a)
    assert len(a.block_table) == 2
    a.resolve(4)
    for t in (5, 6, 7):
        a.append_token(t)
    bm.cache_blocks(a, 8)
    assert bm.blocks[a.block_table[1]].hash == BlockManager.compute_hash([4, 5, 6, 7], bm.blocks[a.block_table[0]].hash)


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a, b = written(bm, seq(range(9))), seq(range(9))
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table) and b.num_cached_tokens == 0
    assert bm.allocate_blocks(2) and bm.num_free_blocks == 2
