import contextlib
import logging
import time

import torch

from nanovllm.config import Config
from nanovllm.engine import tensor_parallel
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import select_backend
from nanovllm.layers.linear import TensorParallelGroup
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

    Tensor parallelism (config.tensor_parallel_size > 1): this runner is one rank (`tp_group`; rank 0 when
    None, which then starts the other ranks, see engine/tensor_parallel.py) and holds its share of the
    weights and of the KV heads. Rank 0 sends each launch() to the others; only rank 0 returns tokens.
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
        self.workers = None  # set once set-up is done: from then on, each launch is sent to the other ranks
        hf = config.hf_config
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.num_kv_heads = max(1, num_kv_heads // self.tp.size)  # this rank's
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.busy_seconds = 0.0  # device time spent in model steps (CUDA: measured with events)
        with self.on_device(), torch.inference_mode(), tensor_parallel.reporting_failures(workers):
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
            self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.workers = workers
        logger.info(f"{role} runner on {self.device}: {config.dtype}, attention backend {self.backend}, "
                    f"{self.num_kv_blocks} KV blocks ({self.kv_capacity_tokens} tokens, "
                    f"{self.kv_cache.nbytes / 2**30:.2f} GiB), CUDA graphs {'on' if self.graphs else 'off'}"
                    + (f", tensor parallel over {self.tp.size} ranks" if self.tp.size > 1 else ""))

    def close(self):
        """Stop the other tensor-parallel ranks, if this is rank 0 of several (no-op otherwise)."""
        if self.workers is not None:
            self.workers.close()

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
        self.run(seqs, is_prefill=True)
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
        width = max(len(seq.block_table) for seq in seqs)
        return self._tensor([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs], torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        input_ids, positions, slot_mapping, prefix_slots = [], [], [], []
        cu_seqlens_q, cu_seqlens_k = [0], [0]
        bs = self.block_size
        has_prefix = any(seq.num_cached_tokens for seq in seqs)
        for seq in seqs:
            start = seq.num_cached_tokens
            input_ids.extend(seq[start:])
            positions.extend(range(start, len(seq)))
            cu_seqlens_q.append(cu_seqlens_q[-1] + len(seq) - start)
            cu_seqlens_k.append(cu_seqlens_k[-1] + len(seq))
            if not seq.block_table:  # warm-up: no KV cache yet
                continue
            for i in range(seq.num_blocks):
                first = seq.block_table[i] * bs
                slots = range(first, first + (bs if i < seq.num_blocks - 1 else seq.last_block_num_tokens))
                if i >= seq.num_cached_blocks:
                    slot_mapping.extend(slots)
                if has_prefix:
                    prefix_slots.extend(slots)
        lens_q = [b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:])]
        ctx = Context(
            is_prefill=True, slot_mapping=self._tensor(slot_mapping, torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32), cu_seqlens_k=self._tensor(cu_seqlens_k, torch.int32),
            max_seqlen_q=max(lens_q), max_seqlen_k=max(len(seq) for seq in seqs),
            prefix_slots=self._tensor(prefix_slots, torch.int64) if has_prefix else None,
            block_tables=self._block_tables(seqs) if has_prefix else None)
        return self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), ctx

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        bs = self.block_size
        input_ids = [seq.last_token for seq in seqs]
        positions = [len(seq) - 1 for seq in seqs]
        slot_mapping = [seq.block_table[-1] * bs + seq.last_block_num_tokens - 1 for seq in seqs]
        ctx = Context(is_prefill=False, slot_mapping=self._tensor(slot_mapping, torch.int32),
                      context_lens=self._tensor([len(seq) for seq in seqs], torch.int32),
                      block_tables=self._block_tables(seqs))
        return self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), ctx

    # ---- running ----

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        with tensor_parallel.reporting_failures(self.workers):
            pending = self.launch(seqs, is_prefill)
            return pending.get() if pending is not None else []  # ranks other than 0 sample nothing

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool) -> "PendingTokens | None":
        """Start a step without waiting for it: the sampled tokens arrive through the returned handle
        (None on tensor-parallel ranks other than 0)."""
        if self.workers:
            self.workers.call("launch", tensor_parallel.step_view(seqs, is_prefill), is_prefill)
        with self.on_device():
            input_ids, positions, ctx = (self.prepare_prefill if is_prefill else self.prepare_decode)(seqs)
            timer = StepTimer(self)
            if is_prefill or not self.graphs or len(seqs) > max(self.graphs):
                hidden = self.model(input_ids, positions, ctx)
            else:
                hidden = self._replay_graph(input_ids, positions, ctx)
            if is_prefill:
                hidden = hidden[ctx.cu_seqlens_q[1:] - 1]
            logits = self.model.compute_logits(hidden)
            if logits is None:  # not rank 0
                return None
            token_ids = self.sampler(logits, [seq.params for seq in seqs], [len(seq) for seq in seqs])
            return PendingTokens(token_ids, timer)

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
        pool = None
        # torch.cuda.graph's default capture stream is created once per process, on whichever device
        # was current then: a second runner on another GPU must bring its own.
        stream = torch.cuda.Stream(self.device)
        start = time.perf_counter()
        for bs in reversed(sizes):
            ctx = Context(is_prefill=False, slot_mapping=v["slot_mapping"][:bs], context_lens=v["context_lens"][:bs],
                          block_tables=v["block_tables"][:bs])
            v["outputs"][:bs] = self.model(v["input_ids"][:bs], v["positions"][:bs], ctx)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool, stream=stream):
                v["outputs"][:bs] = self.model(v["input_ids"][:bs], v["positions"][:bs], ctx)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(f"captured {len(sizes)} decode CUDA graphs on {self.device} in {time.perf_counter() - start:.1f}s")

    def _replay_graph(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        bs = input_ids.size(0)
        graph_bs = min(size for size in self.graphs if size >= bs)
        v = self.graph_vars
        v["input_ids"][:bs] = input_ids
        v["positions"][:bs] = positions
        v["slot_mapping"].fill_(-1)
        v["slot_mapping"][:bs] = ctx.slot_mapping
        v["context_lens"].zero_()
        v["context_lens"][:bs] = ctx.context_lens
        v["block_tables"][:bs, :ctx.block_tables.size(1)] = ctx.block_tables
        self.graphs[graph_bs].replay()
        return v["outputs"][:bs]

    # ---- KV transfer to another runner (PD mode) ----

    @torch.inference_mode()
    def sync_kv_cache_to(self, other: "ModelRunner", block_pairs: list[tuple[int, int]]) -> "KVTransfer":
        """Copy the KV of the given (my block, its block) pairs, all layers, into `other`'s cache.

        On CUDA the copies run on side streams and return at once; consecutive block ids on both sides
        become a single copy. Poll or wait on the returned handle.
        """
        runs = contiguous_runs(block_pairs)
        if not self.is_cuda:
            for src, dst, n in runs:
                other.kv_cache[dst:dst + n].copy_(self.kv_cache[src:src + n])
            return KVTransfer(None, None, self.kv_cache[0].nbytes * len(block_pairs), len(runs))
        with self.on_device():
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # KV written by prefill
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # torch makes both devices' *current* streams wait around a peer copy: make those the idle
            # copy streams, so the copy never queues behind (or blocks) decode work on the other GPU.
            with torch.cuda.stream(self.copy_stream), torch.cuda.stream(other.copy_stream):
                start.record(self.copy_stream)
                for src, dst, n in runs:
                    other.kv_cache[dst:dst + n].copy_(self.kv_cache[src:src + n], non_blocking=True)
                end.record(self.copy_stream)
        return KVTransfer(start, end, self.kv_cache[0].nbytes * len(block_pairs), len(runs))


def contiguous_runs(block_pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """[(src, dst)] -> [(src_start, dst_start, length)], merging pairs consecutive on both sides."""
    runs = []
    for src, dst in sorted(block_pairs):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(run) for run in runs]


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

    def add_elapsed(self):
        if self.runner.is_cuda:
            self.runner.busy_seconds += self.start.elapsed_time(self.end) / 1000
        else:
            self.runner.busy_seconds += time.perf_counter() - self.start


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

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        self.timer.add_elapsed()
        return self.host.tolist()


class KVTransfer:
    """A KV copy in flight between two runners."""

    def __init__(self, start, end, nbytes: int, num_copies: int):
        self.start, self.end, self.nbytes, self.num_copies = start, end, nbytes, num_copies

    def done(self) -> bool:
        return self.end is None or self.end.query()

    def wait(self):
        if self.end is not None:
            self.end.synchronize()

    def seconds(self) -> float:
        """Copy time on the device (0 on CPU); call after done()."""
        return self.start.elapsed_time(self.end) / 1000 if self.end is not None else 0.0
