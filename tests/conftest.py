"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable must be set
before any kernel module is imported, which is why it lives here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: on small CI machines, waking a second OpenMP thread for each small
# matmul costs milliseconds (measured: 8 ms vs 6 us for a 64x64 matmul on the 2-core CI box).
torch.set_num_threads(1)


import random  # noqa: E402

import pytest  # noqa: E402

from nanovllm.utils.checkpoints import make_random_checkpoint  # noqa: E402

# Random weights at initializer_range 0.3 give varied, non-repeating greedy output, so a wrong token
# shows up at once instead of hiding in a loop of one repeated token.
TINY = dict(initializer_range=0.3)


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory):
    return make_random_checkpoint(str(tmp_path_factory.mktemp("qwen3")), "qwen3-tiny", **TINY)


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    return make_random_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama-tiny", **TINY)


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory):
    return make_random_checkpoint(str(tmp_path_factory.mktemp("qwen2")), "qwen2-tiny", **TINY)


def random_prompts(n: int, min_len: int, max_len: int, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Reference: transformers' model with its own KV cache, argmax each step, one prompt at a time, fp32.

    (Not `generate(min_new_tokens=...)`: that suppresses EOS, while ignore_eos only keeps going past it.)
    """
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < max_tokens:
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outputs.append(tokens)
    return outputs


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: each replay runs the captured step again, on the same buffers."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        self.replays += 1
        self.step()

    def pool(self):
        return None


# Triton runs on CPU tensors only in its interpreter, which is on only without a GPU (above); with one, the GPU
# tests run the same path for real.
triton_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is off with a GPU")


def cuda_paths_on_cpu(runner, monkeypatch, multiple: int, buckets: list[int] | None = None, max_seqs: int = 0):
    """Give a CPU runner the CUDA runner's attention path: the Triton kernels (in the interpreter), the CUDA
    runner's prompt inputs (padded to `multiple`, no context gathered) and, given `buckets`, prompt steps run from
    the padded static buffers of engine/prompt_graphs.py, each graph stood in by an EagerGraph."""
    from nanovllm.engine import prompt_graphs
    from nanovllm.layers.attention import Attention
    runner.prefill_token_multiple, runner.backend = multiple, "triton"
    for attention in [m for m in runner.model.modules() if isinstance(m, Attention)]:
        attention.backend = "triton"
    if buckets:
        monkeypatch.setattr(prompt_graphs, "capture", lambda step, pool, stream: EagerGraph(step))
        c = runner.config
        runner.prompt_graphs = prompt_graphs.PromptGraphs(
            runner.model, buckets, max_seqs=max_seqs, max_blocks=c.max_model_len // c.kv_cache_block_size,
            hidden_size=c.hf_config.hidden_size, dtype=c.dtype, device=runner.device)
