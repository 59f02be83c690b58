"""Big random checkpoints (qwen3-8b) are written straight to safetensors shards, without transformers
building the model: on tiny shapes, that path must give a checkpoint transformers loads completely,
initialized like its own, on which the engine matches transformers token for token (CPU, fp32)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.utils import checkpoints


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
