"""CUDA graphs of whole prompt steps (and of the prompt part of mixed steps), one per token bucket.

Launched eagerly, a prompt step is hundreds of kernel launches (matmuls, Triton kernels, attention) and tens of
thousands of Python calls: on an H200 ~20-40 ms of host time for Qwen3-0.6B whatever the step's size (session 21's
profiles), so mixed steps were host-bound, and in PD the one host thread that launched GPU0's prompt steps left
GPU1 waiting. Replayed from a graph, a step is a few input copies and one launch.

What makes the whole step capturable is the prompt attention (`paged_prefill_attention`): it reads the context
from the paged cache and its grid depends only on the step's token and sequence counts. Each bucket fixes both:
tokens are padded to the bucket (the rows past the step's tokens write no KV, slot -1, and nothing reads them;
the layers treat rows independently), and sequences to `max_seqs` (empty chunks of length 0). The step's inputs
are copied into static buffers that the graphs read; the hidden states come back in a static buffer.
"""
import bisect

import torch

from nanovllm.utils.context import Context


def bucket_sizes(multiple: int, largest: int) -> list[int]:
    """Token counts to capture, multiples of `multiple`: doubling up to 8 multiples, then every 8 multiples (a
    step's padding is then at most 8 multiples, under 1/8 of its tokens past the small sizes), up to the first
    that holds `largest`."""
    sizes, size = [], multiple
    while True:
        sizes.append(size)
        if size >= largest:
            return sizes
        size = size * 2 if size < 8 * multiple else size + 8 * multiple


def capture(step, pool, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """`step` captured in a CUDA graph whose memory comes from `pool` (None: a new pool). torch.cuda.graph's default
    capture stream is created once per process, on whichever device was current then: a runner on another GPU
    brings its own. Captures that share a pool must share the stream too: the allocator reuses a block freed by one
    capture only for allocations on the block's stream (with a new stream per capture, the 19 buckets of the 8B model
    held 15 GiB on an H200)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool, stream=stream):
        step()
    return graph


class PromptGraphs:

    @torch.inference_mode()
    def __init__(self, model, sizes: list[int], max_seqs: int, max_blocks: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, pool=None,
                 stream: torch.cuda.Stream | None = None):
        self.sizes, self.max_seqs, self.max_blocks = sorted(sizes), max_seqs, max_blocks
        largest = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(largest, dtype=torch.int64)
            self.positions = torch.zeros(largest, dtype=torch.int64)
            self.slot_mapping = torch.full((largest,), -1, dtype=torch.int32)
            # All chunks empty until a step fills them: the captures run with no work in the attention.
            self.cu_seqlens_q = torch.zeros(max_seqs + 1, dtype=torch.int32)
            self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32)
            self.block_tables = torch.full((max_seqs, max_blocks), -1, dtype=torch.int32)
            self.hidden = torch.zeros(largest, hidden_size, dtype=dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        for size in reversed(self.sizes):  # the largest first: later captures reuse its share of the pool
            def step(size=size):
                self.hidden[:size] = model(self.input_ids[:size], self.positions[:size], self._context(size))
            step()  # outside the capture: compiles, picks the matmul kernels for this size
            self.graphs[size] = capture(step, pool, stream)
            pool = pool or self.graphs[size].pool()
        self.pool = pool

    def _context(self, size: int) -> Context:
        return Context(is_prefill=True, slot_mapping=self.slot_mapping[:size], cu_seqlens_q=self.cu_seqlens_q,
                       context_lens=self.seq_lens, block_tables=self.block_tables)

    def fits(self, num_tokens: int, ctx: Context) -> bool:
        return (num_tokens <= self.sizes[-1] and ctx.context_lens.numel() <= self.max_seqs
                and ctx.block_tables.size(1) <= self.max_blocks)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The model's hidden states for a prompt step that `fits`: a view of a static buffer, valid until the
        next replay."""
        n, seqs, width = input_ids.size(0), ctx.context_lens.numel(), ctx.block_tables.size(1)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = ctx.slot_mapping
        self.slot_mapping[n:size] = -1  # padding rows store nothing
        self.cu_seqlens_q[:seqs + 1] = ctx.cu_seqlens_q
        self.cu_seqlens_q[seqs + 1:] = n  # empty chunks after the step's
        self.seq_lens[:seqs] = ctx.context_lens
        self.seq_lens[seqs:] = 0
        self.block_tables[:seqs, :width] = ctx.block_tables
        self.graphs[size].replay()
        return self.hidden[:n]
