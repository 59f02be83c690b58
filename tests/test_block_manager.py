"""Invariants of the paged KV block manager: ref counts, hashes, prefix reuse, freeing."""
from nanovllm import SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence

BS = 4


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(), BS)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(10, BS)
    a = seq(range(10))  # 3 blocks, the last partial
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    assert [bm.blocks[b].ref_count for b in a.block_table] == [1, 1, 1]
    bm.deallocate(a)
    assert bm.num_free_blocks == 10 and a.block_table == []


def test_full_blocks_get_chained_hashes():
    bm = BlockManager(10, BS)
    a = seq(range(10))
    bm.allocate(a)
    first, second, last = (bm.blocks[b] for b in a.block_table)
    assert first.hash == BlockManager.compute_hash([0, 1, 2, 3])
    assert second.hash == BlockManager.compute_hash([4, 5, 6, 7], first.hash)  # chained: depends on the prefix
    assert last.hash == -1  # partial blocks are not named


def test_shared_prefix_is_reused_and_ref_counted():
    bm = BlockManager(10, BS)
    a, b = seq(range(10)), seq(list(range(8)) + [99, 98, 97])
    bm.allocate(a)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.deallocate(b)
    assert bm.num_free_blocks == 10


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(10, BS)
    a = seq(range(9))
    bm.allocate(a)
    cached = a.block_table[:2]
    bm.deallocate(a)
    again = seq(list(range(8)) + [50])
    bm.allocate(again)
    assert again.block_table[:2] == cached and again.num_cached_tokens == 8


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(10, BS)
    a = seq(range(8))  # exactly two full blocks
    bm.allocate(a)
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_different_prefix_does_not_match():
    bm = BlockManager(10, BS)
    bm.allocate(seq([1, 2, 3, 4, 5]))
    other = seq([1, 2, 3, 9, 5])
    bm.allocate(other)
    assert other.num_cached_tokens == 0


def test_decode_appends_a_block_at_the_boundary_and_names_full_blocks():
    bm = BlockManager(10, BS)
    a = seq(range(4))
    bm.allocate(a)
    a.append_token(4)  # 5 tokens: the new token starts block 2
    assert bm.can_append(a)
    bm.may_append(a)
    assert len(a.block_table) == 2
    for t in (5, 6, 7):
        a.append_token(t)
        bm.may_append(a)
    assert len(a.block_table) == 2 and bm.blocks[a.block_table[1]].hash != -1


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a, b = seq(range(9)), seq(range(9))
    bm.allocate(a)
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table) and b.num_cached_tokens == 0
    assert bm.allocate_blocks(2) and bm.num_free_blocks == 2
