import bisect
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.config import Config, min_kv_blocks
from nanovllm.engine import tensor_parallel
from nanovllm.engine.partitions import SMPartitions
from nanovllm.engine.prompt_graphs import PromptGraphs, bucket_sizes
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import select_backend
from nanovllm.layers.linear import TensorParallelGroup
from nanovllm.layers.sampler import Sampler
from nanovllm.models.decoder import DecoderForCausalLM, head_dim_of, kv_heads_of
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import Context, to_device
from nanovllm.utils.loader import load_model

logger = logging.getLogger("nanovllm")
CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where free memory says little
_GREEDY = SamplingParams(temperature=0, max_tokens=1)
_SAMPLED = SamplingParams(temperature=1.0, max_tokens=1)
# Prompt steps of up to this many tokens run through CUDA graphs (engine/prompt_graphs.py); larger ones eagerly:
# their GPU time grows with their tokens and their host time does not, so a graph matters less there.
GRAPHED_PROMPT_TOKENS = 16384
FAILURE_POLL_S = 50e-6  # tensor parallel: how often a wait for sampled tokens checks for a failed rank


class ModelRunner:
    """One model on one device: weights, paged KV cache, CUDA graphs for decode, sampling.

    role "prefill" (static PD's worker 0, which never decodes) captures no decode graphs; "both" does it all.

    KV layout is block-major, [num_blocks, num_layers, 2 (K/V), block_size, kv_heads, head_dim], so that
    all layers of a run of consecutive blocks are one contiguous range: one copy moves them to a peer.

    A step is two halves: `host_inputs` turns a Batch into plain arrays (on the host, while the device still
    runs the previous step), `execute` runs them. Tensor parallelism (config.tensor_parallel_size > 1): this
    runner is one rank (`tp_group`; rank 0 when None, which then starts the other ranks, see
    engine/tensor_parallel.py) holding its share of the weights and KV heads; rank 0 sends each step's
    inputs to the other ranks, samples, and broadcasts the tokens (later steps read PENDING tokens from them).
    """

    def __init__(self, config: Config, device_id: int | str | torch.device, num_kv_blocks: int = -1,
                 role: str = "both", tp_group: TensorParallelGroup | None = None):
        self.config = config
        self.device = torch.device(device_id if not isinstance(device_id, int) else f"cuda:{device_id}")
        self.is_cuda = self.device.type == "cuda"
        self.role = role
        self.block_size = config.kv_cache_block_size
        workers = None
        if tp_group is None and config.tensor_parallel_size > 1:
            workers = tensor_parallel.Workers(config, self.device, num_kv_blocks, role)
            tp_group = workers.group
        self.tp = tp_group or TensorParallelGroup()
        self.workers = None  # set once set-up is done: from then on, each step is sent to the other ranks
        hf = config.hf_config
        self.num_kv_heads = max(1, kv_heads_of(hf) // self.tp.size)  # this rank's
        self.head_dim = head_dim_of(hf)
        self.busy_seconds = 0.0  # device time spent in model steps (CUDA: measured with events)
        # Prompt tokens of a step are padded to a multiple of this. On CUDA, a matmul of a shape cuBLAS has not
        # seen costs ~240 us of host time (measured on an H200, vs ~25 us for a known shape), and chunked
        # prefill makes nearly every step's token count new. On the CPU the same path runs with a small multiple.
        self.prefill_token_multiple = 128 if self.is_cuda else 8
        # On CUDA, up to GRAPHED_PROMPT_TOKENS, further to the prompt-step graphs' token buckets, graphs on or off:
        # the same shapes give the same matmul kernels, so a step's tokens do not depend on whether it replays.
        self.prompt_buckets = bucket_sizes(self.prefill_token_multiple, min(
            config.max_num_batched_tokens, GRAPHED_PROMPT_TOKENS)) if self.is_cuda else []
        self.partitions: SMPartitions | None = None  # M2: green-context SM partitions (Config.sm_partitions)
        with self.on_device(), torch.inference_mode(), tensor_parallel.reporting_failures(workers):
            self.model = self._build_model()
            self.backend = select_backend(self.device, self.block_size)
            for attn in self.model.attention_layers():
                attn.backend = self.backend
            self.sampler = Sampler()
            self.prompt_graphs: PromptGraphs | None = None  # captured below, after the memory-sizing warm-up
            # Not yet with tensor parallelism: its ranks' prompt-step captures have not run on GPUs.
            self.captures_prompt_steps = (self.is_cuda and not config.enforce_eager and self.backend == "triton"
                                          and self.tp.size == 1)
            self._warmup()
            self._allocate_kv_cache(num_kv_blocks)
            self.graphs = {}
            if self.is_cuda and not config.enforce_eager and role != "prefill":
                self._capture_cudagraphs()
            if self.captures_prompt_steps:
                self._capture_prompt_graphs()
            if config.sm_partitions and role != "prefill":
                self.partitions = SMPartitions.from_config(self)
            self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None  # KV transfers
            self.last_sampled: torch.Tensor | None = None
        if workers:
            workers.graphs += [self.graphs] + (self.partitions.graph_sets() if self.partitions else [])
            workers.graphs += [self.prompt_graphs.graphs] if self.prompt_graphs else []
        self.workers = workers
        logger.info(f"{role} runner on {self.device}: {config.dtype}, attention backend {self.backend}, "
                    f"{self.num_kv_blocks} KV blocks ({self.kv_capacity_tokens} tokens, "
                    f"{self.kv_cache.nbytes / 2**30:.2f} GiB), CUDA graphs for decode "
                    f"{'on' if self.graphs else 'off'}, for prompt steps {'on' if self.prompt_graphs else 'off'}"
                    + (f", tensor parallel over {self.tp.size} ranks" if self.tp.size > 1 else ""))

    def close(self):
        """Stop the other tensor-parallel ranks, if this is rank 0 of several (no-op otherwise)."""
        if self.workers is not None:
            self.workers.close()

    def drain(self):
        """Wait until this runner's GPU work is done, so that the KV blocks it writes can be freed.

        Not after another tensor-parallel rank died: rank 0's collectives with it may never end, and a stopped
        engine runs nothing again (its blocks are never reused)."""
        if not self.is_cuda or (self.workers is not None and self.workers.stopping.is_set()):
            return
        torch.cuda.synchronize(self.device)

    def on_device(self):
        """Make this runner's GPU current: Triton launches and graph capture go to the current device."""
        return torch.cuda.device(self.device) if self.is_cuda else contextlib.nullcontext()

    # ---- set-up ----

    def _build_model(self) -> DecoderForCausalLM:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.config.dtype)
        try:
            with torch.device(self.device):
                model = DecoderForCausalLM(self.config.hf_config, self.tp)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(model, self.config.model)
        return model.eval()

    def _warmup(self):
        """Run the largest batch this runner will see, so that peak activation memory is known. Greedy and
        sampled rows, then a batch of one: what torch.compile specializes (a size of 1, each sampling path)
        compiles here, not in a user's first steps (measured: up to 1.5 s in the first step on an H200)."""
        if not self.is_cuda:
            return
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        c, params = self.config, [_GREEDY, _SAMPLED]
        num_seqs = max(2, min(c.max_num_batched_tokens // c.max_model_len, c.max_num_seqs))
        length = min(c.max_model_len, c.max_num_batched_tokens // num_seqs)
        seqs = [Sequence([0] * length, params[i % 2], self.block_size) for i in range(num_seqs)]
        self.run(Batch(0, prefills=[(seq, 0, len(seq)) for seq in seqs], sampled=seqs))
        for p in params:
            seq = Sequence([0], p, self.block_size)
            self.run(Batch(0, prefills=[(seq, 0, 1)], sampled=[seq]))
        torch.cuda.empty_cache()

    def _allocate_kv_cache(self, num_blocks: int):
        hf = self.config.hf_config
        block_bytes = (2 * hf.num_hidden_layers * self.block_size * self.num_kv_heads * self.head_dim
                       * self.config.dtype.itemsize)
        if num_blocks <= 0:
            num_blocks = self.tp.min(self._blocks_that_fit(block_bytes))  # every rank holds every block
        if num_blocks <= 0:
            raise RuntimeError(f"no memory left for the KV cache on {self.device}: lower max_num_batched_tokens "
                               f"or raise gpu_memory_utilization")
        self.num_kv_blocks = num_blocks
        self.kv_capacity_tokens = num_blocks * self.block_size
        self.kv_cache = torch.empty(num_blocks, hf.num_hidden_layers, 2, self.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.config.dtype, device=self.device)
        for layer, attn in enumerate(self.model.attention_layers()):
            attn.k_cache = self.kv_cache[:, layer, 0]
            attn.v_cache = self.kv_cache[:, layer, 1]

    def _blocks_that_fit(self, block_bytes: int) -> int:
        if not self.is_cuda:  # at least what the capacity check asks (config.check_kv_pool)
            return max(CPU_KV_CACHE_BYTES // block_bytes, min_kv_blocks(self.config.max_model_len, self.block_size))
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        # A step's activations at most (peak - current, from the warm-up's largest step) stay free for eager steps;
        # prompt-step graphs hold as much again in their own pool (their buckets reuse the largest one's share).
        activations = (peak - current) * (2 if self.captures_prompt_steps else 1)
        budget = total * self.config.gpu_memory_utilization - (total - free) - activations
        return int(budget) // block_bytes

    # ---- inputs (host side: plain arrays, sent as they are to the other tensor-parallel ranks) ----

    def host_inputs(self, batch: Batch) -> "StepInputs":
        inputs = StepInputs(sample_positions=[end for _, end, _ in batch.decodes])
        if batch.decodes:
            inputs.decode, inputs.decode_tables = self._decode_arrays(batch.decodes)
        if batch.prefills:
            sampling = batch.sampling_prefills()
            inputs.prefill = self._prefill_arrays(batch.prefills, sampling)
            inputs.sample_positions += [batch.prefills[i][2] for i in sampling]
        return inputs

    def _decode_arrays(self, decodes: list[tuple[Sequence, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """One token per sequence (token end - 1), whose id may still be PENDING on the device: rows of
        ids, pending rows, positions, slots, context lengths; and the block tables. (The hot path of the host.)"""
        bs = self.block_size
        rows = []
        for seq, end, row in decodes:
            p = end - 1
            rows.append((seq.token_ids[p], row, p, seq.block_table[p // bs] * bs + p % bs, end))
        host = np.array(rows, dtype=np.int64).T.copy()  # [5, batch]
        host[0, host[1] >= 0] = 0  # PENDING: read on the device
        return host, _block_tables([seq for seq, _, _ in decodes])

    def _prefill_arrays(self, chunks: list[tuple[Sequence, int, int]], sampling: list[int]) -> dict:
        """Tokens [start, end) of each sequence, over its context [0, end)."""
        input_ids, positions, slot_mapping, context_rows = [], [], [], []
        cu_seqlens_q, cu_seqlens_k = [0], [0]
        # The rows of the context a chunk attends to (earlier chunks, a prefix hit), for the backends that gather
        # it; the Triton kernel reads it from the cache through the block tables.
        has_context = self.backend != "triton" and any(start for _, start, _ in chunks)
        for seq, start, end in chunks:
            input_ids.extend(seq[start:end])
            positions.append(np.arange(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            cu_seqlens_k.append(cu_seqlens_k[-1] + end)
            if not seq.block_table:  # warm-up: no KV cache yet
                continue
            slot_mapping.append(self._slots(seq, start, end))
            if has_context:
                context_rows.append(self._rows(seq, 0, end))
        pad = self.padded_prompt_tokens(len(input_ids)) - len(input_ids)
        if pad:  # a pseudo-sequence of `pad` tokens that attends only to itself; nothing reads its rows
            input_ids.extend([0] * pad)
            positions.append(np.zeros(pad, dtype=np.int64))
            cu_seqlens_q.append(cu_seqlens_q[-1] + pad)
            cu_seqlens_k.append(cu_seqlens_k[-1] + pad)
            if slot_mapping:
                slot_mapping.append(np.full(pad, -1))  # -1: not stored
            if has_context:  # its "context" is whatever slot 0 holds, read only by the padding rows
                context_rows.append(np.zeros((2, pad), dtype=np.int64))
        return dict(input_ids=np.asarray(input_ids, dtype=np.int64), positions=_concat(positions),
                    slot_mapping=_concat(slot_mapping), cu_seqlens_q=np.asarray(cu_seqlens_q),
                    cu_seqlens_k=np.asarray(cu_seqlens_k),
                    max_seqlen_q=max(pad, max(end - start for _, start, end in chunks)),
                    max_seqlen_k=max(pad, max(end for _, _, end in chunks)),
                    last_tokens=np.asarray(cu_seqlens_q)[1:][sampling] - 1,
                    context_rows=np.concatenate(context_rows, axis=1) if has_context else None,
                    seq_lens=np.diff(cu_seqlens_k)[:len(chunks)].tolist() + [0] * (pad > 0),  # padding: none
                    block_tables=(_block_tables([seq for seq, _, _ in chunks], pad_rows=pad > 0)
                                  if slot_mapping else None))

    def padded_prompt_tokens(self, num_tokens: int) -> int:
        """How many rows a step with this many prompt tokens runs (see prefill_token_multiple, prompt_buckets)."""
        if self.prompt_buckets and num_tokens <= self.prompt_buckets[-1]:
            return self.prompt_buckets[bisect.bisect_left(self.prompt_buckets, num_tokens)]
        return -(-num_tokens // self.prefill_token_multiple) * self.prefill_token_multiple

    def _rows(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """[2, end - start]: the cache block and the offset in it of tokens [start, end) of `seq`."""
        positions = np.arange(start, end)
        return np.stack([np.asarray(seq.block_table)[positions // self.block_size], positions % self.block_size])

    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Cache slots of tokens [start, end) of `seq`."""
        blocks, offsets = self._rows(seq, start, end)
        return blocks * self.block_size + offsets

    # ---- inputs (device side) ----

    def _tensor(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def _decode_tensors(self, inputs: "StepInputs") -> tuple[torch.Tensor, torch.Tensor, Context]:
        """Decode inputs on the device, in one copy; PENDING ids are taken from the previous step's output."""
        input_ids, prev_rows, positions, slot_mapping, context_lens = self._tensor(inputs.decode, torch.int64)
        if (inputs.decode[1] >= 0).any():
            input_ids = torch.where(prev_rows >= 0, self.last_sampled[prev_rows.clamp(min=0)], input_ids)
        ctx = Context(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens,
                      block_tables=self._tensor(inputs.decode_tables, torch.int32))
        return input_ids, positions, ctx

    def _prefill_tensors(self, p: dict) -> tuple[torch.Tensor, torch.Tensor, Context]:
        has_context, has_cache = p["context_rows"] is not None, p["block_tables"] is not None
        ctx = Context(is_prefill=True, slot_mapping=self._tensor(p["slot_mapping"], torch.int32),
                      cu_seqlens_q=self._tensor(p["cu_seqlens_q"], torch.int32),
                      cu_seqlens_k=self._tensor(p["cu_seqlens_k"], torch.int32),
                      max_seqlen_q=p["max_seqlen_q"], max_seqlen_k=p["max_seqlen_k"],
                      prefix_rows=tuple(self._tensor(p["context_rows"], torch.int64)) if has_context else None,
                      context_lens=self._tensor(p["seq_lens"], torch.int32),
                      block_tables=self._tensor(p["block_tables"], torch.int32) if has_cache else None)
        return self._tensor(p["input_ids"], torch.int64), self._tensor(p["positions"], torch.int64), ctx

    # ---- running ----

    def run(self, batch: Batch) -> list[int]:
        pending = self.launch(batch)
        return pending.get() if pending is not None else []  # ranks other than 0 sample nothing

    def launch(self, batch: Batch) -> "PendingTokens | None":
        """Start a step without waiting for it: the sampled tokens arrive through the returned handle, and stay
        on the device as `last_sampled`, where the next step's PENDING inputs are read from."""
        inputs = self.host_inputs(batch)
        with tensor_parallel.reporting_failures(self.workers):
            if self.workers:
                self.workers.call("execute", inputs)
            return self.execute(inputs, [seq.params for seq in batch.sampled])

    @torch.inference_mode()
    def execute(self, inputs: "StepInputs", params: list[SamplingParams] | None = None) -> "PendingTokens | None":
        """Run one step's inputs; returns the tokens' handle on rank 0 (None on the other ranks)."""
        with self.on_device():
            timer = StepTimer(self)
            forward = self.forward if self.partitions is None else self.partitions.forward
            logits = self.model.compute_logits(forward(inputs))  # gathered on rank 0
            if logits is not None:
                token_ids = self.sampler(logits, params, inputs.sample_positions)
            else:
                token_ids = torch.empty(len(inputs.sample_positions), dtype=torch.int64, device=self.device)
            self.last_sampled = self.tp.broadcast(token_ids)
            return PendingTokens(token_ids, timer, self.workers) if self.tp.rank == 0 else None

    def forward(self, inputs: "StepInputs") -> torch.Tensor:
        """Hidden states of the rows the step samples: its decodes, then the prompts it completes. A mixed step
        runs the decodes, then the prompt chunks."""
        hidden = []
        if inputs.decode is not None:
            hidden.append(self.forward_decodes(inputs))
        if inputs.prefill is not None:
            hidden.append(self.forward_prefills(inputs))
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def forward_decodes(self, inputs: "StepInputs", graphs: dict | None = None) -> torch.Tensor:
        """Through a CUDA graph (this runner's, or `graphs`) when the batch fits one."""
        graphs = self.graphs if graphs is None else graphs
        input_ids, positions, ctx = self._decode_tensors(inputs)
        if not graphs or input_ids.size(0) > max(graphs):
            return self.model(input_ids, positions, ctx)
        return self.replay_graph(graphs, input_ids, positions, ctx)

    def forward_prefills(self, inputs: "StepInputs", graphed: bool = True) -> torch.Tensor:
        """Through the prompt-step graphs when the step fits them (`graphed=False`: eagerly, as on an SM partition,
        where a graph captured on the whole GPU would still run on the whole GPU)."""
        input_ids, positions, ctx = self._prefill_tensors(inputs.prefill)
        if graphed and self.prompt_graphs and self.prompt_graphs.fits(input_ids.size(0), ctx):
            hidden = self.prompt_graphs.replay(input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)
        return hidden[self._tensor(inputs.prefill["last_tokens"], torch.int64)]

    def _capture_prompt_graphs(self):
        start, c, sizes = time.perf_counter(), self.config, self.prompt_buckets
        torch.cuda.empty_cache()  # so that the memory reserved grows by the graphs' pool only
        before = torch.cuda.memory_reserved(self.device)
        self.prompt_graphs = PromptGraphs(self.model, sizes, max_seqs=c.max_num_seqs + 1,  # + the padding's
                                          max_blocks=-(-c.max_model_len // self.block_size),
                                          hidden_size=c.hf_config.hidden_size, dtype=c.dtype, device=self.device,
                                          pool=getattr(self, "graph_pool", None),
                                          stream=torch.cuda.Stream(self.device))
        self.graph_pool = self.prompt_graphs.pool  # one pool for all of this runner's graphs
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        logger.info(f"captured {len(sizes)} prompt-step CUDA graphs on {self.device} ({sizes[0]} to {sizes[-1]} "
                    f"tokens) in {time.perf_counter() - start:.1f}s, "
                    f"{(torch.cuda.memory_reserved(self.device) - before) / 2**30:.2f} GiB")

    # ---- CUDA graphs for decode ----

    def _graph_batch_sizes(self) -> list[int]:
        max_bs = min(self.config.max_num_seqs, 512)
        return [bs for bs in [1, 2, 4, 8] + list(range(16, max_bs + 1, 16)) if bs <= max_bs]

    def _capture_cudagraphs(self):
        sizes = self._graph_batch_sizes()
        max_bs = sizes[-1]
        max_blocks = -(-self.config.max_model_len // self.block_size)
        hidden_size = self.config.hf_config.hidden_size
        with torch.device(self.device):
            v = self.graph_vars = dict(
                input_ids=torch.zeros(max_bs, dtype=torch.int64), positions=torch.zeros(max_bs, dtype=torch.int64),
                slot_mapping=torch.full((max_bs,), -1, dtype=torch.int32),
                context_lens=torch.zeros(max_bs, dtype=torch.int32),
                block_tables=torch.zeros(max_bs, max_blocks, dtype=torch.int32),
                outputs=torch.zeros(max_bs, hidden_size, dtype=self.config.dtype))
        self.graph_pool = None  # shared by every decode graph of this runner (partitions' too)
        # torch.cuda.graph's default capture stream is created once per process, on whichever device
        # was current then: a second runner on another GPU must bring its own.
        stream = torch.cuda.Stream(self.device)
        start = time.perf_counter()
        for bs in reversed(sizes):
            inputs = self.graph_inputs(bs)
            v["outputs"][:bs] = self.model(*inputs)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.graph_pool, stream=stream):
                v["outputs"][:bs] = self.model(*inputs)
            self.graph_pool = self.graph_pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(f"captured {len(sizes)} decode CUDA graphs on {self.device} in {time.perf_counter() - start:.1f}s")

    def graph_inputs(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """The first `bs` rows of the graphs' static inputs, as a model's arguments."""
        v = self.graph_vars
        ctx = Context(is_prefill=False, slot_mapping=v["slot_mapping"][:bs], context_lens=v["context_lens"][:bs],
                      block_tables=v["block_tables"][:bs])
        return v["input_ids"][:bs], v["positions"][:bs], ctx

    def replay_graph(self, graphs: dict, input_ids: torch.Tensor, positions: torch.Tensor,
                     ctx: Context) -> torch.Tensor:
        """Run the smallest of `graphs` that fits the batch, on the current stream; rows past it are padding."""
        bs = input_ids.size(0)
        graph_bs = min(size for size in graphs if size >= bs)
        v = self.graph_vars
        v["input_ids"][:bs] = input_ids
        v["positions"][:bs] = positions
        v["slot_mapping"].fill_(-1)
        v["slot_mapping"][:bs] = ctx.slot_mapping
        v["context_lens"].zero_()
        v["context_lens"][:bs] = ctx.context_lens
        v["block_tables"][:bs, :ctx.block_tables.size(1)] = ctx.block_tables
        graphs[graph_bs].replay()
        return v["outputs"][:bs]


@dataclass
class StepInputs:
    """One step's inputs as plain host arrays (see ModelRunner.host_inputs); they pickle small."""
    sample_positions: list[int]  # position of each sampled token (per-request seeds use it)
    decode: np.ndarray | None = None  # [5, batch] int64: ids, pending rows, positions, slots, lengths
    decode_tables: np.ndarray | None = None  # [batch, blocks] int32
    prefill: dict | None = None  # see ModelRunner._prefill_arrays


def _block_tables(seqs: list[Sequence], pad_rows: bool = False) -> np.ndarray:
    """One row per sequence, -1 past its blocks; `pad_rows`: one more row, block 0 (the padding pseudo-sequence)."""
    tables = np.full((len(seqs) + pad_rows, max(len(seq.block_table) for seq in seqs)), -1, dtype=np.int32)
    tables[len(seqs):] = 0
    for row, seq in zip(tables, seqs):
        row[:len(seq.block_table)] = seq.block_table
    return tables


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


class StepTimer:
    """Device time of one step, from events around it (CUDA) or the wall clock (CPU)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        if runner.is_cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self):
        if self.runner.is_cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.end = time.perf_counter()  # the CPU computed the whole step inside launch()

    def add_elapsed(self):
        if self.runner.is_cuda:
            self.runner.busy_seconds += self.start.elapsed_time(self.end) / 1000
        else:
            self.runner.busy_seconds += self.end - self.start


class PendingTokens:
    """Sampled token ids on their way to the host."""

    def __init__(self, token_ids: torch.Tensor, timer: StepTimer, workers=None):
        self.timer, self.workers = timer, workers
        timer.stop()
        if token_ids.is_cuda:
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self.host.copy_(token_ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = token_ids, None

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self):
        if self.event is None:
            return
        if self.workers is None:
            self.event.synchronize()
            return
        # Another rank that dies leaves this one's collectives waiting on the GPU until rank 0's communicator is
        # aborted, which happens only once rank 0 stops (Workers.close): wait in slices, and stop once the watcher
        # saw a failure (get() then raises it and stops the ranks).
        while not self.event.query() and not self.workers.failed.wait(FAILURE_POLL_S):
            pass

    def get(self) -> list[int]:
        with tensor_parallel.reporting_failures(self.workers):  # another rank's failure: these are garbage
            self.wait()
        self.timer.add_elapsed()
        return self.host.tolist()
