from copy import copy
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams

PENDING = -1  # a token sampled on the device whose value the host has not read yet


class SequenceStatus(Enum):
    WAITING = auto()     # queued: not yet admitted, or sent back to be recomputed (preempted, failed step)
    PREFILLING = auto()  # holds KV blocks on its worker; its prompt is computed, in one or more chunks
    DECODING = auto()    # from the step that completes its prompt on: one token per step on its worker
    MIGRATING = auto()   # its KV is being copied to another worker, where it decodes once the copy is done
    FINISHED = auto()


class Sequence:
    """One request: its tokens, where its KV lives, and why it stopped.

    Steps run ahead of the host: a step is launched before the previous one's tokens are read, so a sequence
    may end in PENDING tokens (as many as its worker has steps in flight), filled in (`resolve`) as their steps
    are collected.
    """
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence.counter)
        self.status = SequenceStatus.WAITING
        self.token_ids = copy(token_ids)
        self.num_tokens = len(token_ids)  # len(token_ids), kept as a field: the scheduler reads it very often
        self.num_prompt_tokens = len(token_ids)
        self.num_pending = 0  # trailing PENDING tokens
        self.num_computed_tokens = 0  # tokens whose KV is written or being written by launched steps
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.num_hashed_blocks = 0  # leading blocks named in the prefix cache (see BlockManager.cache_blocks)
        self.block_size = block_size
        self.worker: int | None = None  # the worker whose KV cache holds this sequence
        self.block_table: list[int] = []  # its KV blocks on that worker
        self.migration: tuple[int, list[int]] | None = None  # (destination worker, its blocks) while MIGRATING
        self.sampled_row = -1  # row of its newest PENDING token in its worker's latest step output
        self.sampled_batch = 0  # number of the worker's batch that samples its newest PENDING token
        self.epoch = 0  # bumped whenever the sequence is reset, so results of steps launched before are dropped
        self.num_failures = 0  # consecutive failed steps it was part of
        self.params = sampling_params
        self.finish_reason: str | None = None  # "stop", "length", "abort" or "error"
        self.error: str | None = None
        self.text: str | None = None  # set when a stop string cut the completion
        self.detokenizer = None  # incremental detokenizer state, for stop strings (see engine/detokenizer.py)

    def __len__(self):
        return self.num_tokens

    def __getitem__(self, key):
        return self.token_ids[key]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_tokens - self.num_pending]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size: (i + 1) * self.block_size]

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)
        self.num_tokens += 1

    def append_pending(self):
        self.token_ids.append(PENDING)
        self.num_tokens += 1
        self.num_pending += 1

    def resolve(self, token_id: int):
        """The oldest PENDING token turned out to be `token_id`."""
        self.token_ids[self.num_tokens - self.num_pending] = token_id
        self.num_pending -= 1

    def drop_pending(self):
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_tokens -= self.num_pending
            self.num_pending = 0

    def reset(self):
        """Forget all KV: back to WAITING, to be recomputed from its known tokens."""
        self.drop_pending()
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = self.num_cached_tokens = self.num_hashed_blocks = 0
        self.worker, self.block_table, self.migration, self.sampled_row = None, [], None, -1
        self.epoch += 1
