"""Bad input gets a clear exception (never a hang, never a silent wrong answer)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, Config, SamplingParams
from nanovllm.engine import llm_engine

SMALL = dict(device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=64, max_num_batched_tokens=128,
             num_kv_cache_blocks=16)


@pytest.fixture(scope="module")
def llm(qwen3_path):
    return LLM(qwen3_path, **SMALL)


def test_empty_prompt_list(llm):
    with pytest.raises(ValueError, match="empty list of prompts"):
        llm.generate([], use_tqdm=False)


def test_abort_takes_a_request_id(llm):
    request_id = llm.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    for wrong in (True, str(request_id), None):
        with pytest.raises(TypeError, match="request_id must be an int"):
            llm.abort_request(wrong)
    assert llm.abort_request(np.int64(request_id)) and not llm.abort_request(request_id)  # once; numpy ints too
    llm.step()


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


def test_sampling_params_of_the_wrong_type():
    for field, value in [("top_k", True), ("top_k", 2.0), ("temperature", "0"), ("temperature", False),
                         ("max_tokens", True), ("ignore_eos", 1), ("top_p", True), ("seed", 1.5), ("seed", True),
                         ("stop", [5]), ("stop", ("a",))]:
        with pytest.raises(TypeError, match=f"^{field} must be"):
            SamplingParams(**{field: value})
    for temperature in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^temperature must be"):
            SamplingParams(temperature=temperature)


def test_sampling_params_changed_after_construction_are_checked_when_added(llm):
    for field, value, error in [("stop", [5], TypeError), ("top_k", True, TypeError), ("max_tokens", 0, ValueError),
                                ("temperature", -1.0, ValueError)]:
        params = SamplingParams()
        setattr(params, field, value)
        with pytest.raises(error, match=f"^{field} must be"):
            llm.generate([[1, 2], [3]], params, use_tqdm=False)
        with pytest.raises(error, match=f"^{field} must be"):
            llm.generate([[1, 2], [3]], [SamplingParams(), params], use_tqdm=False)
        with pytest.raises(error, match=f"^{field} must be"):
            llm.add_request([1, 2], params)
        assert llm.is_finished()  # nothing was queued


def test_a_request_keeps_the_params_it_was_added_with(llm):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.add_request([1, 2], params)
    params.max_tokens, params.stop = 0, [5]  # too late to matter, and must not wedge the engine
    tokens = []
    while not llm.is_finished():
        tokens += [out.new_token_id for out in llm.step()]
    assert len(tokens) == 3


def test_sampling_params_that_are_not_sampling_params(llm):
    for bad in ({}, 0, {"temperature": 0}, "greedy"):
        with pytest.raises(TypeError, match="^sampling_params must be SamplingParams or None"):
            llm.generate([[1, 2]], bad, use_tqdm=False)
        with pytest.raises(TypeError, match="^sampling_params must be SamplingParams or None"):
            llm.generate([[1, 2], [3]], [SamplingParams(), bad], use_tqdm=False)
        with pytest.raises(TypeError, match="^sampling_params must be SamplingParams or None"):
            llm.add_request([1, 2], bad)
        assert llm.is_finished()  # nothing was queued


def test_stop_strings_need_a_tokenizer(qwen3_path, tmp_path):
    weights_only = tmp_path / "no-tokenizer"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(qwen3_path, name), weights_only / name)
    llm = LLM(str(weights_only), **SMALL)
    with pytest.raises(ValueError, match="^stop strings need a tokenizer.*'x'"):
        llm.generate([[1, 2]], SamplingParams(stop="x"), use_tqdm=False)
    with pytest.raises(ValueError, match="^stop strings need a tokenizer"):
        llm.add_request([1, 2], SamplingParams(stop=["x"]))
    assert llm.is_finished()  # nothing was queued
    [out] = llm.generate([[1, 2]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out["token_ids"]) == 2 and out["text"] is None  # without stop strings it serves token ids


def test_a_stop_string_with_a_special_token_could_never_match(llm):
    # The completion's text is decoded without special tokens, so "<|im_end|>" never appears in it.
    for stop in ("<|im_end|>", ["ok", "x<|im_start|>"]):
        with pytest.raises(ValueError, match="^stop string .* holds the special token '<\\|im_(end|start)\\|>'"):
            llm.generate([[1, 2]], SamplingParams(stop=stop), use_tqdm=False)
        with pytest.raises(ValueError, match="holds the special token"):
            llm.add_request([1, 2], SamplingParams(stop=stop))
    assert llm.is_finished()  # nothing was queued
    [out] = llm.generate([[1, 2]], SamplingParams(max_tokens=3, ignore_eos=True, stop="im_end"), use_tqdm=False)
    assert len(out["token_ids"]) <= 3  # plain text that looks like a special token's name is fine


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fails the test if the engine gets as far as building a model runner (which loads the weights)."""
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad option was caught")
    monkeypatch.setattr(llm_engine, "ModelRunner", load)


def test_a_given_kv_pool_too_small_fails_before_the_weights_load(qwen3_path, no_weights_load):
    with pytest.raises(ValueError, match="^num_kv_cache_blocks: KV cache has 2 blocks .* too few for one sequence"):
        LLM(qwen3_path, **dict(SMALL, num_kv_cache_blocks=2))
    pd = dict(SMALL, enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu")
    with pytest.raises(ValueError, match="^num_prefill_kv_cache_blocks: KV cache has 3 blocks"):
        LLM(qwen3_path, **dict(pd, num_prefill_kv_cache_blocks=3))


def test_config_options_of_the_wrong_type(qwen3_path, no_weights_load):
    for field, value in [("num_kv_cache_blocks", "16"), ("num_kv_cache_blocks", 16.0),
                         ("num_prefill_kv_cache_blocks", "8"), ("gpu_memory_utilization", "0.9"),
                         ("gpu_memory_utilization", True), ("max_num_seqs", True), ("max_model_len", 64.0),
                         ("max_num_batched_tokens", None), ("kv_cache_block_size", "16"), ("enforce_eager", 1),
                         ("enable_two_gpu_pd", "yes"), ("enable_two_gpu_pd", 1), ("tensor_parallel_size", True),
                         ("device", 1.5), ("dtype", 32), ("prefill_device_id", None), ("decode_device_id", True)]:
        with pytest.raises(TypeError, match=f"^{field} must be"):
            LLM(qwen3_path, **dict(SMALL, **{field: value}))
    with pytest.raises(TypeError, match="^model must be str"):
        LLM(None)
    for field in ("num_kv_cache_blocks", "num_prefill_kv_cache_blocks"):
        with pytest.raises(ValueError, match=f"^{field} must be -1"):
            LLM(qwen3_path, **dict(SMALL, **{field: 0}))
    with pytest.raises(ValueError, match="^max_num_seqs must be <= 65535"):
        LLM(qwen3_path, **dict(SMALL, max_num_seqs=65536))


def test_config_accepts_ints_as_floats_and_paths_as_model(qwen3_path):
    config = Config(Path(qwen3_path), gpu_memory_utilization=1, device="cpu")
    assert config.model == qwen3_path and config.gpu_memory_utilization == 1


def test_a_model_path_may_start_with_a_tilde(qwen3_path, monkeypatch):
    monkeypatch.setenv("HOME", os.path.dirname(qwen3_path))
    assert Config("~/" + os.path.basename(qwen3_path), device="cpu").model == qwen3_path


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


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_rotary_scaling_it_does_not_implement_is_refused_before_loading(scaling, qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(rope_scaling=scaling))
    kind = scaling.get("rope_type") or scaling["type"]
    with pytest.raises(ValueError, match=f"{path}: config.json asks for rotary scaling rope_type='{kind}'"):
        Config(path, device="cpu")


def test_partial_rotary_is_refused_before_loading(qwen3_path, tmp_path):
    """Rotary embedding on part of each head (partial_rotary_factor < 1) is not implemented: refused, never ignored."""
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match=f"{path}: config.json asks for partial_rotary_factor=0.5"):
        Config(path, device="cpu")


def test_a_head_size_the_cuda_kernels_cannot_take_is_refused_before_loading(qwen3_path, tmp_path, monkeypatch):
    """The Triton kernels take a head as one power-of-two block: on CUDA, head_dim 80 or 100 is refused up front
    (not at warm-up, inside a kernel). The CPU runs it."""
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(head_dim=24))
    assert Config(path, device="cpu").hf_config.head_dim == 24
    monkeypatch.setattr(Config, "_resolve_devices", lambda self: setattr(self, "device", "cuda:0"))  # as on a GPU box
    with pytest.raises(ValueError, match=f"{path}: head_dim=24 \\(config.json\\) is not a power of two"):
        Config(path)


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_a_quantized_checkpoint_is_refused_before_loading(method, qwen3_path, tmp_path):
    """Its weights are packed integers or fp8 with scales beside them: not a list of tensors that 'does not
    match config.json', and never to be read as plain weights."""
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(quantization_config={"quant_method": method}))
    with pytest.raises(ValueError, match=f"{path}: config.json has a quantization_config "
                                         f"\\(quant_method='{method}'\\); quantized checkpoints are not supported"):
        Config(path, device="cpu")


def test_malformed_config_json(qwen3_path, tmp_path, no_weights_load):
    path = shutil.copytree(qwen3_path, tmp_path / "m")
    config_json = os.path.join(path, "config.json")
    with open(config_json, "w") as f:
        f.write('{"architectures": ["Qwen3ForCausalLM"],')
    with pytest.raises(ValueError, match=f"^{config_json} is not valid JSON"):
        LLM(str(path), **SMALL)
    with open(config_json, "w") as f:
        f.write("[]")
    with pytest.raises(ValueError, match=f"^{config_json} must hold a JSON object"):
        LLM(str(path), **SMALL)


def test_architectures_must_be_a_list(qwen3_path, tmp_path, no_weights_load):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(architectures="Qwen3ForCausalLM"))
    with pytest.raises(ValueError, match="architectures must be a non-empty list"):
        LLM(path, **SMALL)


def test_unsupported_architecture(qwen3_path, tmp_path):
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM"):
        LLM(path, **SMALL)


def test_sliding_window_attention_is_refused_unless_sequences_fit_in_the_window(qwen3_path, tmp_path, no_weights_load):
    """The engine attends over the whole sequence; a sliding-window layer (Qwen2/Qwen3 with use_sliding_window)
    attends like that only while the sequence fits in its window, and must not silently compute something else."""
    path = _broken_copy(qwen3_path, tmp_path / "m", lambda c: c.update(
        use_sliding_window=True, sliding_window=32, layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match=r"sliding_window=32\) in layer\(s\) 1 .*max_model_len <= 32"):
        Config(path, **dict(SMALL, max_model_len=64))
    assert Config(path, **dict(SMALL, max_model_len=32)).max_model_len == 32  # full attention there
    unused = _broken_copy(qwen3_path, tmp_path / "u", lambda c: c.update(use_sliding_window=False, sliding_window=32,
                                                                          layer_types=None))
    Config(unused, **dict(SMALL, max_model_len=64))  # a window that use_sliding_window turns off is no matter


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
    """The error names the tensors as the checkpoint would (up_proj), not as the model fuses them (gate_up_proj)."""
    def drop(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    path = _edit_weights(qwen3_path, tmp_path / "m", drop)
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight, "
                                         r"model\.norm\.weight$"):
        LLM(path, **SMALL)


def test_tied_lm_head_and_rotary_buffers_in_the_checkpoint_are_fine(qwen3_path, tmp_path):
    def add_extras(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    path = _edit_weights(qwen3_path, tmp_path / "m", add_extras)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert (LLM(path, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False)
            == LLM(qwen3_path, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False))


def test_a_tied_lm_head_that_differs_from_the_embeddings_is_refused(qwen3_path, tmp_path):
    """config.json ties the LM head to the embeddings, but the checkpoint holds an lm_head.weight of its own
    (untied by a fine-tune, config left as it was): using the embeddings would silently give other tokens than
    transformers, which then keeps both. The config must say which one is meant."""
    def untie(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0)
    path = _edit_weights(qwen3_path, tmp_path / "m", untie)
    with pytest.raises(ValueError, match=r"ties lm_head\.weight to model\.embed_tokens\.weight "
                                         r"\(tie_word_embeddings\), but the checkpoint's lm_head\.weight differs"):
        LLM(path, **SMALL)


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
        LLM(qwen3_path, **dict(SMALL, dtype="int8"))
    with pytest.raises(ValueError, match="does not exist"):
        LLM(qwen3_path, **dict(SMALL, device="cuda:99"))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(qwen3_path, max_num_batched_tokens=16, max_model_len=64, chunked_prefill_tokens=0)
    with pytest.raises(ValueError, match="too few for one sequence"):
        LLM(qwen3_path, **dict(SMALL, num_kv_cache_blocks=2))


def test_what_the_engine_sets_is_not_an_option(qwen3_path, no_weights_load):
    for name in ("kv_via_host", "eos_token_ids", "hf_config"):
        with pytest.raises(TypeError, match=f"^unknown option\\(s\\) {name}; valid options: ") as error:
            LLM(qwen3_path, **SMALL, **{name: True})
        assert not {"kv_via_host", "eos_token_ids", "hf_config"} & set(str(error.value).split(": ")[-1].split(", "))


def test_block_size_must_be_a_power_of_two(qwen3_path):
    with pytest.raises(ValueError, match="power of two"):
        LLM(qwen3_path, **dict(SMALL, kv_cache_block_size=48))


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "0"], "--max-tokens: must be a positive integer, got '0'"),
    (["--model", "/no/such/dir"], "--model /no/such/dir: no config.json there")])
def test_the_example_refuses_bad_flags_before_loading_a_model(flags, message):
    example = Path(__file__).resolve().parents[1] / "example_two_gpu.py"
    run = subprocess.run([sys.executable, str(example), *flags], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(example.parent)))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_the_example_sends_one_bos_where_the_chat_template_writes_it():
    """Llama 3's chat template writes <|begin_of_text|> and its tokenizer adds it too when encoding: text from the
    template, encoded again, would start with two."""
    from tokenizers import processors
    from nanovllm.utils.checkpoints import make_tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from example_two_gpu import chat_prompts
    tokenizer = make_tokenizer(512)
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer.encode("hi")[:2] == [bos, tokenizer.encode("hi", add_special_tokens=False)[0]]
    [prompt] = chat_prompts(tokenizer, ["hi"])
    assert prompt[0] == bos and prompt.count(bos) == 1


def test_max_model_len_over_the_models_positions_is_capped_aloud(qwen3_path, monkeypatch):
    """The model was trained up to max_position_embeddings; asking for more gets that, and a warning that says so."""
    import logging
    warnings = []
    monkeypatch.setattr(logging.getLogger("nanovllm"), "warning", warnings.append)
    positions = json.load(open(os.path.join(qwen3_path, "config.json")))["max_position_embeddings"]
    config = Config(qwen3_path, device="cpu", max_model_len=positions + 1, num_kv_cache_blocks=1024)
    assert config.max_model_len == positions
    assert any(f"max_model_len={positions + 1} is more than the model's max_position_embeddings ({positions})" in w
               for w in warnings), warnings
