"""A completion's text, built incrementally: each new token decodes a few tokens, not the whole completion.
The engine uses it for stop strings (StopChecker); step() users stream text with it (TextStream)."""
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
        new_text = read_new_text(self.tokenizer, tokens, state.read_offset - prefix_start)
        read_offset = state.read_offset if new_text is None else num_tokens
        text = state.text + (new_text or "")
        longest = max(map(len, seq.params.stop))
        search_from = max(0, len(state.text) - longest + 1)
        cuts = [i for i in (text.find(stop, search_from) for stop in seq.params.stop) if i != -1]
        return StopState(text, num_tokens, read_offset, min(cuts) if cuts else None)


def read_new_text(tokenizer, tokens: list[int], num_read: int) -> str | None:
    """The text that `tokens` after the first `num_read` add to the text of those (which is already known), or
    None while it is not final: it ends in an incomplete UTF-8 character, which waits for the next token. The
    tokens before the new ones are decoded again so that merges across tokens come out right."""
    prefix = tokenizer.decode(tokens[:num_read], skip_special_tokens=True)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):]
    return None


class TextStream:
    """One request's completion as text, as its tokens come out of `LLMEngine.step()` (get one from
    `LLMEngine.text_stream(request_id)`). `push(output)` returns the text that is now final: it holds back an
    incomplete UTF-8 character, and the text that could still begin one of the request's stop strings (the
    engine cuts those from the completion). Pushed the request's last output, it returns the rest of the
    engine's own text, so the pieces always add up to `StepOutput.text`."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.tokenizer = tokenizer
        self.hold_back = max(map(len, stop)) - 1 if stop else 0  # a stop string still incomplete fits in this
        self.token_ids: list[int] = []
        self.read_offset = 0  # tokens whose text is in self.text
        self.text = ""  # the completion's text so far
        self.sent = 0  # characters of it returned so far

    def push(self, output) -> str:
        if output.finished:
            rest = (output.text or "")[self.sent:]
            self.sent += len(rest)
            return rest
        if output.new_token_id is None:
            return ""
        self.token_ids.append(output.new_token_id)
        start = max(0, self.read_offset - CONTEXT_TOKENS)
        new_text = read_new_text(self.tokenizer, self.token_ids[start:], self.read_offset - start)
        if new_text is not None:
            self.text += new_text
            self.read_offset = len(self.token_ids)
        end = max(self.sent, len(self.text) - self.hold_back)
        piece, self.sent = self.text[self.sent:end], end
        return piece


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
