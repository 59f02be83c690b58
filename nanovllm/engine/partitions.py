"""SM partitions of one GPU with CUDA green contexts (M2; design and measurements: M2_SM_PARTITIONS.md).

A green context owns a fixed set of a GPU's SMs: kernels launched on one of its streams run only there, and a
CUDA graph captured on such a stream keeps to it. Two uses, both behind `Config.sm_partitions`:

- "attention_sms": the attention/FFN pipeline. A decode batch is cut into two nano-batches whose pieces
  alternate between an attention partition (KV store and paged attention: memory-bound) and a dense partition
  (the projections and the MLP: GEMMs), so that one nano-batch's attention runs beside the other's GEMMs.
- "decode_sms": prefill beside decode. A mixed step (decodes beside a prompt chunk) runs its decodes on a
  partition of one of these sizes and the prompt chunk on the rest of the GPU at the same time, instead of one
  after the other; the size is chosen per step from the work in it.

The partitions come from the CUDA driver directly (ctypes): torch's `GreenContext.create(num_sms)` carves each
context out of the whole GPU, so two of them may share SMs; one split of the SM resource gives two disjoint
halves. Every partitioned piece of work forks from the runner's current stream and joins it again (events), so
the rest of the engine sees ordinary stream order.
"""
import contextlib
import ctypes
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nanovllm.utils.context import Context

SM_GRANULE = 8  # Hopper partitions SMs in multiples of 8 (at least 8); older GPUs in finer steps that 8 also fits
NANO_BATCHES = 2
PIPELINE_MIN_BATCH = 64  # smaller decode batches gain nothing from halving: they run as one, on the whole GPU
SPEC_KEYS = ("attention_sms", "decode_sms", "pipeline_min_batch")


@dataclass(frozen=True)
class Partition:
    """A stream whose kernels run on `sms` SMs only. Without a stream (CPU), the work runs inline."""
    sms: int | None
    stream: torch.cuda.Stream | None
    context: object = None  # the green context, kept alive as long as its stream


# ---- checking the option ----

def check_sm_partitions(config) -> dict:
    """Config.sm_partitions checked (shape first, then the devices) and normalized: decode_sms a sorted tuple."""
    spec = config.sm_partitions
    unknown = sorted(map(str, set(spec) - set(SPEC_KEYS)))
    if unknown:
        raise ValueError(f"sm_partitions: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    if not {"attention_sms", "decode_sms"} & set(spec):
        raise ValueError(f"sm_partitions needs attention_sms and/or decode_sms, got {spec!r}")
    spec = dict(spec)
    decode = spec.get("decode_sms")
    if decode is not None:
        decode = (decode,) if isinstance(decode, int) and not isinstance(decode, bool) else decode
        if not isinstance(decode, (list, tuple)) or not decode:
            raise TypeError(f"sm_partitions['decode_sms'] must be an int or a non-empty list of ints, got {decode!r}")
    for name, value in _sm_counts(dict(spec, decode_sms=decode or ())):
        _check_sm_count(name, value)
    if decode is not None:
        spec["decode_sms"] = tuple(sorted(set(decode)))
    min_batch = spec.get("pipeline_min_batch", PIPELINE_MIN_BATCH)
    if not isinstance(min_batch, int) or isinstance(min_batch, bool) or min_batch < NANO_BATCHES:
        raise ValueError(f"sm_partitions['pipeline_min_batch'] must be an int >= {NANO_BATCHES}, got {min_batch!r}")
    if decode is not None and not config.chunked_prefill_tokens:
        raise ValueError("sm_partitions['decode_sms'] splits mixed steps (decodes beside a prompt chunk), and with "
                         "chunked_prefill_tokens=0 there are none: set chunked_prefill_tokens > 0")
    devices = [config.prefill_device_id, config.decode_device_id] if config.enable_two_gpu_pd else [config.device]
    for device in dict.fromkeys(devices):
        _check_device(torch.device(device), spec)
    return spec


def _sm_counts(spec: dict) -> list[tuple[str, object]]:
    counts = [("attention_sms", spec["attention_sms"])] if "attention_sms" in spec else []
    return counts + [("decode_sms", value) for value in spec.get("decode_sms", ())]


def _check_sm_count(name: str, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"sm_partitions['{name}'] must be an int (or, for decode_sms, a list of ints), got {value!r}")
    if value < SM_GRANULE or value % SM_GRANULE:
        raise ValueError(f"sm_partitions['{name}']: SM counts must be multiples of {SM_GRANULE}, at least "
                         f"{SM_GRANULE} (how Hopper partitions SMs), got {value}")


def _check_device(device: torch.device, spec: dict):
    reason = unsupported_reason(device)
    if reason:
        raise ValueError(f"sm_partitions cannot work here: {reason}")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    for name, value in _sm_counts(spec):
        if value > total - SM_GRANULE:
            raise ValueError(f"sm_partitions['{name}'] = {value} leaves fewer than {SM_GRANULE} of {device}'s "
                             f"{total} SMs for the other partition")


def unsupported_reason(device: torch.device) -> str | None:
    """Why green contexts cannot partition `device`, or None if they can."""
    if device.type != "cuda":
        return f"green contexts need a CUDA GPU, and the device is {device}"
    if not torch.cuda.is_available():
        return "this torch build has no CUDA"
    try:
        _driver()
    except OSError as e:
        return str(e)
    return None


# ---- making partitions (CUDA driver API) ----

CU_DEV_RESOURCE_TYPE_SM = 1
CU_GREEN_CTX_DEFAULT_STREAM = 1  # required by cuGreenCtxCreate
CU_STREAM_NON_BLOCKING = 1
# A CUdevResource is 144 bytes in CUDA 12.4-13 (type, 92 internal bytes, then the SM fields: smCount first).
# Buffers are oversized, and only one resource is ever passed where the API takes an array.
RESOURCE_BYTES = 1024
SM_COUNT_OFFSET = 96
_DRIVER_FUNCTIONS = {
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetDevResource": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int],
    "cuDevSmResourceSplitByCount": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint],
    "cuDevResourceGenerateDesc": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint],
    "cuGreenCtxCreate": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_int, ctypes.c_uint],
    "cuGreenCtxStreamCreate": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint, ctypes.c_int],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise OSError(f"the CUDA driver library cannot be loaded ({e})") from None
    for name, argtypes in _DRIVER_FUNCTIONS.items():
        if not hasattr(lib, name):
            raise OSError(f"the CUDA driver has no {name}: green contexts need a CUDA 12.4 or newer driver")
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


def _check(result: int, what: str):
    if result != 0:
        message = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(message))
        raise RuntimeError(f"{what} failed: CUDA driver error {result} "
                           f"({message.value.decode() if message.value else 'unknown'})")


@functools.cache
def split_sms(device: torch.device, sms: int) -> tuple[Partition, Partition]:
    """Two disjoint partitions of `device`: `sms` SMs, and all the others. Made once per process and size."""
    lib = _driver()
    torch.zeros(1, device=device)  # the primary context exists: green contexts are made beside it
    dev = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
    whole, group, rest = (ctypes.create_string_buffer(RESOURCE_BYTES) for _ in range(3))
    _check(lib.cuDeviceGetDevResource(dev, whole, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    num_groups = ctypes.c_uint(1)
    _check(lib.cuDevSmResourceSplitByCount(group, ctypes.byref(num_groups), whole, rest, 0, sms),
           f"splitting {sms} SMs off {device}")
    first, second = _partition(dev, group, device), _partition(dev, rest, device)
    if num_groups.value != 1 or first.sms < sms or second.sms < SM_GRANULE:
        raise RuntimeError(f"splitting {sms} SMs off {device} gave partitions of {first.sms} and {second.sms} SMs")
    return first, second


def _partition(dev: ctypes.c_int, resource, device: torch.device) -> Partition:
    lib = _driver()
    desc, context, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc")
    _check(lib.cuGreenCtxCreate(ctypes.byref(context), desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    _check(lib.cuGreenCtxStreamCreate(ctypes.byref(stream), context, CU_STREAM_NON_BLOCKING, 0),
           "cuGreenCtxStreamCreate")
    sms = ctypes.c_uint.from_buffer(resource, SM_COUNT_OFFSET).value
    return Partition(sms, torch.cuda.ExternalStream(stream.value, device=device), context)


# ---- running on partitions ----

def side_by_side(*jobs: tuple[torch.cuda.Stream | None, Callable]) -> list:
    """Run each (stream, fn) on its stream, all after what the current stream has queued; the current stream then
    waits for all of them. Returns what each fn returned. Without streams (CPU), one after the other."""
    if all(stream is None for stream, _ in jobs):
        return [fn() for _, fn in jobs]
    origin = torch.cuda.current_stream()
    fork = torch.cuda.Event()
    fork.record(origin)
    results = []
    try:
        for stream, fn in jobs:  # each stream waits for the fork, not for the job before it: they overlap
            stream.wait_event(fork)
            with torch.cuda.stream(stream):
                results.append(fn())
    finally:
        for stream, _ in jobs:
            origin.wait_stream(stream)
    return results


class Lanes:
    """Where each piece of a nano-batch's forward runs (see DecoderModel.forward_interleaved): attention pieces on
    one stream, dense pieces on the other, each after the previous piece of the same nano-batch, the first after
    the work the current stream had queued. `join` makes the current stream wait for all of it.
    Without streams (CPU), the pieces run inline in the order they are issued."""

    def __init__(self, attention: torch.cuda.Stream | None, dense: torch.cuda.Stream | None, num_nanos: int):
        self.attention_stream, self.dense_stream = attention, dense
        self.last = []  # per nano-batch: (stream, event) of its latest piece
        if dense is not None:
            self.origin = torch.cuda.current_stream()
            start = torch.cuda.Event()
            start.record(self.origin)
            self.last = [(self.origin, start)] * num_nanos

    def attention(self, nano: int):
        return self._piece(self.attention_stream, nano)

    def dense(self, nano: int):
        return self._piece(self.dense_stream, nano)

    @contextlib.contextmanager
    def _piece(self, stream: torch.cuda.Stream | None, nano: int):
        if stream is None:
            yield
            return
        previous, event = self.last[nano]
        if previous != stream:
            stream.wait_event(event)
        with torch.cuda.stream(stream):
            yield
        done = torch.cuda.Event()
        done.record(stream)
        self.last[nano] = (stream, done)

    def join(self):
        for stream, event in self.last:
            if stream != self.origin:
                self.origin.wait_event(event)


def split_decodes(input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context,
                  num: int = NANO_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor, Context]]:
    """A decode batch's inputs as `num` nano-batches of consecutive rows (views: graph buffers stay shared)."""
    bs = input_ids.size(0)
    bounds = [bs * i // num for i in range(num + 1)]
    return [(input_ids[a:b], positions[a:b],
             Context(is_prefill=False, slot_mapping=ctx.slot_mapping[a:b], context_lens=ctx.context_lens[a:b],
                     block_tables=ctx.block_tables[a:b]))
            for a, b in zip(bounds, bounds[1:])]


class SMPartitions:
    """A model runner's partitioned paths, and their CUDA graphs.

    `pipeline`: (attention, dense) partitions for decode-only batches of at least `pipeline_min_batch` sequences.
    `splits`: (decode, prefill) partitions for mixed steps, one pair per decode partition size, smallest first.
    Anything else runs as without partitions (runner.forward). Graphs are captured on the partitions' streams
    for the runner's graph batch sizes (for splits, the powers of two among them), sharing the runner's pool.
    `steps` counts the steps each path ran, and `split_steps` how often each split was chosen.
    """

    def __init__(self, runner, pipeline: tuple[Partition, Partition] | None = None,
                 splits: list[tuple[Partition, Partition]] = (), pipeline_min_batch: int = PIPELINE_MIN_BATCH):
        self.runner = runner
        self.pipeline = pipeline
        self.splits = sorted(splits, key=lambda pair: pair[0].sms)
        self.pipeline_min_batch = pipeline_min_batch
        self.cost = StepCost(runner.config.hf_config, runner.config.dtype)
        self.pipeline_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.split_graphs: list[dict[int, torch.cuda.CUDAGraph]] = [{} for _ in self.splits]
        self.steps = Counter()
        self.split_steps = [0] * len(self.splits)
        if runner.graphs:
            self._capture()

    @classmethod
    def from_config(cls, runner) -> "SMPartitions":
        spec, device = runner.config.sm_partitions, runner.device
        pipeline = split_sms(device, spec["attention_sms"]) if "attention_sms" in spec else None
        # Only a runner that prefills has mixed steps (in PD mode, the decode GPU never does).
        splits = [split_sms(device, sms) for sms in spec.get("decode_sms", ())] if runner.role == "both" else []
        return cls(runner, pipeline, splits, spec.get("pipeline_min_batch", PIPELINE_MIN_BATCH))

    def forward(self, inputs) -> torch.Tensor:
        """Like ModelRunner.forward: the hidden states of the rows the step samples (inputs: StepInputs)."""
        has_decodes, has_prefills = inputs.decode is not None, inputs.prefill is not None
        if has_decodes and has_prefills and self.splits:
            self.steps["side_by_side"] += 1
            return self._side_by_side(inputs)
        if self.pipeline and not has_prefills and has_decodes and inputs.decode.shape[1] >= self.pipeline_min_batch:
            self.steps["pipeline"] += 1
            return self._pipelined(inputs)
        return self.runner.forward(inputs)

    # ---- the attention/FFN pipeline ----

    def _pipelined(self, inputs) -> torch.Tensor:
        r, graphs = self.runner, self.pipeline_graphs
        input_ids, positions, ctx = r._decode_tensors(inputs)
        if graphs and input_ids.size(0) <= max(graphs):
            dense = self.pipeline[1].stream
            return side_by_side((dense, lambda: r.replay_graph(graphs, input_ids, positions, ctx)))[0]
        return self._interleaved(input_ids, positions, ctx)

    def _interleaved(self, input_ids, positions, ctx) -> torch.Tensor:
        attention, dense = self.pipeline
        lanes = Lanes(attention.stream, dense.stream, NANO_BATCHES)
        return self.runner.model.model.forward_interleaved(split_decodes(input_ids, positions, ctx), lanes)

    # ---- prefill beside decode ----

    def _side_by_side(self, inputs) -> torch.Tensor:
        r = self.runner
        k = self.choose_split(inputs)
        self.split_steps[k] += 1
        decode, prefill = self.splits[k]
        hidden = side_by_side((decode.stream, lambda: r.forward_decodes(inputs, self.split_graphs[k])),
                              (prefill.stream, lambda: r.forward_prefills(inputs, graphed=False)))
        return torch.cat(hidden)

    def choose_split(self, inputs) -> int:
        """The smallest decode partition with at least the decodes' share of the step's work (StepCost), so that
        both parts end about together: the step, which is the decodes' inter-token time, lasts as long as the
        slower part. Rebalances every step, as the mix of decode and prefill work changes."""
        decode = self.cost.decode(inputs)
        prefill = self.cost.prefill(inputs)
        for k, (part, rest) in enumerate(self.splits):
            if part.sms >= (part.sms + rest.sms) * decode / (decode + prefill):
                return k
        return len(self.splits) - 1

    # ---- CUDA graphs ----

    def graph_sets(self) -> list[dict[int, torch.cuda.CUDAGraph]]:
        return [self.pipeline_graphs, *self.split_graphs]

    @torch.inference_mode()  # as the runner's own capture; a caller outside it would capture autograd state
    def _capture(self):
        r, v = self.runner, self.runner.graph_vars
        sizes = sorted(r.graphs)
        if self.pipeline:
            dense = self.pipeline[1].stream
            for bs in reversed([size for size in sizes if size >= self.pipeline_min_batch]):
                inputs = r.graph_inputs(bs)
                side_by_side((dense, lambda: self._interleaved(*inputs)))  # warm-up, outside the capture
                self.pipeline_graphs[bs] = graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, r.graph_pool, stream=dense):
                    v["outputs"][:bs] = self._interleaved(*inputs)
        for (decode, _), graphs in zip(self.splits, self.split_graphs):
            for bs in reversed([size for size in sizes if size & (size - 1) == 0]):
                inputs = r.graph_inputs(bs)
                side_by_side((decode.stream, lambda: r.model(*inputs)))
                graphs[bs] = graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, r.graph_pool, stream=decode.stream):
                    v["outputs"][:bs] = r.model(*inputs)
        torch.cuda.synchronize(r.device)


class StepCost:
    """A step's work in seconds at unit HBM bandwidth: decode reads the weights once and each sequence's KV;
    prefill's matmuls and attention count as flops / MATMUL_PER_BYTE (the GPU's flop/s over its bytes/s), the
    cost model of the adaptive PD policy."""

    def __init__(self, hf, dtype: torch.dtype):
        # imported here: the scheduler imports config, which imports this module
        from nanovllm.engine.scheduler import MATMUL_PER_BYTE, model_sizes
        from nanovllm.models.decoder import head_dim_of
        self.matmul_per_byte = MATMUL_PER_BYTE
        self.params, self.kv_bytes_per_token = model_sizes(hf, dtype.itemsize)
        self.weight_bytes = self.params * dtype.itemsize
        # per (q, k) pair
        self.attention_flops_per_pair = 4 * hf.num_hidden_layers * hf.num_attention_heads * head_dim_of(hf)

    def decode(self, inputs) -> float:
        """Of a step's decodes (inputs: StepInputs; row 4 of `decode` holds the context lengths)."""
        if inputs.decode is None:
            return 0.0
        return self.weight_bytes + self.kv_bytes_per_token * float(inputs.decode[4].sum())

    def prefill(self, inputs) -> float:
        """Of a step's prompt chunks: the tokens [start, end) of each, over its context [0, end)."""
        if inputs.prefill is None:
            return 0.0
        new = np.diff(inputs.prefill["cu_seqlens_q"])
        end = np.diff(inputs.prefill["cu_seqlens_k"])
        pairs = float((new * (2 * end - new) / 2).sum())  # causal: (start + end) / 2 keys per new token
        return (2 * self.params * float(new.sum()) + self.attention_flops_per_pair * pairs) / self.matmul_per_byte
