import math
from dataclasses import dataclass, field

# Below this, logits / T can overflow fp32 to inf (several tokens tie at inf and argmax picks the first),
# and sampling differs from argmax only between tokens whose logits are within ~1e-4, i.e. rounding
# noise: such a temperature means greedy.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token. temperature=0 (or below MIN_TEMPERATURE) is greedy (exactly argmax)."""
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop: list[str] | None = field(default=None)  # stop strings; the match is cut from the text

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise TypeError/ValueError naming the field. The engine calls this again when a request is added,
        because the fields may have been changed since construction."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_type("temperature", self.temperature, (int, float), "a number")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check_type("max_tokens", self.max_tokens, int, "an int")
        _check(self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check_type("ignore_eos", self.ignore_eos, bool, "a bool")
        _check_type("top_p", self.top_p, (int, float), "a number")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_type("top_k", self.top_k, int, "an int")
        _check(self.top_k >= -1, f"top_k must be an int >= -1 (-1 or 0 disables it), got {self.top_k!r}")
        if self.seed is not None:
            _check_type("seed", self.seed, int, "an int or None")
        if self.stop is not None:
            _check(isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop),
                   f"stop must be a string or a list of strings, got {self.stop!r}", TypeError)
            _check(all(self.stop), f"stop strings must not be empty, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _check_type(name: str, value, types, expected: str):
    # bool is a subclass of int, but True as a top_k or a temperature is a mistake, not a number.
    wrong = not isinstance(value, types) or (isinstance(value, bool) and types is not bool)
    _check(not wrong, f"{name} must be {expected}, got {type(value).__name__} {value!r}", TypeError)


def _check(ok: bool, message: str, error: type[Exception] = ValueError):
    if not ok:
        raise error(message)
