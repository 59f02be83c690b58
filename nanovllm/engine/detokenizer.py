"""Stop strings, checked incrementally: each new token decodes a few tokens, not the whole completion."""
from dataclasses import dataclass

from nanovllm.engine.sequence import Sequence

CONTEXT_TOKENS = 4  # tokens decoded again before the new ones, so that merges across tokens come out right


@dataclass(frozen=True)
class StopState:
    """The completion's text so far, and where the first stop string starts in it (None: not yet)."""
    text: str = ""
    num_tokens: int = 0  # completion tokens the text covers
    read_offset: int = 0  # text up to this token is final; the ones after may still change (partial UTF-8)
    cut: int | None = None


class StopChecker:

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, seq: Sequence, token_id: int) -> StopState:
        """The state after `token_id` joins the known completion of `seq`. Pure: the caller commits it."""
        state = seq.detokenizer or StopState()
        num_tokens = state.num_tokens + 1
        assert seq.num_prompt_tokens + num_tokens == seq.num_tokens - seq.num_pending + 1
        prefix_start = max(0, state.read_offset - CONTEXT_TOKENS)
        tokens = seq.token_ids[seq.num_prompt_tokens + prefix_start:seq.num_prompt_tokens + num_tokens - 1] + [token_id]
        prefix = self._decode(tokens[:state.read_offset - prefix_start])
        full = self._decode(tokens)
        new_text, read_offset = "", state.read_offset
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # an incomplete character waits for the next
            new_text, read_offset = full[len(prefix):], num_tokens
        text = state.text + new_text
        longest = max(map(len, seq.params.stop))
        search_from = max(0, len(state.text) - longest + 1)
        cuts = [i for i in (text.find(stop, search_from) for stop in seq.params.stop) if i != -1]
        return StopState(text, num_tokens, read_offset, min(cuts) if cuts else None)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def special_token_texts(tokenizer) -> list[str]:
    """The special tokens' texts: the completion's text leaves them out (skip_special_tokens)."""
    return [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]


def check_stop_strings(stop: list[str], special_texts: list[str]):
    """A stop string that holds a special token could never match the text, and generation would run past it."""
    for string in stop:
        for special in special_texts:
            if special in string:
                raise ValueError(f"stop string {string!r} holds the special token {special!r}, which the completion's "
                                 f"text leaves out, so it could never match; generation already ends at the "
                                 f"model's end-of-sequence tokens (generation_config.json's eos_token_id)")
