import contextlib
import logging
import time

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.partitions import SMPartitions
from nanovllm.engine.scheduler import Batch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import select_backend
from nanovllm.layers.sampler import Sampler
from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import Context, to_device
from nanovllm.utils.loader import load_model

logger = logging.getLogger("nanovllm")
CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where free memory says little
_GREEDY = SamplingParams(temperature=0, max_tokens=1)


class ModelRunner:
    """One model on one device: weights, paged KV cache, CUDA graphs for decode, sampling.

    role "prefill" / "decode" (PD mode) only changes what is sized and captured: the prefill runner
    warms up with a full prefill batch and captures no graphs; the decode runner warms up with a decode
    batch, so more of its memory goes to KV blocks.

    KV layout is block-major, [num_blocks, num_layers, 2 (K/V), block_size, kv_heads, head_dim], so that
    all layers of a run of consecutive blocks are one contiguous range: one copy moves them to a peer.
    """

    def __init__(self, config: Config, device_id: int | str, num_kv_blocks: int = -1, role: str = "both"):
        self.config = config
        self.device = torch.device(device_id if isinstance(device_id, str) else f"cuda:{device_id}")
        self.is_cuda = self.device.type == "cuda"
        self.role = role
        self.block_size = config.kv_cache_block_size
        hf = config.hf_config
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.busy_seconds = 0.0  # device time spent in model steps (CUDA: measured with events)
        self.partitions: SMPartitions | None = None  # M2: green-context SM partitions (Config.sm_partitions)
        with self.on_device(), torch.inference_mode():
            self.model = self._build_model()
            self.backend = select_backend(self.device, self.block_size)
            for attn in self.model.attention_layers():
                attn.backend = self.backend
            self.sampler = Sampler()
            self._warmup()
            self._allocate_kv_cache(num_kv_blocks)
            self.graphs = {}
            if self.is_cuda and not config.enforce_eager and role != "prefill":
                self._capture_cudagraphs()
            if config.sm_partitions and role != "prefill":
                self.partitions = SMPartitions.from_config(self)
            self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None  # KV transfers
            self.last_sampled: torch.Tensor | None = None
        logger.info(f"{role} runner on {self.device}: {config.dtype}, attention backend {self.backend}, "
                    f"{self.num_kv_blocks} KV blocks ({self.kv_capacity_tokens} tokens, "
                    f"{self.kv_cache.nbytes / 2**30:.2f} GiB), CUDA graphs {'on' if self.graphs else 'off'}")

    def on_device(self):
        """Make this runner's GPU current: Triton launches and graph capture go to the current device."""
        return torch.cuda.device(self.device) if self.is_cuda else contextlib.nullcontext()

    # ---- set-up ----

    def _build_model(self) -> DecoderForCausalLM:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.config.dtype)
        try:
            with torch.device(self.device):
                model = DecoderForCausalLM(self.config.hf_config)
        finally:
            torch.set_default_dtype(default_dtype)
        load_model(model, self.config.model)
        return model.eval()

    def _warmup(self):
        """Run the largest batch this runner will see, so that peak activation memory is known."""
        if not self.is_cuda:
            return
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        c = self.config
        if self.role == "decode":
            seqs = [Sequence([0], _GREEDY, self.block_size) for _ in range(c.max_num_seqs)]
        else:
            num_seqs = max(1, min(c.max_num_batched_tokens // c.max_model_len, c.max_num_seqs))
            seqs = [Sequence([0] * c.max_model_len, _GREEDY, self.block_size) for _ in range(num_seqs)]
        self.run(Batch(0, prefills=[(seq, 0, len(seq)) for seq in seqs], sampled=seqs))
        torch.cuda.empty_cache()

    def _allocate_kv_cache(self, num_blocks: int):
        hf = self.config.hf_config
        block_bytes = (2 * hf.num_hidden_layers * self.block_size * self.num_kv_heads * self.head_dim
                       * self.config.dtype.itemsize)
        if num_blocks <= 0:
            num_blocks = self._blocks_that_fit(block_bytes)
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
        if not self.is_cuda:
            return max(CPU_KV_CACHE_BYTES // block_bytes, -(-self.config.max_model_len // self.block_size))
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - (total - free) - (peak - current)
        return int(budget) // block_bytes

    # ---- inputs ----

    def _tensor(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        tables = np.full((len(seqs), max(len(seq.block_table) for seq in seqs)), -1, dtype=np.int32)
        for row, seq in zip(tables, seqs):
            row[:len(seq.block_table)] = seq.block_table
        return to_device(tables, torch.int32, self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Cache slots of tokens [start, end) of `seq`."""
        positions = np.arange(start, end)
        return np.asarray(seq.block_table)[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare_prefill(self, chunks: list[tuple[Sequence, int, int]]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """Inputs for computing the KV of tokens [start, end) of each sequence, over its context [0, end)."""
        input_ids, positions, slot_mapping, context_slots = [], [], [], []
        cu_seqlens_q, cu_seqlens_k = [0], [0]
        has_context = any(start for _, start, _ in chunks)
        for seq, start, end in chunks:
            input_ids.extend(seq[start:end])
            positions.append(np.arange(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            cu_seqlens_k.append(cu_seqlens_k[-1] + end)
            if not seq.block_table:  # warm-up: no KV cache yet
                continue
            slot_mapping.append(self._slots(seq, start, end))
            if has_context:
                context_slots.append(self._slots(seq, 0, end))
        ctx = Context(
            is_prefill=True, slot_mapping=self._tensor(_concat(slot_mapping), torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32), cu_seqlens_k=self._tensor(cu_seqlens_k, torch.int32),
            max_seqlen_q=max(end - start for _, start, end in chunks), max_seqlen_k=max(end for _, _, end in chunks),
            prefix_slots=self._tensor(_concat(context_slots), torch.int64) if has_context else None,
            block_tables=self._block_tables([seq for seq, _, _ in chunks]) if has_context else None)
        return self._tensor(input_ids, torch.int64), self._tensor(_concat(positions), torch.int64), ctx

    def prepare_decode(self, decodes: list[tuple[Sequence, int, int]]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        """Inputs for one token per sequence (token end - 1), whose id may still be PENDING on this device.
        All of it goes to the device in one copy (host work per step is what limits small models)."""
        bs = self.block_size
        rows = []
        for seq, end, row in decodes:
            p = end - 1
            rows.append((seq.token_ids[p], row, p, seq.block_table[p // bs] * bs + p % bs, end))
        host = np.array(rows, dtype=np.int64).T.copy()  # [5, batch]: ids, pending rows, positions, slots, lengths
        pending = host[1] >= 0
        host[0, pending] = 0
        input_ids, prev_rows, positions, slot_mapping, context_lens = to_device(host, torch.int64, self.device)
        if pending.any():  # sampled by the previous step: take them from its output, on the device
            input_ids = torch.where(prev_rows >= 0, self.last_sampled[prev_rows.clamp(min=0)], input_ids)
        ctx = Context(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens,
                      block_tables=self._block_tables([seq for seq, _, _ in decodes]))
        return input_ids, positions, ctx

    # ---- running ----

    def run(self, batch: Batch) -> list[int]:
        return self.launch(batch).get()

    @torch.inference_mode()
    def launch(self, batch: Batch) -> "PendingTokens":
        """Start a step without waiting for it: the sampled tokens arrive through the returned handle, and stay
        on the device as `last_sampled`, where the next step's PENDING inputs are read from."""
        with self.on_device():
            timer = StepTimer(self)
            sampling = batch.sampling_prefills()
            forward = self.forward if self.partitions is None else self.partitions.forward
            logits = self.model.compute_logits(forward(batch, sampling))
            positions = [end for _, end, _ in batch.decodes] + [batch.prefills[i][2] for i in sampling]
            token_ids = self.sampler(logits, [seq.params for seq in batch.sampled], positions)
            self.last_sampled = token_ids
            return PendingTokens(token_ids, timer)

    def forward(self, batch: Batch, sampling: list[int]) -> torch.Tensor:
        """Hidden states of the rows the step samples: its decodes, then the prompts it completes (`sampling`:
        their indices in batch.prefills). A mixed step runs the decodes, then the prompt chunks."""
        hidden = []
        if batch.decodes:
            hidden.append(self.forward_decodes(batch.decodes))
        if batch.prefills:
            hidden.append(self.forward_prefills(batch.prefills, sampling))
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def forward_decodes(self, decodes: list[tuple[Sequence, int, int]],
                        graphs: dict[int, torch.cuda.CUDAGraph] | None = None) -> torch.Tensor:
        """Through a CUDA graph (this runner's, or `graphs`) when the batch fits one."""
        graphs = self.graphs if graphs is None else graphs
        input_ids, positions, ctx = self.prepare_decode(decodes)
        if not graphs or len(decodes) > max(graphs):
            return self.model(input_ids, positions, ctx)
        return self.replay_graph(graphs, input_ids, positions, ctx)

    def forward_prefills(self, prefills: list[tuple[Sequence, int, int]], sampling: list[int]) -> torch.Tensor:
        input_ids, positions, ctx = self.prepare_prefill(prefills)
        last_tokens = ctx.cu_seqlens_q[1:][self._tensor(sampling, torch.int64)] - 1
        return self.model(input_ids, positions, ctx)[last_tokens]

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

    def replay_graph(self, graphs: dict[int, torch.cuda.CUDAGraph], input_ids: torch.Tensor,
                     positions: torch.Tensor, ctx: Context) -> torch.Tensor:
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

    def __init__(self, token_ids: torch.Tensor, timer: StepTimer):
        self.timer = timer
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
        if self.event is not None:
            self.event.synchronize()

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        self.timer.add_elapsed()
        return self.host.tolist()
