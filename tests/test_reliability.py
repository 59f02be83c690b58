"""A step that fails or is interrupted leaves the engine consistent, and the next call gives exact tokens.

Faults are injected at each point of the step loop — a prefill launch (on either PD worker), a decode launch, a
decode at a KV-block boundary, collecting a step's tokens, starting a KV copy between workers, finishing one — as
an exception or as KeyboardInterrupt (Ctrl-C), in single-device mode and in both PD policies, on CPU in fp32. After the fault:
no step in flight, every block free, nothing waiting; then the same prompts again (hitting the prefix cache
the failed step must not have poisoned) give the tokens of a run that never failed.
"""
import os
import signal

import pytest

from conftest import random_prompts
from nanovllm import LLM, LLMEngine, SamplingParams
from nanovllm.engine.scheduler import MAX_FAILURES

BS = 16
COMMON = dict(kv_cache_block_size=BS, max_model_len=256, max_num_batched_tokens=256, device="cpu", dtype="float32",
              chunked_prefill_tokens=64)
MODES = {
    "single": dict(COMMON, num_kv_cache_blocks=64),
    "pd-adaptive": dict(COMMON, enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu",
                        num_kv_cache_blocks=32, num_prefill_kv_cache_blocks=48),
    "pd-static": dict(COMMON, enable_two_gpu_pd=True, prefill_device_id="cpu", decode_device_id="cpu",
                      pd_policy="static", num_kv_cache_blocks=32, num_prefill_kv_cache_blocks=48),
}
for options in MODES.values():
    if options.get("enable_two_gpu_pd"):
        del options["device"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SHARED = random_prompts(1, 40, 40, seed=20)[0]  # two full blocks every prompt starts with: prefix-cache hits
PROMPTS = [SHARED + tail for tail in random_prompts(6, 1, 30, seed=21)]


@pytest.fixture(scope="module")
def reference(qwen3_path):
    return tokens(LLM(qwen3_path, **MODES["single"]).generate(PROMPTS, GREEDY, use_tqdm=False))


def tokens(outputs):
    return [o["token_ids"] for o in outputs]


class Fault:
    """Makes `target.name(...)` raise `error` the first time `when(...)` holds for its arguments."""

    def __init__(self, target, name, when, error):
        self.original, self.when, self.error, self.fired = getattr(target, name), when, error, False
        setattr(target, name, self)

    def __call__(self, *args, **kwargs):
        if not self.fired and self.when(*args, **kwargs):
            self.fired = True
            raise self.error
        return self.original(*args, **kwargs)


def prefill(batch):
    return bool(batch.prefills)


def decode(batch):
    return bool(batch.decodes) and not batch.prefills


def decode_at_block_boundary(batch):
    return any((end - 1) % BS == 0 for _, end, _ in batch.decodes)  # this token starts a new block


class FailingTokens:
    """A launched step whose tokens cannot be read (a device error surfacing at the sync)."""

    def __init__(self, pending, error):
        self.pending, self.error = pending, error

    def done(self):
        return self.pending.done()

    def wait(self):
        self.pending.wait()

    def get(self):
        raise self.error


def inject(llm, point, error):
    """Install one fault at `point`; returns the Fault, to check that it fired."""
    if point in ("prefill", "decode", "decode at block boundary"):
        kind = {"prefill": prefill, "decode": decode, "decode at block boundary": decode_at_block_boundary}[point]
        worker = llm.workers[-1] if point != "prefill" else llm.workers[0]
        return Fault(worker.runner, "launch", kind, error)
    if point == "prefill on the decode worker":  # PD: it starts prompts too while worker 0 has a backlog
        return Fault(llm.workers[1].runner, "launch", prefill, error)
    if point == "collect":
        return _fail_at_collect(llm.workers[-1].runner, error)
    if point == "kv copy start":
        return Fault(llm, "_copy", lambda *args: True, error)
    if point == "kv copy finish":
        return Fault(llm.scheduler, "finish_migration", lambda seq: True, error)
    raise ValueError(point)


def _fail_at_collect(runner, error, when=lambda batch: True):
    launch, state = runner.launch, {"fired": False}

    def launch_failing_once(batch):
        pending = launch(batch)
        if not state["fired"] and batch.decodes and when(batch):
            state["fired"] = True
            return FailingTokens(pending, error)
        return pending

    runner.launch = launch_failing_once
    return state


def fired(fault) -> bool:
    return fault["fired"] if isinstance(fault, dict) else fault.fired


def assert_consistent(llm):
    assert llm.is_finished() and not llm.scheduler.waiting
    assert not llm.transfers and not any(w.in_flight for w in llm.workers)
    for bm in llm.scheduler.block_managers:
        assert bm.num_free_blocks == bm.num_blocks  # no block leaked


POINTS = ["prefill", "decode", "decode at block boundary", "collect", "kv copy start", "kv copy finish",
          "prefill on the decode worker"]
PD_ONLY = ("kv copy start", "kv copy finish", "prefill on the decode worker")
POINT_OPTIONS = {"prefill on the decode worker": dict(max_num_batched_tokens=64)}  # a backlog: worker 1 helps
CASES = [(mode, point) for mode in MODES for point in POINTS if mode != "single" or point not in PD_ONLY]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("injected")], ids=["ctrl-c", "exception"])
@pytest.mark.parametrize("mode,point", CASES)
def test_generate_after_a_fault_is_exact(qwen3_path, reference, mode, point, error):
    llm = LLM(qwen3_path, **{**MODES[mode], **POINT_OPTIONS.get(point, {})})
    fault = inject(llm, point, error)
    with pytest.raises(type(error)):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert fired(fault)
    assert_consistent(llm)  # generate() aborted its requests on the way out
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert_consistent(llm)


@pytest.mark.parametrize("mode,point", [("single", "prefill"), ("single", "decode at block boundary"),
                                        ("pd-adaptive", "kv copy start"), ("pd-static", "collect")])
def test_step_api_recomputes_after_a_fault(qwen3_path, reference, mode, point):
    """Driving step() by hand: the failed step's requests are recomputed, none is lost or duplicated."""
    engine = LLMEngine(qwen3_path, **MODES[mode])
    inject(engine, point, RuntimeError("injected"))
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    finished, errors = {}, 0
    while not engine.is_finished():
        try:
            outputs = engine.step()
        except RuntimeError:
            errors += 1
            continue
        for out in outputs:
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out.token_ids
    assert errors == 1 and [finished[i] for i in ids] == reference
    assert_consistent(engine)


def test_a_request_that_keeps_failing_fails_with_the_reason(qwen3_path):
    engine = LLMEngine(qwen3_path, **MODES["single"])
    runner = engine.workers[0].runner
    good = engine.add_request(PROMPTS[0], GREEDY)
    runner.launch, launch = (lambda batch: (_ for _ in ()).throw(ValueError("bad kernel"))), runner.launch
    bad = engine.add_request(PROMPTS[1], GREEDY)
    outputs = []
    for _ in range(MAX_FAILURES):
        with pytest.raises(ValueError):
            engine.step()
    runner.launch = launch
    while not engine.is_finished():
        outputs += engine.step()
    ended = {o.request_id: o for o in outputs if o.finished}
    assert ended[bad].finish_reason == ended[good].finish_reason == "error"  # both were in every failed step
    assert "bad kernel" in ended[bad].error
    assert_consistent(engine)


def test_abort_request(qwen3_path, reference):
    for mode in MODES:
        engine = LLMEngine(qwen3_path, **MODES[mode])
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        outputs = engine.step() + engine.step() + engine.step()
        assert engine.abort_request(ids[0]) and engine.abort_request(ids[-1])
        assert not engine.abort_request(ids[0])  # already finished
        while not engine.is_finished():
            outputs += engine.step()
        ended = {o.request_id: o for o in outputs if o.finished}
        assert ended[ids[0]].finish_reason == ended[ids[-1]].finish_reason == "abort", mode
        assert [ended[i].token_ids for i in ids[1:-1]] == reference[1:-1], mode
        assert_consistent(engine)


def test_interrupted_generate_leaves_nothing_behind(qwen3_path, reference):
    llm = LLM(qwen3_path, **MODES["single"])
    Fault(llm.workers[0].runner, "launch", decode, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    other = [[1, 2, 3]]
    out = llm.generate(other, GREEDY, use_tqdm=False)  # runs only its own request
    assert len(out) == 1 and llm.stats["decode_tokens"] > 0
    assert_consistent(llm)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, also where pytest was started with it ignored: a shell without job control
    starts background commands (`pytest &`, some CI runners) with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def press_ctrl_c_after_each_call(obj, name: str):
    """Wrap obj.<name> so that a real SIGINT arrives right after each call returns (undo: del obj.<name>)."""
    method = getattr(obj, name)

    def pressed(*args):
        result = method(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    setattr(obj, name, pressed)


@pytest.mark.parametrize("pressed_after", ["_add", "abort_request"])
def test_ctrl_c_while_generate_queues_or_aborts_its_requests_leaves_nothing_behind(pressed_after, qwen3_path,
                                                                                   reference, ctrl_c_as_in_a_terminal):
    """An impatient user presses Ctrl-C while generate() queues its requests, or again while it aborts them."""
    llm = LLM(qwen3_path, **MODES["single"])
    if pressed_after == "abort_request":  # the first Ctrl-C, in a step, makes generate() abort its requests
        Fault(llm.workers[0].runner, "launch", decode, KeyboardInterrupt())
    press_ctrl_c_after_each_call(llm, pressed_after)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    delattr(llm, pressed_after)
    assert_consistent(llm)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_outputs_committed_before_a_failing_step_are_still_delivered(qwen3_path, reference):
    """Two steps are collected in one call, and the second's tokens cannot be read. The first step was committed
    (here it finishes a request), so its outputs must still come out of step(), after the exception."""
    engine = LLMEngine(qwen3_path, **MODES["single"])
    short = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    long = engine.add_request(PROMPTS[1], GREEDY)
    streamed, ended = {short: [], long: []}, {}

    def record(outputs):
        for out in outputs:
            streamed[out.request_id].append(out.new_token_id)
            if out.finished:
                ended[out.request_id] = out

    record(engine.step())  # prefills both: each has its first token
    # The next call launches a step that decodes both (short's last token), then one for long alone: that fails.
    fault = _fail_at_collect(engine.workers[0].runner, RuntimeError("injected"),
                             when=lambda batch: short not in [seq.seq_id for seq in batch.seqs])
    with pytest.raises(RuntimeError):
        engine.step()
    assert fired(fault)
    while not engine.is_finished():
        record(engine.step())
    assert ended[short].token_ids == streamed[short] == reference[0][:2]
    assert ended[long].token_ids == streamed[long] == reference[1]
    assert_consistent(engine)
