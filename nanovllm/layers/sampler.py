import torch

from nanovllm.sampling_params import SamplingParams


class Sampler:
    """Greedy rows take argmax; the others sample from softmax(logits / T) after top-k and top-p cuts.

    Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)), which draws exactly from p.
    A request with a seed draws its noise from a generator seeded by (seed, position), so its tokens do
    not depend on what else is in the batch or on which device runs it.
    """

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        device = logits.device
        temperatures = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        logits = logits / temperatures.unsqueeze(1)
        if any(0 < p.top_k < logits.size(1) for p in params):
            logits = _top_k(logits, [p.top_k if p.top_k > 0 else logits.size(1) for p in params])
        if any(p.top_p < 1 for p in params):
            logits = _top_p(logits, torch.tensor([p.top_p for p in params], device=device))
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, (p, position) in enumerate(zip(params, positions)):
            if p.seed is not None and not p.greedy:
                generator = torch.Generator(device).manual_seed(hash((p.seed, position)) & (2**63 - 1))
                noise[i].exponential_(generator=generator)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy, sampled)


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    k = torch.tensor(ks, device=logits.device).unsqueeze(1)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    threshold = sorted_logits.gather(1, k - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p.unsqueeze(1)  # mass before this token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
