"""The sampler draws from the right distribution, and its cuts keep the right tokens."""
import torch

from nanovllm import SamplingParams
from nanovllm.layers.sampler import Sampler, _top_p
from nanovllm.sampling_params import MIN_TEMPERATURE

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def draw(params: SamplingParams, n: int = 20000) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = Sampler()(LOGITS.repeat(n, 1), [params] * n, list(range(n)))
    return torch.bincount(tokens, minlength=len(LOGITS)).float() / n


def test_frequencies_follow_softmax_of_logits_over_temperature():
    for temperature in (1.0, 0.5):
        expected = torch.softmax(LOGITS / temperature, dim=0)
        assert torch.allclose(draw(SamplingParams(temperature=temperature)), expected, atol=0.015)


def test_top_k_and_top_p_keep_only_the_top_tokens():
    assert draw(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    probs = torch.softmax(LOGITS, dim=0)  # [0.56, 0.21, 0.13, ...]: 0.7 needs the top two
    frequencies = draw(SamplingParams(temperature=1.0, top_p=0.7))
    assert frequencies[2:].sum() == 0
    assert abs(frequencies[0] - probs[0] / probs[:2].sum()) < 0.015


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 3
    tokens = Sampler()(logits, params, [0] * 6)
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))


def test_a_tiny_temperature_is_greedy():
    # logits / 1e-40 would overflow to inf for most tokens, and argmax would pick the first of them.
    logits = torch.randn(6, 50) * 10
    for temperature in (MIN_TEMPERATURE / 2, 1e-30, 1e-40, 5e-324):
        for extra in (dict(), dict(top_k=5), dict(top_p=0.9)):
            tiny = SamplingParams(temperature=temperature, **extra)
            assert tiny.greedy
            tokens = Sampler()(logits, [tiny, SamplingParams(temperature=1.0)] * 3, [0] * 6)  # a mixed batch
            assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))
            assert torch.equal(Sampler()(logits, [tiny] * 6, [0] * 6), logits.argmax(dim=-1))


def test_a_top_k_above_the_vocabulary_keeps_every_token_beside_a_row_that_cuts():
    # top_k=1000 on a 5-token vocabulary is no cut, also in a batch where another row's top_k does cut.
    n = 20000
    torch.manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_k=1000)] * (n // 2)
    tokens = Sampler()(LOGITS.repeat(n, 1), params, list(range(n)))
    assert tokens[::2].max() <= 1
    frequencies = torch.bincount(tokens[1::2], minlength=len(LOGITS)).float() / (n // 2)
    assert torch.allclose(frequencies, torch.softmax(LOGITS, dim=0), atol=0.02)


def test_different_seeds_give_different_tokens():
    # Python's hash() of an int maps -1 and -2 to the same value, and s and s + 2**61 - 1 too: such seeds must
    # still draw different noise. 40 draws from 1,000 equally likely tokens cannot all agree by chance.
    logits = torch.zeros(40, 1000)
    for a, b in ((-1, -2), (0, 2**61 - 1), (1, 2**61), (5, -5)):
        tokens = [Sampler()(logits, [SamplingParams(temperature=1.0, seed=s)] * 40, list(range(40))) for s in (a, b)]
        assert not torch.equal(*tokens), (a, b)


def test_a_top_p_of_one_cuts_nothing_beside_a_row_that_cuts():
    # top_p=1 is no cut (transformers adds no TopPLogitsWarper for it). In a batch where another row's top_p cuts,
    # the fp32 mass before a tail token rounds up to 1.0 and reached ">= top_p": tokens of p = e^-17 and below were
    # dropped (on SmolLM2's real logits, 24k-35k tokens and 2e-5 of the mass each step), so a row's distribution,
    # and a seeded request's tokens, depended on its neighbours.
    logits = -torch.arange(40.0).repeat(2, 1)  # probabilities e^-k / Z
    cut = _top_p(logits, torch.tensor([0.5, 1.0]))
    assert torch.equal(cut[1], logits[1])
    assert torch.isfinite(cut[0]).sum() == 1  # e^0 / Z = 0.63 >= 0.5: the top token alone
