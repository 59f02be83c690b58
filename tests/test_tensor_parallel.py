"""Tensor parallelism: N ranks must give the tokens one device gives, and never outlive or hang the user.

On CPU (gloo, one process per rank) in fp32: token for token equal to tp=1 and to transformers.
On GPUs (NCCL, CUDA graphs on every rank) in bf16: tp=2 and tp=4 against tp=1, where any divergence must be
a near-tie (the rule of tests/test_gpu.py). Run with -s to see the table.
"""
import contextlib
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import shutil
import textwrap
import threading
import time
import types

import pytest
import torch

from conftest import hf_greedy, random_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import PendingTokens, StepTimer
from nanovllm.utils.checkpoints import make_random_checkpoint
from nanovllm.engine.tensor_parallel import _how_it_ended

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# A script in a temporary folder imports nanovllm from this checkout, installed or not.
SCRIPT_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
CPU = dict(device="cpu", dtype="float32", kv_cache_block_size=16, max_model_len=256, max_num_batched_tokens=512)


def sigint_as_in_a_terminal():
    """A shell without job control starts background commands with Ctrl-C ignored (`pytest &`, CI runners), and
    children inherit that; the user's script we test runs as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tokens(outputs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


def prompts_with_shared_prefixes() -> list[list[int]]:
    shared = random_prompts(1, 40, 40, seed=20)[0]  # two full 16-token blocks, reused from the prefix cache
    return random_prompts(6, 1, 70, seed=21) + [shared + [1, 2], shared + [3], shared + [4, 5, 6]]


@pytest.mark.parametrize("model", ["qwen3_path", "llama_path"])
def test_tp2_on_cpu_gives_the_tokens_of_tp1_and_transformers(model, request):
    path = request.getfixturevalue(model)
    prompts = prompts_with_shared_prefixes()
    tight = dict(CPU, num_kv_cache_blocks=20)  # 320 tokens for ~850: preemption, then recompute
    tp1 = LLM(path, **tight).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(path, tensor_parallel_size=2, **tight)
    tp2 = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(tp2) == tokens(tp1) == hf_greedy(path, prompts, GREEDY.max_tokens)
    assert llm.scheduler.num_preemptions > 0 and llm.scheduler.block_managers[0].num_cache_hits > 0
    assert llm.model_runner.num_kv_heads == 1  # 2 KV heads, one per rank
    llm.close()


def test_two_tp_engines_in_one_process_and_kv_heads_replicated_over_4_ranks(qwen3_path, llama_path):
    prompts = random_prompts(4, 1, 40, seed=22)
    tp4 = LLM(qwen3_path, tensor_parallel_size=4, **CPU, num_kv_cache_blocks=64)  # 2 KV heads for 4 ranks
    tp2 = LLM(llama_path, tensor_parallel_size=2, **CPU, num_kv_cache_blocks=64)  # each has its own group
    for _ in range(2):  # interleaved use
        assert tokens(tp4.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(qwen3_path, prompts, 24)
        assert tokens(tp2.generate(prompts, GREEDY, use_tqdm=False)) == hf_greedy(llama_path, prompts, 24)
    assert tp4.model_runner.num_kv_heads == 1
    tp4.close()
    tp2.close()
    assert not any(p.is_alive() for llm in (tp2, tp4) for p in llm.model_runner.workers.processes)


def _edited(src, dst, **fields):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(fields)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_bad_tensor_parallel_configs(qwen3_path, tmp_path, monkeypatch):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
            LLM(qwen3_path, tensor_parallel_size=bad, **CPU)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="tensor_parallel_size must be int"):
            LLM(qwen3_path, tensor_parallel_size=bad, **CPU)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the model's num_attention_heads \(4\)"):
        LLM(qwen3_path, tensor_parallel_size=3, **CPU)
    for field, value in (("intermediate_size", 129), ("vocab_size", 511)):
        path = _edited(qwen3_path, tmp_path / field, **{field: value})
        with pytest.raises(ValueError, match=f"must divide the model's {field} \\({value}\\)"):
            LLM(path, tensor_parallel_size=2, **CPU)
    path = _edited(qwen3_path, tmp_path / "kv", num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide one another"):
        LLM(path, tensor_parallel_size=2, **CPU)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the check runs before any GPU use
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs GPUs cuda:1 to cuda:2; this machine has 2"):
        LLM(qwen3_path, tensor_parallel_size=2, device="cuda:1")


# ---- shutdown: no rank outlives its engine or the user's process, none hangs ----

def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_until_gone(pids: list[int], timeout: float = 60) -> list[int]:
    """The pids still running after `timeout` seconds (a bound on the wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while any(map(is_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if is_running(pid)]


def test_weights_that_do_not_fit_fail_as_on_one_device_and_leave_no_rank(qwen3_path, tmp_path):
    path = _edited(qwen3_path, tmp_path / "m", intermediate_size=256)  # splits evenly, but the weights have 128
    with pytest.raises(ValueError, match="does not match"):  # rank 0's own error, while loading
        LLM(path, tensor_parallel_size=2, **CPU, num_kv_cache_blocks=64)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("nanovllm-tp-rank")]


def test_a_failing_rank_raises_its_traceback_in_the_users_process(qwen3_path):
    llm = LLM(qwen3_path, tensor_parallel_size=2, **CPU, num_kv_cache_blocks=64)
    llm.model_runner.workers.call("execute", "not a step's inputs")  # rank 1 fails; rank 0 does not know yet
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 failed:\n(.|\n)*AttributeError(.|\n)*"
                                           r"'str' object has no attribute 'decode'"):
        llm.generate(random_prompts(2, 5, 10), GREEDY, use_tqdm=False)
    assert wait_until_gone([p.pid for p in llm.model_runner.workers.processes]) == []
    with pytest.raises(RuntimeError, match="rank 1 failed"):  # and it stays failed
        llm.generate(random_prompts(1, 5, 10), GREEDY, use_tqdm=False)


def test_a_killed_rank_is_reported_with_how_it_ended(qwen3_path):
    llm = LLM(qwen3_path, tensor_parallel_size=2, **CPU, num_kv_cache_blocks=64)
    rank_1 = llm.model_runner.workers.processes[0]
    rank_1.kill()  # it sends no traceback
    rank_1.join()
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 failed:\nits process exited with code -9"):
        llm.generate(random_prompts(2, 5, 10), GREEDY, use_tqdm=False)


def test_the_exit_code_is_read_even_while_another_thread_reaps_the_rank():
    class RankBeingReapedElsewhere:  # multiprocessing's exitcode reads None until the reaping thread records it
        reads = 0

        def join(self, timeout=None):
            pass

        @property
        def exitcode(self):
            self.reads += 1
            return None if self.reads < 3 else -9

    assert _how_it_ended(None, RankBeingReapedElsewhere()) == "its process exited with code -9"


def test_a_failure_in_rank_0_stops_the_others(qwen3_path, monkeypatch):
    llm = LLM(qwen3_path, tensor_parallel_size=2, **CPU, num_kv_cache_blocks=64)

    def fail(hidden_states):
        raise MemoryError("rank 0 ran out")  # after the forward pass, while rank 1 waits to gather logits

    monkeypatch.setattr(llm.model_runner.model, "compute_logits", fail)
    with pytest.raises(MemoryError, match="rank 0 ran out"):
        llm.generate(random_prompts(2, 5, 10), GREEDY, use_tqdm=False)
    assert wait_until_gone([p.pid for p in llm.model_runner.workers.processes]) == []


def test_waiting_for_tokens_ends_with_the_error_of_a_rank_that_died():
    """On GPUs a dead rank can leave rank 0's collective spinning on the GPU, its tokens never ready (an NCCL abort
    may not end it): the wait must end with that rank's error, not block. Here: an event that never completes,
    and a rank whose failure the watcher records 0.2 s into the wait."""
    class NeverReady:
        def query(self):
            return False

        def synchronize(self):
            raise AssertionError("would block forever")

    class Ranks:  # what rank 0 knows of the others (tensor_parallel.Workers)
        failures, failed, stopping, killed = [], threading.Event(), threading.Event(), False

        def close(self, kill=False):
            self.killed = kill

        def die(self):
            self.failures.append("tensor-parallel rank 1 failed:\nRuntimeError: CUDA error")
            self.failed.set()

    ranks = Ranks()
    pending = PendingTokens(torch.zeros(4, dtype=torch.int64), StepTimer(types.SimpleNamespace(is_cuda=False)), ranks)
    pending.event = NeverReady()
    threading.Timer(0.2, ranks.die).start()
    with pytest.raises(RuntimeError, match="rank 1 failed:\nRuntimeError: CUDA error"):
        pending.get()
    assert ranks.killed  # and the other ranks are stopped



def test_rollback_does_not_wait_for_the_gpu_of_a_stopped_engine(monkeypatch):
    """After a rank died, rank 0's collectives with it may never end on the GPU: a rolled-back step must not wait
    for them (the engine is stopped, so its KV blocks are never reused). A running engine still waits."""
    from nanovllm.engine.model_runner import ModelRunner
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    runner = types.SimpleNamespace(is_cuda=True, device="cuda:0",
                                   workers=types.SimpleNamespace(stopping=threading.Event()))
    ModelRunner.drain(runner)
    assert waited == ["cuda:0"]
    runner.workers.stopping.set()
    ModelRunner.drain(runner)
    assert waited == ["cuda:0"]

SCRIPT = textwrap.dedent("""
    import sys
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", kv_cache_block_size=16, max_model_len=64,
                  max_num_batched_tokens=64, num_kv_cache_blocks=8)
        print(*[p.pid for p in llm.model_runner.workers.processes], flush=True)
        params = SamplingParams(max_tokens=4)
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
        if sys.argv[2] != "ends":
            print("generating", flush=True)
            while True:
                llm.generate([[1, 2, 3]], params, use_tqdm=False)
""")


@pytest.mark.parametrize("how", ["ends", "killed", "ctrl-c"])
def test_ranks_exit_with_the_users_process(qwen3_path, tmp_path, how):
    """The user's script ends without close(), is killed (SIGKILL), or gets Ctrl-C (SIGINT to the whole
    process group, ranks included) in the middle of generating: its ranks must go too."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    user = subprocess.Popen([sys.executable, str(script), qwen3_path, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=SCRIPT_ENV,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        ranks = [int(pid) for pid in user.stdout.readline().split()]
        assert len(ranks) == 1, user.stderr.read()
        if how != "ends":
            assert user.stdout.readline() == "generating\n"
            if how == "killed":
                os.kill(user.pid, signal.SIGKILL)  # the user's process alone: its ranks must notice
            else:
                os.killpg(user.pid, signal.SIGINT)
        _, stderr = user.communicate(timeout=120)
        assert wait_until_gone(ranks) == []
        if how == "ends":
            assert user.returncode == 0, stderr
        if how == "ctrl-c":
            assert "KeyboardInterrupt" in stderr
    finally:
        user.kill()


def test_bench_runs_tp_beside_one_device_on_a_tiny_model(tmp_path):
    """bench.py's tp mode on the CPU (gloo, fp32), so that it cannot rot."""
    out = tmp_path / "results.json"
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")
    subprocess.run([sys.executable, bench, "--random-model", "qwen3-tiny", "--cache-dir", str(tmp_path), "--device",
                    "cpu", "--modes", "single,tp", "--tp-size", "2", "--num-requests", "4", "--input-len", "8", "24",
                    "--output-len", "4", "8", "--max-model-len", "128", "--json", str(out)], check=True,
                   capture_output=True)
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["tp"]["output_tokens"] == results["single"]["output_tokens"] > 0
    assert results["tp"]["output_tok_s"] > 0


# ---- on GPUs: NCCL, CUDA graphs on every rank, bf16 ----

NEAR_TIE = 0.1  # as in tests/test_gpu.py
MAX_TOKENS = 64


def needs_gpus(n: int):
    count = torch.cuda.device_count()
    return pytest.mark.skipif(count < n, reason=f"needs {n} CUDA GPUs, found {count}")


@pytest.fixture(scope="module")
def qwen3_06b():
    return make_random_checkpoint(os.path.expanduser("~/.cache/nanovllm/random-qwen3-0.6b"), "qwen3-0.6b")


@pytest.fixture(scope="module")
def gpu_prompts():
    return random_prompts(16, 20, 600, seed=0, vocab=10000)


def generate_on_gpus(path, prompts, **options) -> list[list[int]]:
    """Greedy tokens from a fresh engine, closed and freed afterwards (the next one sizes its KV cache from
    free memory)."""
    llm = LLM(path, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=4096, **options)  # starts sooner
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens(outputs)


@pytest.fixture(scope="module")
def tp1_tokens(qwen3_06b, gpu_prompts):
    return generate_on_gpus(qwen3_06b, gpu_prompts)


def divergence_gaps(path, prompts, a, b) -> list[tuple[int, float | None]]:
    """For each prompt: how many tokens a and b share, and where they part, how far apart transformers'
    bf16 logits of their two tokens are."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    rows = []
    with torch.no_grad():
        for prompt, x, y in zip(prompts, a, b):
            n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
            gap = None
            if n < len(x):
                logits = model(torch.tensor([prompt + x[:n]], device="cuda")).logits[0, -1].float()
                gap = abs(float(logits[x[n]] - logits[y[n]]))
            rows.append((n, gap))
    del model
    torch.cuda.empty_cache()
    return rows


@pytest.mark.parametrize("tp", [pytest.param(2, marks=needs_gpus(2)), pytest.param(4, marks=needs_gpus(4))])
def test_bf16_tensor_parallel_matches_one_gpu_up_to_near_ties(tp, qwen3_06b, gpu_prompts, tp1_tokens):
    ours = generate_on_gpus(qwen3_06b, gpu_prompts, tensor_parallel_size=tp)
    rows = divergence_gaps(qwen3_06b, gpu_prompts, tp1_tokens, ours)
    print(f"\ntp={tp} vs tp=1\n{'prompt len':>10} {'matching tokens':>16} {'logit gap at divergence':>24}")
    for prompt, (n, gap) in zip(gpu_prompts, rows):
        print(f"{len(prompt):>10} {n:>16} {'' if gap is None else f'{gap:.4f}':>24}")
    gaps = [gap for _, gap in rows if gap is not None]
    print(f"identical: {len(rows) - len(gaps)}/{len(rows)}; tokens before the first divergence: "
          f"{sum(n for n, _ in rows)}/{len(rows) * MAX_TOKENS}; max gap {max(gaps, default=0):.4f}")
    assert all(gap <= NEAR_TIE for gap in gaps)


GPU_FAILURE_SCRIPT = textwrap.dedent("""
    import faulthandler
    import sys
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        faulthandler.dump_traceback_later(200, exit=True)  # a hang fails the test with every thread's stack
        llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=4096)
        print(*[p.pid for p in llm.model_runner.workers.processes], flush=True)
        llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8), use_tqdm=False)  # decode in CUDA graphs
        llm.model_runner.workers.call("execute", "not a step's inputs")
        try:
            llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8), use_tqdm=False)
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0], flush=True)
""")


@needs_gpus(2)
def test_a_failing_rank_on_gpus_raises_instead_of_hanging(qwen3_06b, tmp_path):
    """In a subprocess whose output goes to files: a hang fails the test with stacks, and leaves nothing behind."""
    script = tmp_path / "script.py"
    script.write_text(GPU_FAILURE_SCRIPT)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        user = subprocess.Popen([sys.executable, str(script), qwen3_06b], stdout=stdout, stderr=stderr,
                                start_new_session=True, env=SCRIPT_ENV)
    try:
        returncode = user.wait(timeout=280)  # the script dumps its stacks and exits after 200 s
        rank_pids = [int(pid) for pid in out.read_text().split("\n")[0].split()]
        left_behind = wait_until_gone(rank_pids)  # before the kill below: the ranks must go by themselves
    except subprocess.TimeoutExpired:
        returncode, left_behind = "none: killed after 280 s", None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(user.pid, signal.SIGKILL)  # whatever is left of its process group
    output = f"stdout:\n{out.read_text()[-2000:]}\nstderr:\n{err.read_text()[-6000:]}"
    assert "raised: tensor-parallel rank 1 failed:" in out.read_text(), output
    assert returncode == 0, output
    assert left_behind == []
