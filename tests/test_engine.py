"""The engine on CPU against Hugging Face transformers: greedy output must match token for token (fp32)."""
import contextlib

import pytest
import torch

from conftest import cuda_paths_on_cpu, hf_greedy, random_prompts, triton_interpreter
from nanovllm import LLM, LLMEngine, SamplingParams
from nanovllm.utils.checkpoints import make_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Exact parity needs fp32, so every engine here runs on the CPU in fp32, GPUs or not (GPU parity: test_gpu.py).
SMALL = dict(device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=256, max_num_batched_tokens=512,
             num_kv_cache_blocks=128)


@pytest.mark.parametrize("model", ["qwen3_path", "llama_path", "qwen2_path"])
def test_greedy_matches_transformers(model, request):
    path = request.getfixturevalue(model)
    prompts = random_prompts(6, 1, 70)
    llm = LLM(path, **SMALL)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(path, prompts, GREEDY.max_tokens)
    assert all(o["finish_reason"] == "length" for o in outputs)


def test_prefix_cache_hit_matches_transformers(qwen3_path):
    shared = random_prompts(1, 50, 50, seed=1)[0]  # three full 16-token blocks
    prompts = [shared + tail for tail in ([7, 8, 9], [10], [11, 12, 13, 14, 15])]
    llm = LLM(qwen3_path, **SMALL)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    hits_before = llm.scheduler.block_managers[0].num_cache_hits
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert llm.scheduler.block_managers[0].num_cache_hits - hits_before == 2 * 3  # both reuse all 3 blocks
    assert [o["token_ids"] for o in first + rest] == hf_greedy(qwen3_path, prompts, GREEDY.max_tokens)


def test_preemption_gives_the_same_tokens(qwen3_path):
    prompts = random_prompts(8, 20, 60, seed=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(qwen3_path, **SMALL).generate(prompts, params, use_tqdm=False)
    tight = LLM(qwen3_path, **dict(SMALL, num_kv_cache_blocks=20))  # 320 tokens for ~600 needed
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in roomy]
    assert tight.scheduler.block_managers[0].num_free_blocks == 20  # everything released


@pytest.mark.parametrize("buckets", [[], [256, 512]], ids=["multiples", "buckets"])
def test_padded_prompt_tokens_change_no_token(qwen3_path, buckets):
    """On CUDA a step's prompt tokens are padded to a multiple of 128 (`prefill_token_multiple`), and further to
    the prompt-step graphs' token buckets, with a pseudo-sequence that attends only to itself. Here the CPU pads
    the same way, with prompts chunked beside decodes, so that chunks also read earlier chunks' KV from the cache:
    the tokens stay transformers'."""
    prompts = random_prompts(6, 1, 150, seed=3)
    llm = LLM(qwen3_path, **dict(SMALL, chunked_prefill_tokens=40))
    runner, steps = llm.model_runner, []
    runner.prefill_token_multiple, runner.prompt_buckets = 128, buckets
    host_inputs = runner.host_inputs

    def recorded(batch):
        inputs = host_inputs(batch)
        if inputs.prefill is not None:
            steps.append((len(inputs.prefill["input_ids"]), inputs.prefill["context_rows"] is not None))
        return inputs

    runner.host_inputs = recorded
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(tokens % 128 == 0 and (not buckets or tokens in buckets) for tokens, _ in steps)
    assert any(with_context for _, with_context in steps)
    assert [o["token_ids"] for o in outputs] == hf_greedy(qwen3_path, prompts, GREEDY.max_tokens)


@triton_interpreter
def test_triton_attention_kernels_give_the_same_tokens(qwen3_path, monkeypatch):
    """The CUDA path's attention (Triton kernels: prompt chunks over the paged cache, decode, the KV store), run
    in Triton's interpreter on the CPU, fp32: chunks beside decodes, chunks reading earlier chunks' KV, the
    padding pseudo-sequence; the tokens stay transformers'."""
    prompts = random_prompts(4, 1, 100, seed=4)
    llm = LLM(qwen3_path, **dict(SMALL, chunked_prefill_tokens=40))
    cuda_paths_on_cpu(llm.model_runner, monkeypatch, multiple=32)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(qwen3_path, prompts, params.max_tokens)


@triton_interpreter
def test_prompt_steps_replayed_from_padded_static_buffers_give_the_same_tokens(qwen3_path, monkeypatch):
    """engine/prompt_graphs.py with its capture standing in (EagerGraph), the Triton kernels in the interpreter:
    each prompt step is padded to its token bucket and to the graphs' sequence count and read from static buffers,
    as a replay on a GPU reads them; chunks beside decodes and chunks after cached context included."""
    from nanovllm.engine.prompt_graphs import bucket_sizes
    llm = LLM(qwen3_path, **dict(SMALL, chunked_prefill_tokens=40, max_num_batched_tokens=128))
    runner = llm.model_runner
    cuda_paths_on_cpu(runner, monkeypatch, multiple=16, buckets=bucket_sizes(16, 128), max_seqs=12)
    prompts = random_prompts(6, 1, 120, seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(qwen3_path, prompts, params.max_tokens)
    assert sum(graph.replays for graph in runner.prompt_graphs.graphs.values()) >= 5


def test_text_prompts_and_outputs(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    [out] = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                         use_tqdm=False)
    assert len(out["token_ids"]) == 5
    assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    prompts = random_prompts(4, 5, 30, seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=1234)
    a = llm.generate(prompts, params, use_tqdm=False)
    b = llm.generate(prompts[::-1], params, use_tqdm=False)[::-1]  # other batch order, same tokens
    assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]
    unseeded = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)
    assert [o["token_ids"] for o in unseeded] != [o["token_ids"] for o in a]


def test_top_k_one_is_greedy(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    prompts = random_prompts(3, 5, 30, seed=4)
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [o["token_ids"] for o in top1] == [o["token_ids"] for o in greedy]


def test_stop_string_and_eos(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    prompt = random_prompts(1, 10, 10, seed=5)[0]
    [full] = llm.generate([prompt], GREEDY, use_tqdm=False)
    stop = full["text"][5:8]
    [cut] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop),
                         use_tqdm=False)
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]
    assert full["text"].startswith(cut["text"]) and len(cut["token_ids"]) < 24
    eos = full["token_ids"][3]  # pretend the 4th token is EOS: generation must stop there
    llm.scheduler.eos_token_ids = {eos}
    [short] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert short["token_ids"] == full["token_ids"][:full["token_ids"].index(eos) + 1]
    assert short["finish_reason"] == "stop"


def test_generation_stops_at_max_model_len(qwen3_path):
    llm = LLM(qwen3_path, **dict(SMALL, max_model_len=40))
    [out] = llm.generate([list(range(1, 31))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                         use_tqdm=False)
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"


def test_step_api_streams_tokens(qwen3_path):
    engine = LLMEngine(qwen3_path, **SMALL)
    prompts = random_prompts(3, 5, 20, seed=6)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    streamed = {i: [] for i in ids}
    finished = {}
    while not engine.is_finished():
        for out in engine.step():
            streamed[out.request_id].append(out.new_token_id)
            if out.finished:
                finished[out.request_id] = out.token_ids
    assert streamed == finished
    assert [finished[i] for i in ids] == hf_greedy(qwen3_path, prompts, GREEDY.max_tokens)


def test_step_api_finishes_with_the_text_generate_returns(qwen3_path):
    """CPU, fp32: a finished StepOutput carries the completion's text, the same as generate() returns for the
    same request, whether it ended at max_tokens or at a stop string (not None unless a stop string cut it)."""
    engine = LLMEngine(qwen3_path, **SMALL)
    prompt = random_prompts(1, 5, 20, seed=12)[0]
    [full] = engine.generate([prompt], GREEDY, use_tqdm=False)
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=full["text"][5:8])]
    expected = engine.generate([prompt, prompt], params, use_tqdm=False)
    ids = [engine.add_request(prompt, p) for p in params]
    finished = {}
    while not engine.is_finished():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert [finished[i].text for i in ids] == [o["text"] for o in expected]
    assert [finished[i].finish_reason for i in ids] == ["length", "stop"]
    assert finished[ids[0]].text == engine.tokenizer.decode(full["token_ids"], skip_special_tokens=True)


def test_text_streams_piece_by_piece_and_adds_up_to_the_final_text(qwen3_path):
    """CPU, fp32: TextStream's pieces add up to each request's final text, with stop strings (never sent, not even
    in part, before the request ends) and without, and through incomplete UTF-8 characters (sampled tokens of
    the byte-level tokenizer include lone bytes)."""
    engine = LLMEngine(qwen3_path, **SMALL)
    prompts = random_prompts(8, 5, 20, seed=26)
    sampled = [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=i) for i in range(8)]
    texts = [o["text"] for o in engine.generate(prompts, sampled, use_tqdm=False)]
    stops = [[text[10:13]] if i % 2 else None for i, text in enumerate(texts)]  # a stop string in every other one
    params = [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=i, stop=stop)
              for i, stop in enumerate(stops)]
    expected = [text[:text.index(stop[0])] if stop else text for text, stop in zip(texts, stops)]
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    streams, expected = {i: engine.text_stream(i) for i in ids}, dict(zip(ids, expected))
    sent, final = {i: "" for i in ids}, {}
    while not engine.is_finished():
        for out in engine.step():
            sent[out.request_id] += streams[out.request_id].push(out)
            assert expected[out.request_id].startswith(sent[out.request_id])  # nothing sent is ever taken back
            if out.finished:
                final[out.request_id] = out.text
    assert any("\ufffd" in text for text in texts)  # the case of incomplete characters did come up
    assert sent == final == expected
    with pytest.raises(ValueError, match="request_id 12345"):
        engine.text_stream(12345)
    with pytest.raises(TypeError, match="request_id must be an int"):
        engine.text_stream(True)


def test_generate_keeps_the_outputs_of_requests_it_did_not_add(qwen3_path):
    """A request added with add_request() may finish while generate() runs others: its outputs wait for step()."""
    engine = LLMEngine(qwen3_path, **SMALL)
    prompts = random_prompts(2, 5, 20, seed=9)
    streamed = engine.add_request(prompts[0], GREEDY)
    [out] = engine.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                            use_tqdm=False)
    outputs = []
    while not engine.is_finished():
        outputs += engine.step()
    assert [o.new_token_id for o in outputs] == [o.token_ids for o in outputs if o.finished][0]
    assert all(o.request_id == streamed for o in outputs)
    assert outputs[-1].token_ids == hf_greedy(qwen3_path, prompts[:1], GREEDY.max_tokens)[0]


def test_per_prompt_sampling_params(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    prompts = random_prompts(2, 5, 20, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
    assert [len(o["token_ids"]) for o in llm.generate(prompts, params, use_tqdm=False)] == [3, 7]


def test_mixed_greedy_and_sampled_batch(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    prompts = random_prompts(2, 5, 20, seed=8)
    alone = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    mixed = llm.generate(prompts, [GREEDY, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)],
                         use_tqdm=False)
    assert mixed[0]["token_ids"] == alone[0]["token_ids"]


def test_cpu_defaults_kv_budget_and_fp32(qwen3_path):
    llm = LLM(qwen3_path, device="cpu", max_model_len=256)  # no dtype and no block count: the CPU defaults
    assert llm.model_runner.num_kv_blocks * 256 >= 256
    assert llm.model_runner.kv_cache.dtype == torch.float32


def test_the_heap_is_frozen_while_the_engine_has_work_and_only_then(qwen3_path, monkeypatch):
    """A full collection of the cycle collector walks every object the process tracks (~200k with torch
    loaded): a pause of a tenth of a second or more between two steps. While it has work, the engine keeps the
    collector off what existed before (gc.freeze), and gives it back when idle, so nothing is leaked."""
    import gc
    import weakref
    llm = LLM(qwen3_path, **SMALL)
    frozen_during_steps = []
    schedule = llm.scheduler.schedule
    monkeypatch.setattr(llm.scheduler, "schedule", lambda *a: frozen_during_steps.append(gc.get_freeze_count())
                        or schedule(*a))
    before = len(gc.get_objects())
    llm.generate(random_prompts(3, 5, 20), GREEDY, use_tqdm=False)
    assert min(frozen_during_steps) >= before
    assert gc.get_freeze_count() == 0  # idle: given back

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.scheduler, "schedule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts(2, 5, 20), GREEDY, use_tqdm=False)
    assert gc.get_freeze_count() == 0  # generate() aborted its requests: idle again
    monkeypatch.setattr(llm.scheduler, "schedule", schedule)

    gc.freeze()  # the user's own (after the engine was built, as servers do): the engine leaves it as it is
    try:
        frozen = gc.get_freeze_count()
        llm.generate(random_prompts(2, 5, 20), GREEDY, use_tqdm=False)
        assert 0 < gc.get_freeze_count() <= frozen  # not given back, not frozen over (some frozen objects died)
    finally:
        gc.unfreeze()

    def fails(*args):
        raise RuntimeError("boom")

    llm.add_request([1, 2, 3], GREEDY)
    monkeypatch.setattr(llm.workers[0].runner, "launch", fails)
    for _ in range(3):  # its third failed step ends the request (finish reason "error"): idle, in step()'s raise
        with contextlib.suppress(RuntimeError):
            llm.step()
    assert llm.scheduler.is_finished() and gc.get_freeze_count() == 0
    monkeypatch.undo()
    llm.step()  # delivers the error

    engine = weakref.ref(llm)
    del llm, schedule
    gc.collect()
    assert engine() is None  # an engine that ran is still collected

    dropped = LLM(qwen3_path, **SMALL)  # dropped mid-run (a step loop left by an exception, say)
    dropped.add_request([1, 2, 3], GREEDY)
    dropped.step()
    assert gc.get_freeze_count() > 0
    del dropped
    assert gc.get_freeze_count() == 0  # given back as it was freed

    dropped = LLM(qwen3_path, **SMALL)
    dropped.on_output = dropped.step  # a reference cycle: only the collector can free it...
    dropped.add_request([1, 2, 3], GREEDY)
    dropped.step()
    engine = weakref.ref(dropped)
    del dropped
    LLM(qwen3_path, **SMALL)  # ...and it may once another engine is built
    gc.collect()
    assert engine() is None


def test_the_heap_is_frozen_too_where_python_starts_with_objects_of_its_own_frozen(qwen3_path):
    """Python 3.12 starts with a few hundred objects frozen (375 on 3.12.1): that is not a user's freeze, and the
    engine must still freeze the heap while it has work (it did not, on every 3.12 machine)."""
    import subprocess
    import sys
    script = f"""
import gc
startup = [[] for _ in range(375)]
gc.freeze()  # as Python 3.12 starts, before nanovllm is imported
from nanovllm import LLM, SamplingParams
llm = LLM({qwen3_path!r}, **{SMALL!r})
frozen, schedule = [], llm.scheduler.schedule
llm.scheduler.schedule = lambda *a: frozen.append(gc.get_freeze_count()) or schedule(*a)
llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
print(min(frozen), len(gc.get_objects()), gc.get_freeze_count())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    frozen_in_steps, tracked_after, frozen_after = map(int, done.stdout.split())
    assert frozen_in_steps > 10_000 and frozen_after == 0, done.stdout  # frozen while busy, given back when idle


def test_cpu_default_kv_budget_fits_one_sequence_of_a_big_model(qwen3_path, monkeypatch, tmp_path):
    """The CPU's default KV budget (1 GiB) holds less than max_model_len for big models (Qwen3-8B in fp32); then the
    engine takes as many blocks as one sequence needs, and starts."""
    monkeypatch.setattr("nanovllm.engine.model_runner.CPU_KV_CACHE_BYTES", 1)  # as if every block were bigger
    llm = LLM(qwen3_path, device="cpu", max_model_len=512)
    [out] = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(out["token_ids"]) == GREEDY.max_tokens
    # A long context: 512 blocks of 16 tokens for one sequence, and admission keeps 1% of the pool free beside it.
    long = make_random_checkpoint(str(tmp_path / "long"), "qwen3-tiny", max_position_embeddings=8192)
    llm = LLM(long, device="cpu", max_model_len=8192, kv_cache_block_size=16)
    assert llm.model_runner.num_kv_blocks == 517


def test_a_closed_engine_takes_no_requests(qwen3_path):
    llm = LLM(qwen3_path, **SMALL)
    llm.close()
    with pytest.raises(RuntimeError, match="this engine is closed"):
        llm.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="this engine is closed"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert llm.is_finished()  # nothing was queued
