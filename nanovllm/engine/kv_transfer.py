"""Copying KV blocks from one worker's cache to another's.

Caches are block-major ([num_blocks, layers, 2, block_size, kv_heads, head_dim]), so all layers of a run of
consecutive block ids are one contiguous range: a transfer is one copy per run, not one per layer and block.
On CUDA the copies run on the two workers' copy streams and return at once; poll or wait on the handle.
Without peer access (and when asked to) the data is staged through pinned host memory.
"""
import torch


def contiguous_runs(block_pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """[(src, dst)] -> [(src_start, dst_start, length)], merging pairs consecutive on both sides."""
    runs = []
    for src, dst in sorted(block_pairs):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(run) for run in runs]


class KVTransfer:
    """One batch of block copies between two caches, in flight."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, block_pairs: list[tuple[int, int]],
                 streams: tuple | None = None, via_host: bool = False):
        """Start copying src[s] -> dst[d] for each (s, d); streams = (source copy stream, destination copy
        stream) on CUDA. The caller makes the source stream wait for the KV to be written first."""
        runs = contiguous_runs(block_pairs)
        self.nbytes = src[0].nbytes * len(block_pairs)
        self.num_copies = len(runs)
        self.end_event = None  # completion, on the device that finishes the copy
        self._timing = None  # (start, end) events on the source device, for the copy's device time
        self._staging = []  # pinned host buffers, kept alive until the copy is done
        with torch.inference_mode():
            if streams is None:
                for s, d, n in runs:
                    dst[d:d + n].copy_(src[s:s + n])
            elif via_host:
                self._copy_via_host(src, dst, runs, *streams)
            else:
                self._copy_peer(src, dst, runs, *streams)

    def _copy_peer(self, src, dst, runs, src_stream, dst_stream):
        start, self.end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # torch makes both devices' *current* streams wait around a peer copy: make those the idle copy
        # streams, so the copy never queues behind (or blocks) compute on either GPU.
        with torch.cuda.device(src.device), torch.cuda.stream(src_stream), torch.cuda.stream(dst_stream):
            start.record(src_stream)
            for s, d, n in runs:
                dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
            self.end_event.record(src_stream)
        self._timing = start, self.end_event

    def _copy_via_host(self, src, dst, runs, src_stream, dst_stream):
        staged = torch.cuda.Event()
        with torch.cuda.device(src.device), torch.cuda.stream(src_stream):
            for s, d, n in runs:
                buffer = torch.empty(src[s:s + n].shape, dtype=src.dtype, pin_memory=True)
                buffer.copy_(src[s:s + n], non_blocking=True)
                self._staging.append((buffer, d, n))
            staged.record(src_stream)
        with torch.cuda.device(dst.device), torch.cuda.stream(dst_stream):
            dst_stream.wait_event(staged)
            for buffer, d, n in self._staging:
                dst[d:d + n].copy_(buffer, non_blocking=True)
            self.end_event = torch.cuda.Event()
            self.end_event.record(dst_stream)

    def done(self) -> bool:
        return self.end_event is None or self.end_event.query()

    def wait(self):
        if self.end_event is not None:
            self.end_event.synchronize()

    def seconds(self) -> float:
        """Copy time on the device (0 where not timed: CPU, staging through the host); call once done()."""
        return self._timing[0].elapsed_time(self._timing[1]) / 1000 if self._timing else 0.0
