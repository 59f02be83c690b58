"""PD mode on CPU ("cpu"/"cpu") in fp32: two runners, two separate KV caches, real copies between them.

Single-device runs, the reference here, are on the CPU in fp32 too, so tokens must match exactly.
"""
import types
from collections import deque

import pytest
import torch

from conftest import cuda_paths_on_cpu, hf_greedy, random_prompts, triton_interpreter
from nanovllm import LLM, SamplingParams
from nanovllm.engine import llm_engine
from nanovllm.engine.kv_transfer import KVTransfer

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
COMMON = dict(dtype="float32", kv_cache_block_size=16, max_model_len=256, max_num_batched_tokens=256)
SINGLE = dict(COMMON, device="cpu")
PD = dict(COMMON, enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu")


def test_pd_matches_single_device_under_back_pressure(qwen3_path):
    shared = random_prompts(1, 40, 40, seed=10)[0]
    prompts = random_prompts(12, 5, 60, seed=11) + [shared + [1, 2], shared + [3]]
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, GREEDY, use_tqdm=False)
    # The decode side holds 20 blocks (320 tokens) for ~1000 tokens of work: admission must wait.
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=20, num_prefill_kv_cache_blocks=40)
    outputs = pd.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]
    s = pd.scheduler
    assert s.num_backpressure_stalls > 0
    assert s.block_managers[0].num_cache_hits >= 2  # the shared 40-token prefix: 2 full blocks
    assert s.block_managers[1].num_free_blocks == 20 and s.block_managers[0].num_free_blocks == 40
    assert pd.stats["kv_copies"] > 0 and pd.stats["kv_bytes"] > 0
    for worker in pd.workers:  # host time per worker; on the CPU a launch computes its step, so it covers it
        assert 0 < worker.longest_launch <= worker.launch_seconds
        assert worker.runner.busy_seconds <= worker.launch_seconds


def test_pd_matches_transformers_and_keeps_caches_separate(llama_path):
    prompts = random_prompts(5, 1, 50, seed=12)
    pd = LLM(llama_path, **PD, num_kv_cache_blocks=64, num_prefill_kv_cache_blocks=32)
    assert pd.prefill_runner.kv_cache.data_ptr() != pd.decode_runner.kv_cache.data_ptr()
    assert pd.prefill_runner.num_kv_blocks == 32 and pd.decode_runner.num_kv_blocks == 64
    outputs = pd.generate(prompts, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == hf_greedy(llama_path, prompts, GREEDY.max_tokens)


@triton_interpreter
def test_pd_on_the_cuda_attention_path_matches_single_device(qwen3_path, monkeypatch):
    """Adaptive PD with both runners on the CUDA path (Triton kernels in the interpreter, prompt steps run from the
    prompt graphs' padded buffers): KV copied between the caches those kernels read, prompts on both workers."""
    from nanovllm.engine.prompt_graphs import bucket_sizes
    prompts = random_prompts(12, 40, 100, seed=14)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    # 128-token steps: more prompt tokens wait than worker 0 computes in one, so worker 1 starts prompts too
    pd = LLM(qwen3_path, **dict(PD, max_num_batched_tokens=128), num_kv_cache_blocks=64, num_prefill_kv_cache_blocks=64)
    for runner in (pd.prefill_runner, pd.decode_runner):
        cuda_paths_on_cpu(runner, monkeypatch, multiple=16, buckets=bucket_sizes(16, 128), max_seqs=12)
    outputs = pd.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]
    assert pd.stats["kv_copies"] > 0
    assert all(sum(graph.replays for graph in r.prompt_graphs.graphs.values()) > 0
               for r in (pd.prefill_runner, pd.decode_runner))


def test_pd_decode_preemption_recomputes(qwen3_path):
    prompts = random_prompts(6, 30, 60, seed=13)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=17, num_prefill_kv_cache_blocks=32)
    outputs = pd.generate(prompts, params, use_tqdm=False)
    assert pd.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]


def test_kv_transfer_copies_exactly_the_named_blocks(qwen3_path):
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=32, num_prefill_kv_cache_blocks=32)
    src, dst = pd.prefill_runner, pd.decode_runner
    with torch.inference_mode():  # the caches are inference tensors
        src.kv_cache.copy_(torch.randn_like(src.kv_cache))
        dst.kv_cache.fill_(0.5)
    pairs = [(3, 10), (4, 11), (5, 12), (9, 0)]  # one run of three, and one single block
    transfer = KVTransfer(src.kv_cache, dst.kv_cache, pairs)
    transfer.wait()
    assert transfer.num_copies == 2 and transfer.done()
    for s, d in pairs:
        assert torch.equal(dst.kv_cache[d], src.kv_cache[s])
    untouched = [b for b in range(32) if b not in {d for _, d in pairs}]
    assert (dst.kv_cache[untouched] == 0.5).all()


def test_pd_finishes_requests_that_end_at_prefill(qwen3_path):
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=32, num_prefill_kv_cache_blocks=32)
    outputs = pd.generate(random_prompts(4, 5, 30, seed=14), SamplingParams(temperature=0, max_tokens=1),
                          use_tqdm=False)
    assert all(len(o["token_ids"]) == 1 for o in outputs)
    assert pd.stats["kv_copies"] == 0  # nothing left to decode, so nothing was copied
    assert pd.scheduler.block_managers[1].num_free_blocks == 32


def test_bad_pd_configs(qwen3_path, monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(qwen3_path, **PD, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="GPU 99 does not exist"):
        LLM(qwen3_path, **dict(PD, prefill_device_id=99))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # pretend: the checks run before any GPU use
    with pytest.raises(ValueError, match="one type"):
        LLM(qwen3_path, **dict(PD, decode_device_id=0))
    with pytest.raises(ValueError, match="two different GPUs"):
        LLM(qwen3_path, **dict(PD, prefill_device_id=1, decode_device_id="cuda:1"))


def test_a_bad_device_is_named_by_its_option(qwen3_path, monkeypatch):
    """Which of the three device options is wrong, and what it was set to. `device` does not place a PD engine:
    with device="cpu" and PD's default GPUs 0 and 1, on a machine without GPUs, the error names prefill_device_id."""
    from nanovllm.config import Config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs (config only)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for options, message in [(dict(PD, decode_device_id=99), "decode_device_id=99: GPU 99 does not exist"),
                             (dict(PD, prefill_device_id="gpu"), "prefill_device_id='gpu': invalid device"),
                             (dict(PD, decode_device_id=-1), "decode_device_id=-1: invalid device"),
                             (dict(COMMON, enable_two_gpu_pd=True, device="cpu"), "prefill_device_id=0: GPU 0 does"),
                             (dict(COMMON, device="cuda:1"), "device='cuda:1': GPU 'cuda:1' does not exist"),
                             (dict(COMMON, device="mps"), "device='mps': device must be cuda or cpu")]:
        with pytest.raises(ValueError, match=f"^{message}"):
            Config(qwen3_path, **options)


def decode_counts(llm) -> list[int]:
    """Count the decode tokens each worker runs, by wrapping its runner."""
    counts = [0] * len(llm.workers)
    for i, worker in enumerate(llm.workers):
        def launch(batch, i=i, launch=worker.runner.launch):
            counts[i] += len(batch.decodes)
            return launch(batch)
        worker.runner.launch = launch
    return counts


@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_where_each_policy_decodes(qwen3_path, policy):
    """Adaptive: both devices decode and sequences move to balance them; static: only the decode device does."""
    prompts = random_prompts(16, 5, 60, seed=15)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **PD, pd_policy=policy, num_kv_cache_blocks=64, num_prefill_kv_cache_blocks=64)
    counts = decode_counts(pd)
    outputs = pd.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]
    if policy == "static":
        assert counts[0] == 0 and counts[1] > 0 and pd.scheduler.num_migrations >= len(prompts)  # each at least once
    else:
        assert counts[0] > 0 and counts[1] > 0 and pd.scheduler.num_migrations > 0


def prompt_workers(llm) -> dict[int, set[int]]:
    """Record which worker computes each sequence's prompt, and where it is placed once the prompt is done."""
    started, stayed = {0: set(), 1: set()}, set()
    for i, worker in enumerate(llm.workers):
        def launch(batch, i=i, launch=worker.runner.launch):
            started[i].update(seq.seq_id for seq, _, _ in batch.prefills)
            return launch(batch)
        worker.runner.launch = launch
    place = llm.scheduler._place

    def placed(seq):
        place(seq)
        if seq.migration is None:
            stayed.add(seq.seq_id)
    llm.scheduler._place = placed
    return started, stayed


@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_the_decode_worker_starts_prompts_only_when_worker_0_has_a_backlog(qwen3_path, policy):
    """Both policies: with more prompt tokens queued than worker 0 computes in a step, worker 1 starts prompts too,
    and decodes them where they were prefilled; one prompt at a time stays on worker 0."""
    prompts = random_prompts(16, 40, 90, seed=25)  # ~1,000 prompt tokens, in steps of 256
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **PD, pd_policy=policy, num_kv_cache_blocks=96, num_prefill_kv_cache_blocks=96)
    started, stayed = prompt_workers(pd)
    outputs = pd.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]
    assert len(started[0] | started[1]) == len(prompts) and not started[0] & started[1]
    assert started[0] and started[1] and started[1] <= stayed  # worker 1's prompts decode there: no copy
    started[0].clear()
    on_worker_1 = len(started[1])
    for prompt, expected in zip(prompts[:3], single):  # no backlog: one prompt at a time, on worker 0
        assert pd.generate([prompt], params, use_tqdm=False)[0]["token_ids"] == expected["token_ids"]
    assert len(started[0]) == 3 and len(started[1]) == on_worker_1


@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_one_long_prompt_is_no_backlog_by_itself(qwen3_path, policy):
    """CPU fp32: worker 1 starts the next prompt only while, without it, more than a step's worth of
    prompt tokens waits for worker 0; one prompt longer than a step stays worker 0's."""
    long_prompts = random_prompts(2, 100, 100, seed=27)  # each longer than a step of 64 tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=64).generate(long_prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **dict(PD, max_num_batched_tokens=64), pd_policy=policy, num_kv_cache_blocks=64,
             num_prefill_kv_cache_blocks=64)
    first = pd.add_request(long_prompts[0], params)
    assert not pd.scheduler.policy.prefills_on(1)
    second = pd.add_request(long_prompts[1], params)
    assert pd.scheduler.policy.prefills_on(1)  # without the first prompt, 100 tokens (> 64) still wait
    finished = {}
    while not pd.is_finished():
        finished.update((out.request_id, out.token_ids) for out in pd.step() if out.finished)
    assert [finished[first], finished[second]] == [o["token_ids"] for o in single]


def test_pd_where_it_cannot_run(qwen3_path, monkeypatch):
    """No second GPU, or no peer access: a clear error by default; pd_fallback picks one device or host copies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    gpus = dict(COMMON, enable_two_gpu_pd=True, prefill_device_id=0, decode_device_id=1, num_kv_cache_blocks=32)
    with pytest.raises(ValueError, match="GPU 0 does not exist"):
        LLM(qwen3_path, **gpus)
    llm = LLM(qwen3_path, **gpus, pd_fallback="single")  # falls back to the one device there is: the CPU
    assert not llm.config.enable_two_gpu_pd and llm.config.device == "cpu" and len(llm.workers) == 1
    prompts = random_prompts(3, 5, 20, seed=16)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=32).generate(prompts, GREEDY, use_tqdm=False)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == single
    for typo in (-1, "cuda:one", "gpu0"):  # a malformed value is an error, fallback or not
        with pytest.raises(ValueError, match=f"decode_device_id={typo!r}"):
            LLM(qwen3_path, **dict(gpus, decode_device_id=typo), pd_fallback="single")

    from nanovllm.config import Config
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two GPUs without peer access (config only)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: False)
    with pytest.raises(ValueError, match="no peer access.*pd_fallback='host'"):
        Config(qwen3_path, **gpus)
    assert Config(qwen3_path, **gpus, pd_fallback="host").kv_via_host
    with pytest.raises(ValueError, match="pd_fallback"):
        Config(qwen3_path, **gpus, pd_fallback="maybe")
    with pytest.raises(ValueError, match="pd_policy"):
        Config(qwen3_path, **gpus, pd_policy="dynamic")


@pytest.mark.parametrize("deeper", [0, 1])
def test_the_worker_with_the_deeper_queue_launches_first(qwen3_path, monkeypatch, deeper):
    """One host thread launches both devices; a worker is given a deeper queue because the other's step is about to
    hold the host, so it launches first. Tokens stay those of one device, whichever worker keeps 4 steps in flight."""
    prompts = random_prompts(16, 5, 60, seed=15)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=64, num_prefill_kv_cache_blocks=64)
    monkeypatch.setattr(pd.scheduler, "pipeline_depth", lambda worker: 4 if worker == deeper else 2)
    launches = []  # per engine step, the workers in launch order
    for i, worker in enumerate(pd.workers):
        def launch(batch, launch=worker.runner.launch, i=i):
            launches[-1].append(i)
            return launch(batch)
        worker.runner.launch = launch
    step = pd.step
    monkeypatch.setattr(pd, "step", lambda: (launches.append([]), step())[1])
    outputs = pd.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in single]
    both = [order for order in launches if len(set(order)) == 2]
    assert both and all(order[0] == deeper for order in both)


def test_a_kv_copy_waits_only_for_the_steps_that_write_its_blocks(qwen3_path, monkeypatch):
    """On CUDA each side of a copy waits on the device for the steps in flight that write the blocks it copies:
    on the source, the step computing the moving sequences' pending tokens (none once their tokens are known),
    not the next steps queued there; on the destination, those that may still write its recycled blocks. Here
    with stand-in streams and steps, since the ordering only exists on GPUs."""
    class Stream:
        def __init__(self):
            self.waited = []

        def wait_event(self, event):
            self.waited.append(event)

    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=32, num_prefill_kv_cache_blocks=32)
    src, dst = pd.prefill_runner, pd.decode_runner
    for runner in (src, dst):
        monkeypatch.setattr(runner, "is_cuda", True)
        runner.copy_stream = Stream()
    monkeypatch.setattr(llm_engine, "KVTransfer", lambda *args, **kwargs: None)

    def steps(*numbers):
        return deque((types.SimpleNamespace(number=n), types.SimpleNamespace(event=f"step {n}")) for n in numbers)

    pd.workers[0].in_flight, pd.workers[1].in_flight = steps(4, 5), steps(7, 8, 9)
    monkeypatch.setattr(pd.scheduler.block_managers[1], "last_step_writing", lambda blocks: 8)
    pd._copy(0, 1, [(0, 0)], after_step=4)
    assert src.copy_stream.waited == ["step 4"]  # not step 5, queued after it
    assert dst.copy_stream.waited == ["step 8"]  # the latest that may write the blocks, not step 9
    src.copy_stream.waited.clear()
    pd._copy(0, 1, [(0, 0)], after_step=0)  # tokens known: the KV is written
    assert src.copy_stream.waited == []


def test_adaptive_pd_keeps_decodes_off_worker_0_while_requests_keep_coming(qwen3_path):
    """CPU fp32, adaptive: a request every 3 engine steps, each prompt done in one step, so worker 0 has no prompt
    most of the time. While requests keep coming it decodes nothing (the next prompt is due: decodes there would
    wait on it, and move back); each sequence moves once, to worker 1. Once they stop, worker 0 takes decodes in the
    lull (the end of a batch). Tokens equal one device's."""
    prompts = random_prompts(12, 5, 30, seed=31)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    single = LLM(qwen3_path, **SINGLE, num_kv_cache_blocks=128).generate(prompts, params, use_tqdm=False)
    pd = LLM(qwen3_path, **PD, num_kv_cache_blocks=64, num_prefill_kv_cache_blocks=64)
    counts = decode_counts(pd)
    ids, finished, step = [], {}, 0
    while len(ids) < len(prompts) or not pd.is_finished():
        if step % 3 == 0 and len(ids) < len(prompts):
            ids.append(pd.add_request(prompts[len(ids)], params))
            decoded_on_0_while_arriving, moves_while_arriving = counts[0], pd.scheduler.num_migrations
        finished.update((out.request_id, out.token_ids) for out in pd.step() if out.finished)
        step += 1
    assert decoded_on_0_while_arriving == 0 and moves_while_arriving <= len(prompts)
    assert counts[0] > 0  # in the lull after the last request
    assert [finished[i] for i in ids] == [o["token_ids"] for o in single]
