import contextlib
import copy
import dataclasses
import gc
import logging
import numbers
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import StopChecker, TextStream, check_stop_strings, special_token_texts
from nanovllm.engine.kv_transfer import KVTransfer
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Batch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[nanovllm] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(slots=True)
class StepOutput:
    """What one step did for one request. `token_ids` (the whole completion) is set once it finishes."""
    request_id: int
    new_token_id: int | None  # None when the request ended without a new token (aborted, failed)
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    token_ids: list[int] | None = None
    text: str | None = None  # the completion's text, once finished (cut at a stop string); None without a tokenizer
    error: str | None = None  # why it failed, for finish_reason "error"


@dataclass
class Worker:
    """One device: its model runner and the steps launched there whose tokens are not collected yet."""
    runner: ModelRunner
    in_flight: deque  # of (Batch, PendingTokens | None), oldest first
    prompt_tokens: int = 0  # prompt tokens computed here, in committed steps (PD: which GPU prefills)
    launch_seconds: float = 0.0  # host time spent launching steps here (in PD one thread launches for both GPUs)
    longest_launch: float = 0.0  # seconds: a launch that long held the engine's thread, and every other GPU

    def note_launch(self, seconds: float):
        self.launch_seconds += seconds
        self.longest_launch = max(self.longest_launch, seconds)


class LLMEngine:
    """Owns the scheduler and one worker per device, and drives the step loop.

    Each step launches the next batch on every worker without waiting (so a device always has work queued
    while the host prepares more), then collects whatever finished: sampled tokens, and KV copies between
    workers. The scheduler's policy decides what runs where (single device, PD static or adaptive).
    A step that fails or is interrupted is rolled back: its sequences go back to be recomputed, nothing else
    changes, and the exception propagates.
    """

    def __init__(self, model: str, **kwargs):
        _unfreeze_heap()  # an engine dropped while it had work may be garbage now: let the collector see it
        self.closed = False
        self.init_config(model, kwargs)
        self.init_tokenizer()
        self.init_workers()
        self.init_scheduler()
        self.requests: dict[int, Sequence] = {}  # accepted and not yet reported finished
        # Outputs step() has not returned yet: requests that ended outside a step (aborted, failed), and those of
        # steps committed during a step() call that then raised (the next call returns them).
        self.undelivered: list[StepOutput] = []
        self.transfers: list[tuple[KVTransfer, list[Sequence]]] = []
        # wait_seconds: host time blocked until a step or copy was done (the rest of step() is the host's work)
        self.stats = dict(prefill_tokens=0, decode_tokens=0, kv_bytes=0, kv_copies=0, kv_seconds=0.0, wait_seconds=0.0)

    def init_config(self, model: str, kwargs: dict):
        # Fields that are not init arguments (eos_token_ids, kv_via_host) are the engine's to set, as is hf_config.
        known = {f.name for f in dataclasses.fields(Config) if f.init} - {"model", "hf_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        self.config = Config(model, **kwargs)

    def init_tokenizer(self):
        self.tokenizer = _load_tokenizer(self.config.model)
        self.config.eos_token_ids = _eos_token_ids(self.config, self.tokenizer)
        self.special_token_texts = special_token_texts(self.tokenizer) if self.tokenizer is not None else []

    def init_workers(self):
        c = self.config
        if not c.enable_two_gpu_pd:
            self.workers = [Worker(ModelRunner(c, c.device, c.num_kv_cache_blocks), deque())]
            return
        prefill_blocks = c.num_prefill_kv_cache_blocks if c.num_prefill_kv_cache_blocks > 0 else c.num_kv_cache_blocks
        # Static: worker 0 only prefills; worker 1 decodes, and prefills under a backlog (scheduler.py's policies).
        roles = ("prefill", "both") if c.pd_policy == "static" else ("both", "both")
        self.workers = [Worker(ModelRunner(c, c.prefill_device_id, prefill_blocks, role=roles[0]), deque()),
                        Worker(ModelRunner(c, c.decode_device_id, c.num_kv_cache_blocks, role=roles[1]), deque())]

    def init_scheduler(self):
        block_managers = [BlockManager(w.runner.num_kv_blocks, self.config.kv_cache_block_size,
                                       enable_prefix_caching=i == 0) for i, w in enumerate(self.workers)]
        check_stop = StopChecker(self.tokenizer) if self.tokenizer is not None else None
        self.scheduler = Scheduler(self.config, block_managers, check_stop)

    @property
    def runners(self) -> list[ModelRunner]:
        return [w.runner for w in self.workers]

    @property
    def model_runner(self) -> ModelRunner:
        return self.workers[0].runner

    @property
    def prefill_runner(self) -> ModelRunner:
        return self.workers[0].runner

    @property
    def decode_runner(self) -> ModelRunner:
        return self.workers[-1].runner

    # ---- requests ----

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Raises ValueError/TypeError for input it cannot serve."""
        params = self._check_params(sampling_params)
        return self._add(self._encode(prompt), params)

    def _add(self, token_ids: list[int], params: SamplingParams) -> int:
        if self.closed:  # its tensor-parallel ranks are gone: a request would only fail, step after step
            raise RuntimeError("this engine is closed; build another LLM to run more requests")
        seq = Sequence(token_ids, params, self.config.kv_cache_block_size)
        self.scheduler.add(seq)
        self.requests[seq.seq_id] = seq
        return seq.seq_id

    def _check_params(self, params: SamplingParams | None) -> SamplingParams:
        """None means the defaults. The request gets a checked copy: params changed later cannot reach it."""
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams or None, got {_describe(params)}")
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.config.model!r} has none: "
                             f"stop={params.stop!r} could never match")
        if params.stop:
            check_stop_strings(params.stop, self.special_token_texts)
        return copy.deepcopy(params)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model!r} has no tokenizer: pass token ids instead of text")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
        else:
            raise TypeError(f"a prompt must be a str or a list of token ids (ints), got {_describe(prompt)}")
        vocab_size = self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.config.max_model_len}, "
                             f"which must leave room for at least one generated token")
        if not all(0 <= t < vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        return token_ids

    def text_stream(self, request_id: int) -> TextStream:
        """A TextStream for a queued request: push it each of the request's StepOutputs, and it returns the new
        text that is final (see engine/detokenizer.py)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model!r} has no tokenizer: a completion has no text to stream")
        seq = self.requests.get(_request_id(request_id))
        if seq is None:
            raise ValueError(f"request_id {request_id!r}: no such request in flight (ask right after add_request)")
        return TextStream(self.tokenizer, seq.params.stop)

    def abort_request(self, request_id: int) -> bool:
        """Stop a request now and free its KV; the next step() reports it finished with reason "abort".
        Returns False if it is unknown or already finished."""
        seq = self.requests.get(_request_id(request_id))
        if seq is None or seq.is_finished:
            return False
        with _sigint_deferred():
            self.scheduler.abort(seq)
            self._report(seq)
        self._unfreeze_heap_if_idle()
        return True

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and not self.undelivered

    def close(self):
        """Stop the processes of the other tensor-parallel ranks; the engine takes no new requests after. The
        ranks are also stopped at exit and when the engine is garbage-collected."""
        self.closed = True
        _unfreeze_heap(self)
        for worker in getattr(self, "workers", []):
            worker.runner.close()

    # ---- the step loop ----

    def step(self) -> list[StepOutput]:
        """Launch the next step on every worker, then collect what is done. Some tokens arrive one step late."""
        _freeze_heap(self)
        try:
            with self._rollback_on_failure():
                launched = self._launch()
                collected = self._collect()
                if not launched and not collected and not self._in_flight():
                    self._check_not_stalled()
        finally:
            self._unfreeze_heap_if_idle()  # a step that failed its last request leaves the engine idle too
        outputs, self.undelivered = self.undelivered, []
        return outputs

    def _unfreeze_heap_if_idle(self):
        if self.scheduler.is_finished():
            _unfreeze_heap(self)

    def _launch(self) -> bool:
        launched = False
        depths = [self.scheduler.pipeline_depth(worker_id) for worker_id in range(len(self.workers))]
        # The deepest queue launches first: it is kept deep because a prompt step is about to hold the host.
        for worker_id in sorted(range(len(self.workers)), key=lambda w: -depths[w]):
            worker = self.workers[worker_id]
            while len(worker.in_flight) < depths[worker_id]:
                with _sigint_deferred():
                    batch = self.scheduler.schedule(worker_id)
                    if not batch:
                        break
                    worker.in_flight.append([batch, None])  # known before launch, so a failure there rolls it back
                start = time.perf_counter()
                worker.in_flight[-1][1] = worker.runner.launch(batch)
                worker.note_launch(time.perf_counter() - start)
                launched = True
        return launched

    def _collect(self) -> bool:
        """Wait until a step or copy in flight is done, then commit every one that is."""
        if not self._any_done():
            start = time.perf_counter()
            self._wait_any()
            self.stats["wait_seconds"] += time.perf_counter() - start
        collected = False
        for transfer in [t for t in self.transfers if t[0].done()]:
            self._retire_transfer(transfer)
            collected = True
        for worker in self.workers:
            while worker.in_flight and worker.in_flight[0][1].done():
                self._commit(worker)
                collected = True
        self._start_transfers()
        return collected

    def _commit(self, worker: Worker):
        batch, pending = worker.in_flight[0]
        token_ids = pending.get()
        results = self.scheduler.check_results(batch, token_ids)
        with _sigint_deferred():
            worker.in_flight.popleft()
            self.scheduler.apply_results(batch, results)
            self._count(batch)
            # Kept on the engine, not returned: should a later commit in this step() fail, they still come out.
            self.undelivered += [self._output(seq, token_id) for seq, token_id, _, _ in results]

    def _output(self, seq: Sequence, token_id: int | None) -> StepOutput:
        if not seq.is_finished:
            return StepOutput(seq.seq_id, token_id, False)
        self.requests.pop(seq.seq_id, None)
        token_ids = seq.completion_token_ids
        return StepOutput(seq.seq_id, token_id, True, seq.finish_reason, token_ids, self._text(seq, token_ids),
                          seq.error)

    def _text(self, seq: Sequence, token_ids: list[int]) -> str | None:
        """What generate() returns as text, so that step() users get the same: the stop-cut text, else all of it."""
        if seq.text is not None or self.tokenizer is None:
            return seq.text
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _report(self, seq: Sequence):
        """A request ended outside a step: deliver its output with the next step."""
        self.undelivered.append(self._output(seq, None))

    def _start_transfers(self):
        """Start the KV copies of sequences that move between workers, one transfer per route."""
        with _sigint_deferred():
            routes = {}
            for seq, pairs in self.scheduler.start_migrations():
                seqs, all_pairs = routes.setdefault((seq.worker, seq.migration[0]), ([], []))
                seqs.append(seq)
                all_pairs.extend(pairs)
            first = len(self.transfers)
            self.transfers += [(None, seqs) for seqs, _ in routes.values()]  # known before they start, for rollback
        for i, ((src, dst), (seqs, pairs)) in enumerate(routes.items(), start=first):
            transfer = self._copy(src, dst, pairs, self.scheduler.copy_after(seqs))
            self.transfers[i] = (transfer, seqs)
            self.stats["kv_bytes"] += transfer.nbytes
            self.stats["kv_copies"] += transfer.num_copies

    def _copy(self, src_id: int, dst_id: int, pairs: list[tuple[int, int]], after_step: int) -> KVTransfer:
        """Start copying blocks `pairs` from worker src_id to dst_id once source step `after_step` (0: none) has
        written them. (On the CPU a launch runs its whole step, so the KV is written already.)"""
        src, dst = self.runners[src_id], self.runners[dst_id]
        if not src.is_cuda:
            return KVTransfer(src.kv_cache, dst.kv_cache, pairs)
        # Each side waits only for the steps that write the blocks it copies, not for every step queued there:
        # the source's next prompt step (tens of ms) or a deep decode queue would hold the copy back. On the
        # source that is the step computing the sequences' pending tokens; on the destination, the steps that may
        # still write its (recycled) blocks.
        self._wait_for_step(src.copy_stream, src_id, lambda number: number == after_step)
        last_step = self.scheduler.block_managers[dst_id].last_step_writing([d for _, d in pairs])
        self._wait_for_step(dst.copy_stream, dst_id, lambda number: number <= last_step)
        return KVTransfer(src.kv_cache, dst.kv_cache, pairs, (src.copy_stream, dst.copy_stream),
                          via_host=self.config.kv_via_host)

    def _wait_for_step(self, stream: torch.cuda.Stream, worker_id: int, writes: Callable[[int], bool]):
        """Make `stream` wait for the latest step in flight on the worker whose number `writes` accepts."""
        writers = [pending for batch, pending in self.workers[worker_id].in_flight
                   if writes(batch.number) and pending is not None]
        if writers:
            stream.wait_event(writers[-1].event)

    def _retire_transfer(self, transfer: tuple[KVTransfer, list[Sequence]]):
        kv_transfer, seqs = transfer
        with _sigint_deferred():
            for seq in seqs:
                self.scheduler.finish_migration(seq)
            self.transfers.remove(transfer)  # last: should the hand-over fail, rollback still sees the copy
            self.stats["kv_seconds"] += kv_transfer.seconds()

    def _in_flight(self) -> bool:
        return bool(self.transfers) or any(w.in_flight for w in self.workers)

    def _any_done(self) -> bool:
        return (not self._in_flight() or any(t.done() for t, _ in self.transfers)
                or any(w.in_flight and w.in_flight[0][1].done() for w in self.workers))

    def _wait_any(self):
        """Block until a step or copy is done: directly when only one thing is pending, else by polling."""
        pending = [w.in_flight[0][1] for w in self.workers if w.in_flight] + [t for t, _ in self.transfers]
        if len(pending) == 1:
            pending[0].wait()
            return
        while not any(p.done() for p in pending):
            time.sleep(20e-6)

    def _check_not_stalled(self):
        """Nothing ran and nothing is in flight: unless every request is done, that is a bug, not a wait."""
        if not self.scheduler.is_finished():
            raise RuntimeError("the scheduler could schedule nothing although requests are pending")

    def _count(self, batch: Batch):
        prompt_tokens = sum(end - start for _, start, end in batch.prefills)
        self.stats["prefill_tokens"] += prompt_tokens
        self.workers[batch.worker].prompt_tokens += prompt_tokens
        self.stats["decode_tokens"] += len(batch.decodes)

    @contextlib.contextmanager
    def _rollback_on_failure(self):
        try:
            yield
        except BaseException as error:
            with _sigint_deferred():
                self._rollback(error)
            raise

    def _rollback(self, error: BaseException):
        """Undo every step and copy in flight: their sequences are recomputed; devices are drained first, so
        nothing still writes to the blocks that are freed."""
        for runner in self.runners:
            with contextlib.suppress(Exception):
                runner.drain()
        batches = [batch for w in self.workers for batch, _ in w.in_flight]
        migrations = [seq for _, seqs in self.transfers for seq in seqs]
        for w in self.workers:
            w.in_flight.clear()
        self.transfers.clear()
        for seq in self.scheduler.rollback(batches, error, migrations):
            self._report(seq)
        logger.warning(f"step failed ({type(error).__name__}); {len(batches)} step(s) and {len(migrations)} "
                       f"migrating sequence(s) rolled back, to be recomputed")

    # ---- the offline API ----

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Run prompts to completion; returns {"text", "token_ids", "finish_reason"} per prompt, in order.
        If it fails or is interrupted, its requests are aborted before the exception propagates."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of prompts, got {_describe(prompts)}")
        if not prompts:
            raise ValueError("generate() got an empty list of prompts")
        if all(isinstance(p, int) for p in prompts):
            raise TypeError("got a flat list of ints: pass token-id prompts as a list of lists, e.g. [[1, 2, 3]]")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        params = [self._check_params(p) for p in params]
        encoded = [self._encode(prompt) for prompt in prompts]  # all checked before any is queued
        request_ids = []
        try:
            with _sigint_deferred():  # Ctrl-C waits until all are queued, and so are aborted below
                request_ids += [self._add(token_ids, p) for token_ids, p in zip(encoded, params)]
            results = self._run_to_completion(request_ids, use_tqdm)
        except BaseException:
            with _sigint_deferred():  # a second Ctrl-C must not leave half of them queued
                for request_id in request_ids:
                    self.abort_request(request_id)
                mine = set(request_ids)
                self.undelivered = [out for out in self.undelivered if out.request_id not in mine]
            raise
        return [self._result(results[i]) for i in request_ids]

    def _run_to_completion(self, request_ids: list[int], use_tqdm: bool) -> dict[int, StepOutput]:
        mine, results, others = set(request_ids), {}, []
        progress = tqdm(total=len(request_ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start, tokens = time.perf_counter(), 0
        try:
            while len(results) < len(request_ids):
                outputs = self.step()
                tokens += len(outputs)
                for out in outputs:
                    if out.request_id not in mine:
                        others.append(out)
                    elif out.finished:
                        results[out.request_id] = out
                        progress.update(1)
                progress.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
        finally:
            progress.close()
            # Requests added with add_request() also ran: their outputs are for the caller's next step().
            self.undelivered = others + self.undelivered
        return results

    def _result(self, out: StepOutput) -> dict:
        result = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
        if out.error is not None:
            result["error"] = out.error
        return result


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C back while engine state is being changed, so that it lands between changes, never inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])


def _request_id(request_id) -> int:
    """An id as add_request() returned it (numpy integers too); a bool is refused: True would name request 1."""
    if not isinstance(request_id, numbers.Integral) or isinstance(request_id, bool):
        raise TypeError(f"request_id must be an int, as add_request() returned it, got {_describe(request_id)}")
    return int(request_id)


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _load_tokenizer(model_dir: str):
    if not any(os.path.exists(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        logger.warning(f"no tokenizer in {model_dir!r}: prompts must be token ids and outputs have no text")
        return None
    return AutoTokenizer.from_pretrained(model_dir)


_heap_frozen_for = None  # (weak reference to the engine whose work holds the heap frozen, whether we froze it)
# What was frozen before this module was imported is not the user's doing: Python 3.12 starts with a few hundred
# objects of its own frozen (375 on 3.12.1), and a heap "found frozen" by that count alone was never frozen by us.
_FROZEN_AT_IMPORT = gc.get_freeze_count()


def _freeze_heap(engine: "LLMEngine"):
    """Keep Python's cycle collector off every object alive now, while `engine` has work (gc.freeze).

    With torch and transformers loaded, a process tracks a few hundred thousand objects, and a full collection
    walks them all: 0.17 s between two steps on a 2-core CPU (benchmarks/step_trace.py --device cpu), and likely
    the one 0.35 s idle gap of an H200 trace; it comes once or more per run, whenever enough new objects have
    survived. Frozen, a full collection walks only what the run created. Given back (`_unfreeze_heap`) once the
    engine is idle or closed, or freed, or when another engine is built, so that nothing that dies later is kept
    from the collector for long. A heap the user froze (after importing nanovllm) is left as it is: found frozen at
    the start of a busy period (gc.get_freeze_count walks the frozen objects, so it is asked once per busy period,
    not per step)."""
    global _heap_frozen_for
    if _heap_frozen_for is None:
        ours = gc.get_freeze_count() <= _FROZEN_AT_IMPORT
        if ours:
            gc.freeze()
        _heap_frozen_for = (weakref.ref(engine, lambda _: _unfreeze_heap()), ours)  # also if it is freed mid-run


def _unfreeze_heap(engine: "LLMEngine | None" = None):
    """Undo _freeze_heap, if it froze the heap for `engine` (None: for whichever engine)."""
    global _heap_frozen_for
    if _heap_frozen_for is not None and (engine is None or _heap_frozen_for[0]() is engine):
        if _heap_frozen_for[1]:
            gc.unfreeze()
        _heap_frozen_for = None


def _eos_token_ids(config: Config, tokenizer) -> tuple[int, ...]:
    """Every end-of-sequence id the checkpoint names: generation_config.json's list (Qwen3 has two),
    config.json's, and the tokenizer's."""
    ids = []
    if os.path.exists(os.path.join(config.model, "generation_config.json")):
        ids.append(GenerationConfig.from_pretrained(config.model).eos_token_id)
    ids.append(getattr(config.hf_config, "eos_token_id", None))
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
    flat = []
    for eos in ids:
        flat.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    return tuple(dict.fromkeys(e for e in flat if isinstance(e, int)))
