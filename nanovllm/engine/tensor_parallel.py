"""Tensor parallelism: one process per rank, driven from the user's process.

Rank 0's ModelRunner lives in the user's process and starts ranks 1..N-1 (`Workers`): spawned processes
that each build the ModelRunner of their rank (rank r on GPU device+r, or all on the CPU) and then run the
calls rank 0 sends them. Rank 0 sends each step to the others before running it itself, so that all ranks
enter the same collectives in the same order; only rank 0 samples. The ranks of one engine share a
torch.distributed process group of their own (NCCL on GPUs, gloo on the CPU) on a TCPStore of their own,
not the process-wide default group: two engines in one process do not clash.

Shutdown: the other ranks never outlive the user's process, and none is left hanging.
- They ignore SIGINT (Ctrl-C reaches the whole process group; rank 0 decides) and exit when the user's
  process goes away: their command pipe closes, or, if they are stuck in a collective, their parent changes.
- `Workers.close()` (LLM.close(), at exit, or when the engine is garbage-collected) tells them to stop and
  kills those that do not, then aborts rank 0's communicator and frees its CUDA graphs (`_abort` says in which
  order, and why).
- A rank that fails sends its traceback and exits. A watcher thread in the user's process records it. Rank 0's
  host never blocks on the GPU under tensor parallelism (its collectives with a dead peer may never end): it waits
  for sampled tokens in slices and stops once the watcher saw a failure. `reporting_failures` then stops the other
  ranks, aborts rank 0's communicator, frees its graphs and raises an error carrying that traceback. When rank 0
  fails in a step, the others (now waiting for it) are stopped the same way.
"""
import contextlib
import gc
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref

import torch
import torch.distributed as dist

from nanovllm.layers.linear import TensorParallelGroup

STOP_TIMEOUT_S = 10  # for the ranks to exit after close(), before they are killed
REPORT_WAIT_S = 2  # when rank 0 fails, how long to wait for the failure of another rank that may explain it
ABORT_TIMEOUT_S = 10  # an NCCL abort that does not return by then is left behind: it must not hang the user
ABORT_HEAD_START_S = 0.2  # for the abort to raise NCCL's abort flag before rank 0's graphs are freed


def connect(rank: int, size: int, device: torch.device, store: dist.Store) -> TensorParallelGroup:
    """Join the engine's process group; returns once every rank has joined."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            backend = dist.ProcessGroupNCCL(store, rank, size)
            backend.eager_connect_single_device(device)  # now, while every rank is known to be alive
    else:
        backend = dist.ProcessGroupGloo(store, rank, size)
    return TensorParallelGroup(rank, size, device, backend)


class Workers:
    """Ranks 1..N-1 of an engine, as rank 0 sees them. `group` is rank 0's place in the process group."""

    def __init__(self, config, device: torch.device, num_kv_blocks: int, role: str):
        size = config.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)  # port 0: a free one
        self.processes, self.commands, reports = [], [], []
        self.failures: list[str] = []  # filled by the watcher thread
        self.failed = threading.Event()
        self.stopping = threading.Event()
        self.aborts = []  # rank 0's NCCL abort, once connected: ends its collectives whose peers are gone
        self.graphs: list[dict] = []  # rank 0's CUDA graphs (dicts of them), freed while its communicator aborts
        # Stops the ranks on close(), at exit, or when this object is collected, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.commands, self.stopping, self.aborts,
                                           self.graphs)
        spawn = mp.get_context("spawn")
        try:
            for rank in range(1, size):
                command_reader, command_writer = spawn.Pipe(duplex=False)
                report_reader, report_writer = spawn.Pipe(duplex=False)
                rank_device = torch.device(device.type, device.index + rank) if device.type == "cuda" else device
                process = spawn.Process(target=run_worker, name=f"nanovllm-tp-rank{rank}", daemon=True,
                                        args=(config, rank, rank_device, num_kv_blocks, role, store.port,
                                              torch.get_num_threads(), os.getpid(), command_reader, report_writer))
                process.start()
                self.processes.append(process)
                self.commands.append(command_writer)
                reports.append(report_reader)
                command_reader.close()  # the child's ends
                report_writer.close()
            _wait_until_connecting(self.processes, reports)
            self.group = connect(0, size, device, store)
        except BaseException:
            self.close(kill=True)
            raise
        self.store = store
        if device.type == "cuda":
            self.aborts.append(self.group.backend.abort)
        threading.Thread(target=_watch, name="nanovllm-tp-watcher", daemon=True,
                         args=(self.processes, reports, self.failures, self.failed, self.stopping)).start()

    def call(self, method: str, *args):
        """Run runner.method(*args) on every other rank (without waiting for it)."""
        if self.failures:
            raise RuntimeError(self.failures[0])
        if self.stopping.is_set():
            raise RuntimeError("this engine's tensor-parallel ranks were stopped (closed, or after an error)")
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.commands:
            conn.send_bytes(data)

    def close(self, kill: bool = False):
        """Stop the other ranks: ask them to exit (kill=True: don't), kill any that remain."""
        if kill:
            self.stopping.set()
            for process in self.processes:
                process.kill()
        self._finalizer()


@contextlib.contextmanager
def reporting_failures(workers: Workers | None):
    """Around rank 0's part of a step (or its set-up).

    If another rank failed, raise an error with its traceback. If rank 0 fails, stop the other ranks,
    which would otherwise wait for it forever. A lost peer shows on rank 0 as a RuntimeError (a collective
    failed) or an OSError (a pipe broke): then the peer's own error, if it sent one, is the one to report;
    any other error (a ValueError for weights that do not fit, say) is rank 0's own.
    """
    if workers is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        from_peer = isinstance(e, (RuntimeError, OSError))
        if from_peer and not workers.stopping.is_set():
            workers.failed.wait(REPORT_WAIT_S)
        workers.close(kill=True)
        if from_peer and workers.failures:
            raise RuntimeError(workers.failures[0]) from e
        raise
    if workers.failures:  # another rank died under this step: its results are garbage
        workers.close(kill=True)
        raise RuntimeError(workers.failures[0])


# ---- rank 0's side ----

def _wait_until_connecting(processes, reports):
    """Wait until every rank is about to join the process group; raise if one died before."""
    for rank, (process, conn) in enumerate(zip(processes, reports), start=1):
        mp.connection.wait([conn, process.sentinel])
        report = _receive(conn)
        if report is not None and report[0] == "connecting":
            continue
        raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{_how_it_ended(report, process)}")


def _watch(processes, reports, failures, failed, stopping):
    """Record each rank that dies unasked, with its traceback if it sent one.

    It does not abort NCCL itself: an abort while rank 0's CUDA graphs are alive does not return (two H200s).
    Rank 0 notices the failure between its waits and stops everything in order (`Workers.close`)."""
    sentinels = {process.sentinel: rank for rank, process in enumerate(processes)}
    while sentinels:
        for sentinel in mp.connection.wait(list(sentinels)):
            i = sentinels.pop(sentinel)
            if stopping.is_set():
                continue
            ended = _how_it_ended(_receive(reports[i]), processes[i])
            failures.append(f"tensor-parallel rank {i + 1} failed:\n{ended}")
            failed.set()


def _receive(conn) -> tuple | None:
    """A rank's next report, or None if it died without sending one (poll() is also true at EOF)."""
    with contextlib.suppress(EOFError, OSError):
        if conn.poll():
            return conn.recv()
    return None


def _how_it_ended(report: tuple | None, process) -> str:
    """The traceback a dead rank sent, or else its exit code."""
    if report is not None:
        return report[1]
    # Its sentinel fires as it closes its files, a moment before its exit code is known; and while another thread
    # reaps it (a join elsewhere), our waitpid fails and exitcode reads None until that thread records the code.
    deadline = time.monotonic() + 2.0
    while process.exitcode is None and time.monotonic() < deadline:
        process.join(0.05)
    return f"its process exited with code {process.exitcode}"


def _stop(processes, commands, stopping, aborts, graphs):
    stopping.set()
    for conn in commands:
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(("close", ())))
        conn.close()  # the rank sees EOF even if it missed the message
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    _abort(aborts, graphs)  # rank 0's NCCL communicator: its peers are gone


def _abort(aborts: list, graphs: list[dict]):
    """Abort rank 0's communicator (once) and free its CUDA graphs, waiting ABORT_TIMEOUT_S at most.

    The order matters. The abort first raises NCCL's abort flag, which ends rank 0's collectives still spinning on
    the GPU for a dead peer, then waits until every graph that captured one of them is destroyed. Destroying such a
    graph waits for those collectives to end. So: abort in a thread, then free the graphs, then wait for the
    abort (two H200s: freeing first hung on a dead peer; aborting with graphs alive never returned)."""
    abort = aborts.pop() if aborts else None
    thread = threading.Thread(target=abort, name="nanovllm-tp-abort", daemon=True) if abort else None
    if thread:
        thread.start()
        thread.join(ABORT_HEAD_START_S)  # the abort flag goes up before anything below waits for the GPU
    for captured in graphs:
        captured.clear()
    if thread:
        thread.join(ABORT_TIMEOUT_S)
        if thread.is_alive():
            logging.getLogger("nanovllm").warning(f"rank 0's NCCL communicator did not abort within "
                                                  f"{ABORT_TIMEOUT_S} s; left behind")


# ---- the other ranks' side ----

def run_worker(config, rank: int, device: torch.device, num_kv_blocks: int, role: str, port: int, num_threads: int,
               parent_pid: int, commands, reports):
    """Rank `rank`: build its ModelRunner, then run what rank 0 sends until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    logging.getLogger("nanovllm").setLevel(logging.WARNING)  # rank 0 logs for all
    try:
        from nanovllm.engine.model_runner import ModelRunner  # not at the top: model_runner imports this module
        torch.set_num_threads(num_threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        reports.send(("connecting", None))
        group = connect(rank, config.tensor_parallel_size, device, dist.TCPStore("127.0.0.1", port, is_master=False))
        runner = ModelRunner(config, device, num_kv_blocks, role, tp_group=group)
        gc.collect()
        gc.freeze()  # from here this process only runs steps: no full collection walks its start-up objects
        while True:
            method, args = pickle.loads(commands.recv_bytes())
            if method == "close":
                break
            getattr(runner, method)(*args)
    except EOFError:
        pass  # rank 0's process is gone
    except BaseException:
        with contextlib.suppress(OSError):
            reports.send(("error", traceback.format_exc()[-16000:]))  # short enough not to fill the pipe
        _exit(1)
    _exit(0)


def _exit_with_parent(parent_pid: int):
    """If the user's process dies while this rank is stuck (in a collective, say), exit anyway."""
    while os.getppid() == parent_pid:
        time.sleep(1)
    _exit(1)


def _exit(code: int):
    """Exit now, skipping interpreter teardown, which can hang in communicator destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
