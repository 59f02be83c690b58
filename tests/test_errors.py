"""Bad input gets a clear exception (never a hang, never a silent wrong answer)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams

SMALL = dict(kv_cache_block_size=16, max_model_len=64, max_num_batched_tokens=128, num_kv_cache_blocks=16)


@pytest.fixture(scope="module")
def llm(qwen3_path):
    return LLM(qwen3_path, **SMALL)


def test_empty_prompt_list(llm):
    with pytest.raises(ValueError, match="empty list of prompts"):
        llm.generate([], use_tqdm=False)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[1, 2], []], use_tqdm=False)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("", use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate([[1] * 64], use_tqdm=False)
    assert llm.is_finished()  # nothing was queued


def test_wrong_prompt_types(llm):
    with pytest.raises(TypeError, match="list of lists"):
        llm.generate([1, 2, 3], use_tqdm=False)
    with pytest.raises(TypeError, match="a prompt must be"):
        llm.generate([["a", "b"]], use_tqdm=False)
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(42, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        llm.generate([[1, 512]], use_tqdm=False)


def test_bad_sampling_params(llm):
    for kwargs, message in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                            (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1]], {"temperature": 0}, use_tqdm=False)


def test_unknown_model_dir(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path))


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_missing_config_fields(qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match="missing required field.*hidden_size"):
        LLM(path, **SMALL)


def test_unsupported_architecture(qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM"):
        LLM(path, **SMALL)


def test_weights_that_do_not_match_the_config(qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(intermediate_size=256))
    with pytest.raises(ValueError, match="does not match"):
        LLM(path, **SMALL)


def test_more_layers_in_the_checkpoint_than_in_the_config(qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m",
                        lambda c: c.update(num_hidden_layers=1, layer_types=c["layer_types"][:1]))
    with pytest.raises(ValueError, match=r"has 11 tensor\(s\) the model does not have: model\.layers\.1\."):
        LLM(path, **SMALL)


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def test_missing_weights(qwen3_path, tmp_path):
    path = _edit_weights(qwen3_path, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing weights for: model.layers.1.mlp.gate_up_proj.weight"):
        LLM(path, **SMALL)


def test_tied_lm_head_and_rotary_buffers_in_the_checkpoint_are_fine(qwen3_path, tmp_path):
    def add_extras(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    path = _edit_weights(qwen3_path, tmp_path / "m", add_extras)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert (LLM(path, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False)
            == LLM(qwen3_path, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_file(qwen3_path, tmp_path, damage):
    shutil.copytree(qwen3_path, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(1000))
    with pytest.raises(ValueError, match=f"cannot read {file}"):
        LLM(str(tmp_path / "m"), **SMALL)


def test_bad_config_values(qwen3_path):
    with pytest.raises(TypeError, match="unknown option.*max_num_seq\\b"):
        LLM(qwen3_path, max_num_seq=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        LLM(qwen3_path, tensor_parallel_size=0, **SMALL)
    with pytest.raises(ValueError, match="dtype"):
        LLM(qwen3_path, dtype="int8", **SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(qwen3_path, device="cuda:7", **SMALL)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(qwen3_path, max_num_batched_tokens=16, max_model_len=64)
    with pytest.raises(ValueError, match="too few for one sequence"):
        LLM(qwen3_path, **dict(SMALL, num_kv_cache_blocks=2))


def test_block_size_must_be_a_power_of_two(qwen3_path):
    with pytest.raises(ValueError, match="power of two"):
        LLM(qwen3_path, **dict(SMALL, kv_cache_block_size=48))
