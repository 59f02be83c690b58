"""On whatever GPU is here (cuda:0), in bf16: greedy parity with transformers (bf16 on cuda:0 too) on a random
Qwen3-0.6B-shape model, and CUDA graphs on = off.

bf16 rounding makes two engines disagree where the top two logits are nearly equal; after such a
near-tie the sequences continue differently, so each prompt is compared up to its first divergence,
and the divergence must be at a near-tie (transformers' own logits within NEAR_TIE of each other).
Run with -s to see the table; the numbers are recorded in README.md.
"""
import gc
import os

import pytest
import torch

from conftest import random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.utils.checkpoints import make_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEAR_TIE = 0.1  # logits of a random Qwen3-0.6B spread over ~±3; bf16 steps there are 1/64 to 1/32
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def qwen3_06b():
    cache = os.path.expanduser("~/.cache/nanovllm")
    return make_random_checkpoint(os.path.join(cache, "random-qwen3-0.6b"), "qwen3-0.6b")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(16, 20, 600, seed=0, vocab=10000)


def generate(path, prompts, **options):
    """Greedy tokens from a fresh engine, freed afterwards: the next engine sizes its KV cache from free memory."""
    llm = LLM(path, device="cuda:0", dtype="bfloat16", max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=4096,
              **options)  # a small engine (8 decode graphs, a small warm-up batch) starts sooner
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o["token_ids"] for o in outputs]


def hf_greedy_with_logits(path, prompts, max_tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0").eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt], device="cuda:0"), use_cache=True)
            logits = [out.logits[0, -1].float()]
            tokens = [int(logits[-1].argmax())]
            while len(tokens) < max_tokens:
                out = model(torch.tensor([[tokens[-1]]], device="cuda:0"), past_key_values=out.past_key_values,
                            use_cache=True)
                logits.append(out.logits[0, -1].float())
                tokens.append(int(logits[-1].argmax()))
            results.append((tokens, torch.stack(logits).cpu()))
    del model
    torch.cuda.empty_cache()
    return results


def test_bf16_parity_with_transformers(qwen3_06b, prompts):
    ours = generate(qwen3_06b, prompts)
    reference = hf_greedy_with_logits(qwen3_06b, prompts, MAX_TOKENS)
    matched, gaps = 0, []
    print(f"\n{'prompt len':>10} {'matching tokens':>16} {'logit gap at divergence':>24}")
    for prompt, tokens, (ref_tokens, ref_logits) in zip(prompts, ours, reference):
        n = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), MAX_TOKENS)
        matched += n
        gap = None
        if n < MAX_TOKENS:
            gap = float(ref_logits[n, ref_tokens[n]] - ref_logits[n, tokens[n]])
            gaps.append(gap)
        print(f"{len(prompt):>10} {n:>16} {'' if gap is None else f'{gap:.4f}':>24}")
    print(f"tokens matching before the first divergence: {matched}/{len(prompts) * MAX_TOKENS} "
          f"({matched / len(prompts) / MAX_TOKENS:.1%}); divergences: {len(gaps)}, max gap {max(gaps, default=0):.4f}")
    assert all(gap <= NEAR_TIE for gap in gaps)


def test_cuda_graphs_give_the_same_tokens(qwen3_06b, prompts):
    assert generate(qwen3_06b, prompts) == generate(qwen3_06b, prompts, enforce_eager=True)
