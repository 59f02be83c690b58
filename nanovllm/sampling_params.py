from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token. temperature=0 is greedy (exactly argmax)."""
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop: list[str] | None = field(default=None)  # stop strings; the match is cut from the text

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
               and self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1,
               f"top_k must be an int >= -1 (-1 or 0 disables it), got {self.top_k!r}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}")
        _check(self.stop is None or (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop)),
               f"stop must be a non-empty string or a list of them, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)
