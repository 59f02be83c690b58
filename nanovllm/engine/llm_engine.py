import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.model_runner import KVTransfer, ModelRunner, PendingTokens
from nanovllm.engine.scheduler import Scheduler
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


@dataclass
class StepOutput:
    """What one step did for one request. `token_ids` (the whole completion) is set once it finishes."""
    request_id: int
    new_token_id: int
    finished: bool
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    text: str | None = None  # set when a stop string cut the completion's text


class LLMEngine:
    """Owns the scheduler and the model runner(s) and drives the step loop.

    Single-device mode: each step is a prefill or a decode batch on one runner.
    PD mode (enable_two_gpu_pd): a prefill runner and a decode runner work at the same time. The
    prefill batch is launched without waiting for it; decode steps keep running while it computes; when
    it is done its KV is copied to the decode device on side streams, and each sequence joins the decode
    batch once its copy has completed. The host blocks only when it has nothing else to do.
    """

    def __init__(self, model: str, **kwargs):
        known = {f.name for f in dataclasses.fields(Config)} - {"model", "hf_config", "eos"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        config = Config(model, **kwargs)
        self.config = config
        self.tokenizer = _load_tokenizer(config.model)
        config.eos = _eos_token_id(config, self.tokenizer)
        if config.enable_two_gpu_pd:
            prefill_blocks = config.num_prefill_kv_cache_blocks
            if prefill_blocks <= 0:
                prefill_blocks = config.num_kv_cache_blocks
            self.prefill_runner = ModelRunner(config, config.prefill_device_id, prefill_blocks, role="prefill")
            self.decode_runner = ModelRunner(config, config.decode_device_id, config.num_kv_cache_blocks,
                                             role="decode")
            self.scheduler = Scheduler(config, self.decode_runner.num_kv_blocks, self.prefill_runner.num_kv_blocks,
                                       is_stopped=self._hit_stop_string)
        else:
            self.model_runner = ModelRunner(config, config.device, config.num_kv_cache_blocks)
            self.scheduler = Scheduler(config, self.model_runner.num_kv_blocks, is_stopped=self._hit_stop_string)
        self.prefill_in_flight: tuple[list[Sequence], PendingTokens] | None = None
        self.transfers: list[tuple[KVTransfer, list[Sequence]]] = []
        self.stats = dict(prefill_tokens=0, decode_tokens=0, kv_bytes=0, kv_copies=0, kv_seconds=0.0)

    # ---- requests ----

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Raises ValueError/TypeError for input it cannot serve."""
        token_ids = self._encode(prompt)
        return self._add(token_ids, sampling_params or SamplingParams())

    def _add(self, token_ids: list[int], params: SamplingParams) -> int:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        seq = Sequence(token_ids, params, self.config.kv_cache_block_size)
        self.scheduler.add(seq)
        return seq.seq_id

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

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def close(self):
        """Stop the processes of the other tensor-parallel ranks, after which the engine cannot run. Also done
        at exit and when the engine is garbage-collected; a no-op without tensor parallelism."""
        if hasattr(self, "model_runner"):
            self.model_runner.close()

    # ---- the step loop ----

    def step(self) -> list[StepOutput]:
        """Advance every request that can advance by one token."""
        if self.config.enable_two_gpu_pd:
            return self._step_pd()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            self._check_not_stalled()
            return []
        token_ids = self.model_runner.run(seqs, is_prefill)
        self._count(seqs, is_prefill)
        return self._postprocess(seqs, token_ids)

    def _step_pd(self) -> list[StepOutput]:
        outputs = []
        can_block = not self.scheduler.running  # with nothing to decode, waiting costs nothing
        if self.prefill_in_flight and (can_block or self.prefill_in_flight[1].done()):
            outputs += self._finish_prefill()
        for transfer in list(self.transfers):
            kv_transfer, seqs = transfer
            if can_block and not self.prefill_in_flight:
                kv_transfer.wait()
            if kv_transfer.done():
                self.transfers.remove(transfer)
                self.scheduler.finish_transfer(seqs)
                self.stats["kv_seconds"] += kv_transfer.seconds()
        if not self.prefill_in_flight:
            seqs = self.scheduler.schedule_prefill()
            if seqs:
                self.prefill_in_flight = seqs, self.prefill_runner.launch(seqs, is_prefill=True)
        seqs = self.scheduler.schedule_decode()
        if seqs:
            token_ids = self.decode_runner.run(seqs, is_prefill=False)
            self._count(seqs, is_prefill=False)
            outputs += self._postprocess(seqs, token_ids)
        elif not outputs and not self.prefill_in_flight and not self.transfers:
            self._check_not_stalled()
        return outputs

    def _check_not_stalled(self):
        """Nothing ran and nothing is in flight: unless every request is done, that is a bug, not a wait."""
        if not self.is_finished():
            raise RuntimeError("the scheduler could schedule nothing although requests are pending")

    def _finish_prefill(self) -> list[StepOutput]:
        seqs, pending = self.prefill_in_flight
        self.prefill_in_flight = None
        token_ids = pending.get()
        self._count(seqs, is_prefill=True)
        outputs = self._postprocess(seqs, token_ids)
        moving = self.scheduler.get_prefilled_sequences()
        if moving:
            kv_transfer = self.prefill_runner.sync_kv_cache_to(self.decode_runner,
                                                               self.scheduler.transfer_pairs(moving))
            self.stats["kv_bytes"] += kv_transfer.nbytes
            self.stats["kv_copies"] += kv_transfer.num_copies
            self.transfers.append((kv_transfer, moving))
        return outputs

    def _postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[StepOutput]:
        self.scheduler.postprocess(seqs, token_ids)
        return [StepOutput(seq.seq_id, token_id, seq.is_finished, seq.finish_reason,
                           seq.completion_token_ids if seq.is_finished else None, seq.text)
                for seq, token_id in zip(seqs, token_ids)]

    def _count(self, seqs: list[Sequence], is_prefill: bool):
        if is_prefill:
            self.stats["prefill_tokens"] += sum(len(seq) - seq.num_cached_tokens for seq in seqs)
        else:
            self.stats["decode_tokens"] += len(seqs)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Cut the completion at the first stop string, if one has appeared."""
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(stop) for stop in seq.params.stop) if i != -1]
        if cuts:
            seq.text = text[:min(cuts)]
        return bool(cuts)

    # ---- the offline API ----

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Run prompts to completion; returns {"text", "token_ids", "finish_reason"} per prompt, in order."""
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
        params = [p or SamplingParams() for p in params]
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        encoded = [self._encode(prompt) for prompt in prompts]  # all checked before any is queued
        request_ids = [self._add(token_ids, p) for token_ids, p in zip(encoded, params)]
        results = {}
        progress = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        start, tokens = time.perf_counter(), 0
        while not self.is_finished():
            outputs = self.step()
            tokens += len(outputs)
            for out in outputs:
                if out.finished:
                    results[out.request_id] = out
                    progress.update(1)
            progress.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
        progress.close()
        return [self._result(results[i]) for i in request_ids]

    def _result(self, out: StepOutput) -> dict:
        text = out.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return {"text": text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _load_tokenizer(model_dir: str):
    if not any(os.path.exists(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        logger.warning(f"no tokenizer in {model_dir!r}: prompts must be token ids and outputs have no text")
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def _eos_token_id(config: Config, tokenizer) -> int:
    eos = getattr(config.hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return -1 if eos is None else eos
