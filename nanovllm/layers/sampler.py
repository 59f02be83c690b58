import torch
import xxhash

from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.compile import compile_on_cuda
from nanovllm.utils.context import to_device


class Sampler:
    """Greedy rows take argmax; the others sample from softmax(logits / T) after top-k and top-p cuts.

    Sampling is the Gumbel-max trick, argmax(logits / T - log E) with E = -log U ~ Exp(1), which draws
    exactly from the softmax without computing it: on CUDA one fused pass whose uniform noise is generated
    inside the kernel, never written to memory. A request with a seed draws its noise from a generator
    seeded by (seed, position), so its tokens do not depend on what else is in the batch or on which
    device runs it.
    """

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        device = logits.device
        temperatures = to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, device)
        if any(0 < p.top_k < logits.size(1) or p.top_p < 1 for p in params):
            logits = logits.float() / temperatures.unsqueeze(1)
            temperatures = torch.ones_like(temperatures)
            vocab_size = logits.size(1)
            if any(0 < p.top_k < vocab_size for p in params):  # a top_k past the vocabulary cuts nothing
                logits = _top_k(logits, [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params])
            if any(p.top_p < 1 for p in params):
                logits = _top_p(logits, to_device([p.top_p for p in params], torch.float32, device))
        sampled = _gumbel_argmax(logits, temperatures)
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
        if seeded:
            noise = torch.empty((len(seeded), logits.size(1)), dtype=torch.float32, device=device)
            for row, i in zip(noise, seeded):
                generator = torch.Generator(device).manual_seed(_noise_seed(params[i].seed, positions[i]))
                row.exponential_(generator=generator)
            rows = to_device(seeded, torch.int64, device)
            scaled = logits[rows].float() / temperatures[rows].unsqueeze(1)
            sampled[rows] = (scaled - noise.log()).argmax(dim=-1)
        if not any(p.greedy for p in params):
            return sampled
        is_greedy = to_device([p.greedy for p in params], torch.bool, device)
        return torch.where(is_greedy, logits.argmax(dim=-1), sampled)


def _noise_seed(seed: int, position: int) -> int:
    """The generator seed of a request's noise at one position. Not Python's hash(): it maps -1 and -2 to the same
    value, and s and s + 2**61 - 1 too, so such seeds would give the same tokens."""
    return xxhash.xxh64_intdigest(f"{seed},{position}".encode()) & (2**63 - 1)


@compile_on_cuda
def _gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand(logits.shape, dtype=torch.float32, device=logits.device).clamp_(min=1e-20)
    return (logits.float() / temperatures.unsqueeze(1) - torch.log(-torch.log(uniform))).argmax(dim=-1)


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    k = torch.tensor(ks, device=logits.device).unsqueeze(1)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    threshold = sorted_logits.gather(1, k - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)  # the mass before this token already suffices
    drop &= (top_p < 1).unsqueeze(1)  # top_p=1 cuts nothing, though fp32 rounds the mass before tail tokens to 1
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
