"""Big random checkpoints (qwen3-8b) are written straight to safetensors shards, without transformers
building the model: on tiny shapes, that path must give a checkpoint transformers loads completely,
initialized like its own, on which the engine matches transformers token for token (CPU, fp32)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.utils import checkpoints

ROOT = Path(__file__).resolve().parents[1]
GREEDY_8 = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen2-tiny"])  # tied, q/k norms; untied, q/k/v biases
def test_directly_written_checkpoint_loads_in_transformers(preset, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(checkpoints, "WRITE_DIRECTLY_ABOVE", 0)
    monkeypatch.setattr(checkpoints, "SHARD_BYTES", 200_000)  # several shards, and transformers' index
    path = checkpoints.make_random_checkpoint(str(tmp_path / preset), preset, initializer_range=0.3)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    assert torch.equal(state["model.norm.weight"], torch.ones_like(state["model.norm.weight"]))
    assert abs(float(state["model.layers.0.mlp.up_proj.weight"].std()) - 0.3) < 0.01
    if preset == "qwen2-tiny":
        assert not state["model.layers.0.self_attn.q_proj.bias"].any()
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        embed_file = json.load(f)["weight_map"]["model.embed_tokens.weight"]
    assert torch.equal(load_file(os.path.join(path, embed_file))["model.embed_tokens.weight"],
                       state["model.embed_tokens.weight"])

    prompts = random_prompts(4, 5, 40)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = LLM(path, device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=128,
                  num_kv_cache_blocks=32).generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(path, prompts, params.max_tokens)



def test_an_interrupted_write_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    """Ctrl-C while the example converts SmolLM2 (or a full disk) must not leave a directory that looks complete
    (transformers' save_pretrained writes config.json first) but is not: every later run would fail to load it."""
    path = str(tmp_path / "cache" / "qwen3")

    def config_then_interrupt(model, save_directory, *args, **kwargs):
        model.config.save_pretrained(save_directory)
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", config_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.make_random_checkpoint(path, "qwen3-tiny")
    assert os.listdir(tmp_path / "cache") == []  # nothing at the path, and no staging directory
    monkeypatch.undo()

    assert checkpoints.make_random_checkpoint(path, "qwen3-tiny") == path
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    LLM(path, device="cpu", dtype="float32", num_kv_cache_blocks=8)  # loads


def test_a_checkpoint_written_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    path = str(tmp_path / "qwen3")
    save_tokenizer = type(checkpoints.make_tokenizer(512)).save_pretrained

    def another_process_finishes_first(tokenizer, staging, *args, **kwargs):
        monkeypatch.undo()
        checkpoints.make_random_checkpoint(path, "qwen3-tiny", seed=1)
        return save_tokenizer(tokenizer, staging, *args, **kwargs)

    monkeypatch.setattr(type(checkpoints.make_tokenizer(512)), "save_pretrained", another_process_finishes_first)
    assert checkpoints.make_random_checkpoint(path, "qwen3-tiny", seed=0) == path
    assert os.listdir(tmp_path) == ["qwen3"]  # our staging directory is gone
    theirs = checkpoints.make_random_checkpoint(str(tmp_path / "seed-1"), "qwen3-tiny", seed=1)
    embeddings = [load_file(os.path.join(p, "model.safetensors"))["model.embed_tokens.weight"] for p in (path, theirs)]
    assert torch.equal(*embeddings)


def test_a_half_written_directory_from_before_is_named_not_loaded(tmp_path):
    path = tmp_path / "qwen3"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half")
    with pytest.raises(RuntimeError, match=f"cannot write a checkpoint to {path}: it exists, is not empty"):
        checkpoints.make_random_checkpoint(str(path), "qwen3-tiny")


def test_a_checkpoint_of_another_shape_at_the_path_is_named_not_kept(tmp_path):
    """`python -m nanovllm.utils.checkpoints random llama-tiny DIR` over a DIR that holds a Qwen3 must not print DIR
    as if it were the Llama asked for."""
    path = checkpoints.make_random_checkpoint(str(tmp_path / "m"), "qwen3-tiny")
    with pytest.raises(RuntimeError, match=f"^{path} holds a checkpoint of another shape: model_type is 'qwen3', "
                                           f"not 'llama'"):
        checkpoints.make_random_checkpoint(path, "llama-tiny")
    with pytest.raises(RuntimeError, match="hidden_size is 64, not 128"):
        checkpoints.make_random_checkpoint(path, "qwen3-tiny", hidden_size=128)
    assert checkpoints.make_random_checkpoint(path, "qwen3-tiny", seed=1) == path  # the same shape is kept
    run = subprocess.run([sys.executable, "-m", "nanovllm.utils.checkpoints", "random", "llama-tiny", path],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 1 and "holds a checkpoint of another shape" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr  # the command line says what is wrong in one line


def test_only_the_files_transformers_would_read_are_loaded(tmp_path, monkeypatch):
    """A sharded checkpoint with a stray *.safetensors beside its shards (an older conversion, say): transformers
    reads the shards its index names, so must the engine, or the stray file's tensors silently win."""
    monkeypatch.setattr(checkpoints, "WRITE_DIRECTLY_ABOVE", 0)
    monkeypatch.setattr(checkpoints, "SHARD_BYTES", 200_000)
    path = checkpoints.make_random_checkpoint(str(tmp_path / "qwen3"), "qwen3-tiny", initializer_range=0.3)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        first_shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    stray = {name: torch.zeros_like(t) for name, t in load_file(os.path.join(path, first_shard)).items()}
    save_file(stray, os.path.join(path, "old-conversion.safetensors"))
    prompts = random_prompts(2, 5, 20)
    outputs = LLM(path, device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=128,
                  num_kv_cache_blocks=32).generate(prompts, GREEDY_8, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(path, prompts, GREEDY_8.max_tokens)

    os.remove(os.path.join(path, first_shard))
    with pytest.raises(ValueError, match=f"names shard\\(s\\) that are not there: {first_shard}"):
        LLM(path, device="cpu", dtype="float32", num_kv_cache_blocks=32)


def test_a_checkpoint_is_written_through_a_link_to_an_empty_directory(tmp_path):
    """~/.cache/nanovllm -> a bigger disk, say: the checkpoint lands where the link points."""
    (tmp_path / "big" / "qwen3").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "qwen3").symlink_to(tmp_path / "big" / "qwen3")
    path = checkpoints.make_random_checkpoint(str(tmp_path / "home" / "qwen3"), "qwen3-tiny")
    assert os.path.exists(os.path.join(tmp_path / "big" / "qwen3", "config.json")) and os.path.islink(path)
    assert os.listdir(tmp_path / "home") == ["qwen3"] and os.listdir(tmp_path / "big") == ["qwen3"]
